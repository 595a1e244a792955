"""Light-FMP data pipeline: readers, preprocessing, splits, collation, synthetic data, datamodule."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from lightfmp.data import FieldSpec, Preprocessor, Schema, read_frame
from lightfmp.data.datamodule import CTRDataModule, IndexBatches
from lightfmp.data.preprocess import dense_transform
from lightfmp.data.formats import check_field_counts
from lightfmp.data.splits import split_indices, train_subsets
from lightfmp.data.synthetic import SyntheticCTR
from lightfmp.inputs import make_sparse


# ------------------------------------------------------------------------------------------- fixtures
def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding=encoding)
    return path


def criteo_line(label, dense, sparse) -> str:
    return "\t".join([str(label)] + [str(x) for x in dense] + [str(x) for x in sparse])


@pytest.fixture
def criteo_file(tmp_path):
    rows = [
        criteo_line(1, [1, -1, "", 3] + [0] * 9, ["68fd1e64", "", "a"] + ["x"] * 23),
        criteo_line(0, ["", 5, 2, 0] + [7] * 9, ["68fd1e64", "80e26c9b", "b"] + ["y"] * 23),
        criteo_line(0, [0] * 13, ["05db9164", "80e26c9b", ""] + ["x"] * 23),
    ]
    return write(tmp_path / "train.txt", "\n".join(rows) + "\n")


def ml100k_dir(root: Path) -> Path:
    root.mkdir()
    write(root / "u.data", "1\t10\t5\t100\n2\t10\t3\t300\n1\t20\t4\t200\n3\t20\t1\t50\n")
    write(root / "u.user", "1|24|M|technician|85711\n2|53|F|other|94043\n3|17|M|student|1234\n")
    flags_10 = "|".join("1" if i in (1, 5) else "0" for i in range(19))  # Action, Comedy
    flags_20 = "|".join("1" if i == 8 else "0" for i in range(19))  # Drama
    write(root / "u.item",
          f"10|Movie A (1995)|01-Jan-1995||http://x|{flags_10}\n20|Movie B (1987)|01-Jan-1987||http://y|{flags_20}\n",
          encoding="latin-1")
    return root


def ml1m_dir(root: Path) -> Path:
    root.mkdir()
    write(root / "ratings.dat", "1::10::5::100\n2::10::3::300\n1::20::4::200\n3::20::1::50\n")
    write(root / "users.dat", "1::M::18::7::85711\n2::F::50::0::94043-123\n3::M::1::10::01234\n")
    write(root / "movies.dat", "10::Movie A: the sequel (1995)::Action|Comedy\n20::Movie B (1987)::Drama\n",
          encoding="latin-1")
    return root


# ------------------------------------------------------------------------------------------- schema
def test_schema_yaml_round_trip_and_errors(tmp_path):
    yaml_path = write(tmp_path / "s.yaml", """
        label: clicked
        time_column: ts
        positive: ["yes"]
        fields:
          - {name: price, kind: dense, transform: log}
          - {name: age, kind: dense, transform: bucket, num_buckets: 4}
          - {name: user, kind: sparse, min_count: 2}
          - {name: tags, kind: multi, separator: ";", pooling: mean}
          - city
        """)
    s = Schema.from_yaml(yaml_path)
    assert s.names == ("price", "age", "user", "tags", "city")
    assert s["tags"].separator == ";" and s["city"].kind == "sparse" and s.positive == ("yes",)
    assert Schema.from_dict(s.to_dict()) == s
    assert s.select(["city", "price"]).names == ("price", "city")
    with pytest.raises(KeyError, match="nope"):
        s.select(["price", "nope"])
    bad = write(tmp_path / "bad.yaml", "label: y\nfields:\n  - {name: a, kind: dense, transfrom: log}\n")
    with pytest.raises(ValueError, match="transfrom"):
        Schema.from_yaml(bad)
    with pytest.raises(ValueError, match="kind must be one of"):
        FieldSpec("a", kind="categorical")
    with pytest.raises(ValueError, match="duplicated"):
        Schema("y", (FieldSpec("a"), FieldSpec("a")))


# ------------------------------------------------------------------------------------------- readers
def test_criteo_reader(criteo_file):
    frame, schema = read_frame("criteo", criteo_file)
    assert sorted(frame.columns) == sorted(schema.columns) == sorted([f"I{i}" for i in range(1, 14)] + [f"C{i}" for i in range(1, 27)] + ["label"])
    assert list(schema.names) == [f"I{i}" for i in range(1, 14)] + [f"C{i}" for i in range(1, 27)]
    assert frame["label"].tolist() == [1, 0, 0]
    assert frame["I2"].tolist() == [-1.0, 5.0, 0.0]
    assert np.isnan(frame["I3"].iloc[0]) and np.isnan(frame["I1"].iloc[1])
    assert frame["C1"].tolist() == ["68fd1e64", "68fd1e64", "05db9164"]
    assert frame["C2"].isna().tolist() == [True, False, False]
    sub, sub_schema = read_frame("criteo", criteo_file, columns=["C2", "I4"])
    assert sorted(sub.columns) == ["C2", "I4", "label"] and sub_schema.names == ("I4", "C2")
    assert sub["C2"].equals(frame["C2"])
    with pytest.raises(KeyError, match="C99"):
        read_frame("criteo", criteo_file, columns=["C99"])
    assert len(read_frame("criteo", criteo_file, max_rows=2)[0]) == 2


@pytest.mark.parametrize(
    "bad_line, message",
    [
        (criteo_line(1, [0] * 13, ["a"] * 25), r"line 2: it has 39 fields, expected 40"),
        (criteo_line(1, [0] * 12 + ["abc"], ["a"] * 26), r"'abc' in numeric field 'I13' .* line 2"),
        (criteo_line(2, [0] * 13, ["a"] * 26), r"non-binary label '2' .* line 2"),
        ("", r"line 2: it is blank"),
    ],
)
def test_criteo_malformed_rows_name_file_and_line(tmp_path, bad_line, message):
    good = criteo_line(0, [0] * 13, ["a"] * 26)
    path = write(tmp_path / "bad.tsv", "\n".join([good, bad_line, good]) + "\n")
    with pytest.raises(ValueError, match=message) as info:
        read_frame("criteo", path)
    assert "bad.tsv" in str(info.value)


def test_empty_and_missing_files(tmp_path):
    empty = tmp_path / "empty.tsv"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty"):
        read_frame("criteo", empty)
    header_only = write(tmp_path / "h.csv", "y,a\n")
    with pytest.raises(ValueError, match="no data rows"):
        read_frame("csv", header_only, schema=Schema("y", (FieldSpec("a"),)))
    with pytest.raises(FileNotFoundError, match="nothere"):
        read_frame("criteo", tmp_path / "nothere.tsv")
    with pytest.raises(ValueError, match="unknown data format 'libsvm'"):
        read_frame("libsvm", empty)


def test_field_count_check_across_blocks(tmp_path):
    lines = ["a,b,c"] * 50 + ["a,b"] + ["a,b,c"] * 10
    path = write(tmp_path / "x.csv", "\n".join(lines))  # no final newline
    with pytest.raises(ValueError, match="line 51: it has 2 fields"):
        check_field_counts(path, ",", block_bytes=7)
    ok = write(tmp_path / "ok.csv", "\n".join(["a::b::c"] * 5))
    assert check_field_counts(ok, "::", block_bytes=5) == 3


def test_avazu_reader(tmp_path):
    path = write(tmp_path / "avazu.csv", """
        id,click,hour,C1,banner_pos,site_id,device_type
        1000009418151094273,0,14102100,1005,0,1fbe01fe,1
        10000169349117863715,1,14102513,1005,1,1fbe01fe,1
        10000371904215119486,0,14102623,1002,0,,0
        """)
    frame, schema = read_frame("avazu", path)
    assert schema.label == "click" and schema.time_column == "hour"
    assert schema.names == ("hour_of_day", "weekday", "weekend", "C1", "banner_pos", "site_id", "device_type")
    assert frame["click"].tolist() == [0, 1, 0]
    # 2014-10-21 was a Tuesday (weekday 1), 2014-10-25 a Saturday, 2014-10-26 a Sunday
    assert frame["hour_of_day"].tolist() == ["0", "13", "23"]
    assert frame["weekday"].tolist() == ["1", "5", "6"] and frame["weekend"].tolist() == ["0", "1", "1"]
    assert frame["hour"].tolist() == [14102100, 14102513, 14102623]
    assert frame["site_id"].isna().tolist() == [False, False, True]
    sub, _ = read_frame("avazu", path, columns=["weekday", "site_id"])
    assert sorted(sub.columns) == ["click", "hour", "site_id", "weekday"]
    no_click = write(tmp_path / "test.csv", "id,hour,C1\n1,14102100,1005\n")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['click'\]"):
        read_frame("avazu", no_click)


@pytest.mark.parametrize("layout", ["ml-100k", "ml-1m"])
def test_movielens_readers(tmp_path, layout):
    root = (ml100k_dir if layout == "ml-100k" else ml1m_dir)(tmp_path / layout)
    frame, schema = read_frame("movielens", root)
    assert schema.time_column == "timestamp" and schema["genres"].kind == "multi"
    assert frame["rating"].tolist() == [1, 0, 1, 0]  # ratings 5, 3, 4, 1: label = rating >= 4
    assert frame["timestamp"].tolist() == [100, 300, 200, 50]
    assert frame["genres"].tolist() == ["Action|Comedy", "Action|Comedy", "Drama", "Drama"]
    assert frame["release_year"].tolist() == ["1995", "1995", "1987", "1987"]
    assert frame["zip_prefix"].tolist() == ["857", "940", "857", "012" if layout == "ml-1m" else "123"]
    assert frame["age"].tolist() == ["18", "50", "18", "1"]  # ml-100k ages 24, 53, 17 -> groups 18, 50, 1
    assert frame["gender"].tolist() == ["M", "F", "M", "M"]
    assert frame["user_id"].tolist() == ["1", "2", "1", "3"] and frame["item_id"].tolist() == ["10", "10", "20", "20"]


def test_movielens_errors(tmp_path):
    root = ml100k_dir(tmp_path / "ml")
    with open(root / "u.data", "a") as fh:
        fh.write("9\t10\t4\t10\n")
    with pytest.raises(ValueError, match=r"line 5 .* user_id '9'"):
        read_frame("movielens", root)
    (tmp_path / "other").mkdir()
    with pytest.raises(ValueError, match="not a MovieLens directory"):
        read_frame("movielens", tmp_path / "other")


def test_adult_packaged_and_fixture(tmp_path):
    frame, schema = read_frame("adult")
    assert frame.shape == (48842, 15) and schema.label == "income"
    assert frame["income"].sum() == 11687
    assert frame["workclass"].isna().sum() > 0 and "?" not in set(frame["workclass"].dropna())
    header = "age,workclass,fnlwgt,education,educational-num,marital-status,occupation,relationship,race,gender,capital-gain,capital-loss,hours-per-week,native-country,income"
    path = write(tmp_path / "adult.csv", header + """
        39, State-gov,77516,Bachelors,13,Never-married,Adm-clerical,Not-in-family,White,Male,2174,0,40,United-States,<=50K.
        50,?,83311,Bachelors,13,Married-civ-spouse,Exec-managerial,Husband,White,Male,0,0,13,United-States,>50K.
        """)
    frame, _ = read_frame("adult", path)
    assert frame["income"].tolist() == [0, 1]
    assert frame["workclass"].iloc[0] == "State-gov" and pd.isna(frame["workclass"].iloc[1])
    assert frame["capital-gain"].tolist() == [2174.0, 0.0]
    bad = write(tmp_path / "bad.csv", header + "\n39,x,1,B,13,N,A,N,W,M,0,0,40,US,maybe\n")
    with pytest.raises(ValueError, match=r"non-binary label 'maybe' .* line 2"):
        read_frame("adult", bad)


def test_csv_and_parquet_with_schema(tmp_path):
    schema_path = write(tmp_path / "schema.yaml", """
        label: y
        time_column: t
        positive: ["yes"]
        fields:
          - {name: x, kind: dense, transform: none}
          - {name: cat, kind: sparse}
          - {name: tags, kind: multi, separator: ";"}
        """)
    csv = write(tmp_path / "data.csv", """
        t,x,cat,tags,y,unused
        3,1.5,a,p;q,yes,0
        1,,b,,no,0
        2,-2,a,q,yes,0
        """)
    frame, schema = read_frame("csv", csv, schema=schema_path)
    assert sorted(frame.columns) == ["cat", "t", "tags", "x", "y"]
    assert frame["y"].tolist() == [1, 0, 1] and np.isnan(frame["x"].iloc[1])
    pq = tmp_path / "data.parquet"
    frame.assign(y=frame["y"].map({1: "yes", 0: "no"})).to_parquet(pq)
    pframe, _ = read_frame("parquet", pq, schema=schema_path, chunksize=2)
    pd.testing.assert_frame_equal(pframe.where(pframe.notna(), np.nan)[frame.columns], frame, check_dtype=False)
    with pytest.raises(ValueError, match="needs a schema"):
        read_frame("csv", csv)
    missing = write(tmp_path / "m.csv", "t,x,y\n1,2,yes\n")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['cat', 'tags'\]"):
        read_frame("csv", missing, schema=schema_path)
    binary = Schema("y", (FieldSpec("x", kind="dense"),))
    nonbinary = write(tmp_path / "nb.csv", "x,y\n1,0\n2,1\n3,0.5\n")
    with pytest.raises(ValueError, match=r"non-binary label '0.5' .* line 4"):
        read_frame("csv", nonbinary, schema=binary)
    too_many = write(tmp_path / "tm.csv", "x,y\n1,0\n2,1,7\n")
    with pytest.raises(ValueError, match=r"tm.csv.*line 3"):
        read_frame("csv", too_many, schema=binary)


# ------------------------------------------------------------------------------------------- preprocessing
def toy_frame(n: int = 200, seed: int = 0) -> tuple[pd.DataFrame, Schema]:
    rng = np.random.default_rng(seed)
    x = rng.exponential(10, n)
    x[rng.random(n) < 0.1] = np.nan
    cat = rng.choice(["a", "b", "c", "d", "rare"], size=n, p=[0.4, 0.3, 0.2, 0.095, 0.005]).astype(object)
    cat[rng.random(n) < 0.1] = None
    tags = np.array(["p|q", "q", "", None, "r|p|s", "s|s"], dtype=object)[rng.integers(0, 6, n)]
    frame = pd.DataFrame({
        "x": x, "xb": rng.normal(size=n), "cat": cat, "num": rng.integers(0, 50, n),
        "tags": tags, "y": rng.integers(0, 2, n).astype(np.int8),
    })
    schema = Schema("y", (
        FieldSpec("x", kind="dense", transform="log"),
        FieldSpec("cat", kind="sparse", min_count=3),
        FieldSpec("xb", kind="dense", transform="bucket", num_buckets=4),
        FieldSpec("tags", kind="multi"),
        FieldSpec("num", kind="sparse", hash_buckets=16),
    ))
    return frame, schema


def reference_batch(prep: Preprocessor, frame: pd.DataFrame, rows: list[int]):
    """Slow, per-row encoding and collation straight from the raw values and the fitted state."""
    dense, lengths, values = [], [], []
    spec = prep.feature_spec
    for r in rows:
        row = []
        for name in spec.dense:
            st, v = prep.states[name], frame[name].iloc[r]
            row.append(0.0 if pd.isna(v) else (float(dense_transform(np.array([v]), prep.schema[name].transform)[0]) - st["mean"]) / st["std"])
        dense.append(row)
    for feat in spec.sparse:
        st, f = prep.states[feat.name], prep.schema[feat.name]
        vocab = {v: i + 1 for i, v in enumerate(st.get("vocab", []))}
        for r in rows:
            v = frame[feat.name].iloc[r]
            if f.kind == "dense":  # bucketed
                ids = [0] if pd.isna(v) else [1 + sum(e <= v for e in st["edges"])]
            elif f.kind == "multi":
                tokens = [] if v is None or pd.isna(v) else [t for t in str(v).split(f.separator) if t]
                ids = [vocab.get(t, 0) for t in tokens]
            elif pd.isna(v):
                ids = [0]
            elif st["type"] == "hash":
                ids = [1 + int(pd.util.hash_array(np.array([str(v)], dtype=object))[0] % st["buckets"])]
            else:
                ids = [vocab.get(str(v), 0)]
            lengths.append(len(ids))
            values.extend(ids)
    labels = [float(frame[prep.schema.label].iloc[r]) for r in rows]
    return torch.tensor(dense, dtype=torch.float32).reshape(len(rows), -1), torch.tensor(lengths), torch.tensor(values), torch.tensor(labels)


def test_collation_equals_per_row_reference():
    frame, schema = toy_frame()
    prep = Preprocessor(schema).fit(frame.iloc[:150])
    encoded = prep.transform(frame)
    spec = prep.feature_spec
    assert spec.dense == ("x",) and spec.sparse_names == ("cat", "xb", "tags", "num")
    assert [f.multi_valued for f in spec.sparse] == [False, False, True, False]
    rows = [3, 0, 199, 57, 57, 120, 8]
    batch = encoded.batch(torch.tensor(rows))
    dense, lengths, values, labels = reference_batch(prep, frame, rows)
    torch.testing.assert_close(batch.dense, dense, rtol=1e-5, atol=1e-6)
    assert batch.sparse.keys() == list(spec.sparse_names)
    assert torch.equal(batch.sparse.lengths(), lengths.int()) and torch.equal(batch.sparse.values(), values)
    assert torch.equal(batch.labels, labels)
    # metadata the KJT was built with matches TorchRec's own computation
    ref = make_sparse(spec.sparse_names, lengths=lengths, values=values)
    assert batch.sparse.length_per_key() == ref.length_per_key()
    assert batch.sparse.offset_per_key() == ref.offset_per_key() and batch.sparse.stride() == len(rows)
    assert torch.equal(batch.sparse.offsets(), ref.offsets())


def test_preprocessor_vocab_oov_hash_and_buckets():
    frame, schema = toy_frame()
    prep = Preprocessor(schema).fit(frame)
    vocab = prep.states["cat"]["vocab"]
    counts = frame["cat"].value_counts()
    assert vocab == [v for v in counts.index if counts[v] >= 3]  # by decreasing count; "rare" dropped
    ids = prep.encode_field("cat", pd.Series(["a", "rare", None, "unseen", vocab[-1]]))
    assert ids.tolist() == [vocab.index("a") + 1, 0, 0, 0, len(vocab)]
    assert prep.states["num"] == {"type": "hash", "buckets": 16}
    assert prep.feature_spec.sparse[3].num_embeddings == 17
    edges = prep.states["xb"]["edges"]
    assert len(edges) == 3 and edges == sorted(edges)
    b = prep.encode_field("xb", pd.Series([-1e9, edges[0], 1e9, np.nan]))
    assert b.tolist() == [1, 2, 4, 0]
    z = prep.encode_field("x", frame["x"])
    present = ~frame["x"].isna().to_numpy()
    assert abs(float(z[present].mean())) < 1e-5 and abs(float(z[present].std()) - 1) < 1e-4 and np.all(z[~present] == 0)
    auto = Preprocessor(Schema("y", (FieldSpec("num"),)), hash_threshold=10).fit(frame)
    assert auto.states["num"] == {"type": "hash", "buckets": 10}
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['tags'\]"):
        prep.transform(frame.drop(columns=["tags"]))
    with pytest.raises(ValueError, match="non-binary label 2"):
        prep.transform(frame.assign(y=2))


def test_hash_ids_are_stable_across_processes():
    code = "import numpy as np, pandas as pd; print(pd.util.hash_array(np.array(['a', 'zz', '12'], dtype=object)).tolist())"
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout for _ in range(2)}
    assert len(outs) == 1
    assert eval(outs.pop()) == pd.util.hash_array(np.array(["a", "zz", "12"], dtype=object)).tolist()


def test_preprocessor_save_load_round_trip(tmp_path):
    frame, schema = toy_frame()
    prep = Preprocessor(schema, min_count=2).fit(frame.iloc[:100])
    for name in ("prep.json", "prep.json.gz"):
        prep.save(tmp_path / name)
        loaded = Preprocessor.load(tmp_path / name)
        assert loaded.state_dict() == prep.state_dict() and loaded.feature_spec == prep.feature_spec
        a, b = prep.transform(frame).batch(torch.arange(200)), loaded.transform(frame).batch(torch.arange(200))
        assert torch.equal(a.dense, b.dense) and torch.equal(a.labels, b.labels)
        assert torch.equal(a.sparse.values(), b.sparse.values()) and torch.equal(a.sparse.lengths(), b.sparse.lengths())
    assert not list(tmp_path.glob("*.tmp"))
    kept = prep.select(["tags", "x"])
    assert kept.feature_spec.names == ("x", "tags")
    full = prep.transform(frame)
    sub = kept.transform(frame[["x", "tags", "y"]])
    assert torch.equal(sub.dense, full.dense) and torch.equal(sub.multi["tags"][1], full.multi["tags"][1])
    with pytest.raises(KeyError, match="nope"):
        prep.select(["nope"])
    with pytest.raises(RuntimeError, match="not fitted"):
        Preprocessor(schema).transform(frame)


# ------------------------------------------------------------------------------------------- splits
def test_splits_reproducible_and_chronological():
    a, b, c = (split_indices(1000, 0.1, 0.2, seed=s) for s in (0, 0, 1))
    assert all(np.array_equal(getattr(a, k), getattr(b, k)) for k in ("train", "val", "test"))
    assert not np.array_equal(a.test, c.test)
    assert (len(a.train), len(a.val), len(a.test)) == (700, 100, 200)
    assert np.array_equal(np.sort(np.concatenate([a.train, a.val, a.test])), np.arange(1000))
    time = np.random.default_rng(0).integers(0, 50, 1000)  # many ties
    s = split_indices(1000, 0.1, 0.2, kind="chronological", time=time)
    assert time[s.train].max() <= time[s.val].min() and time[s.val].max() <= time[s.test].min()
    assert np.array_equal(np.sort(np.concatenate([s.train, s.val, s.test])), np.arange(1000))
    pre, fine = train_subsets(a.train, 0.2, seed=3)
    assert len(pre) == 140 and len(np.intersect1d(pre, fine)) == 0
    assert np.array_equal(np.sort(np.concatenate([pre, fine])), a.train)
    assert np.array_equal(train_subsets(a.train, 0.2, seed=3)[0], pre)
    with pytest.raises(ValueError, match="needs a time column"):
        split_indices(10, kind="chronological")
    seq = split_indices(10, 0.2, 0.3, kind="sequential")
    assert seq.train.tolist() == [0, 1, 2, 3, 4] and seq.val.tolist() == [5, 6] and seq.test.tolist() == [7, 8, 9]


# ------------------------------------------------------------------------------------------- synthetic
def test_synthetic_shapes_and_determinism(tmp_path):
    gen = SyntheticCTR(num_rows=3000, num_dense=4, num_sparse=7, cardinality=[5, 10, 20, 30, 40, 50, 60], seed=5)
    a, b = gen.generate(), gen.generate()
    pd.testing.assert_frame_equal(a, b)
    assert list(a.columns) == ["label", "I1", "I2", "I3", "I4"] + [f"C{i}" for i in range(1, 8)]
    assert set(a["label"].unique()) == {0, 1} and 0.1 < a["label"].mean() < 0.4
    assert int(a["C1"].max()) < 5 and int(a["C7"].max()) < 60
    other = SyntheticCTR(num_rows=3000, num_dense=4, num_sparse=7, cardinality=[5, 10, 20, 30, 40, 50, 60], seed=6)
    assert not other.generate()["label"].equals(a["label"])
    assert len(gen.informative_fields) == 6
    fixed = SyntheticCTR(num_rows=500, seed=1, informative=["C3", "I2"])
    assert fixed.informative_fields == ("I2", "C3")
    df = fixed.generate()
    frame, _ = read_frame("criteo", fixed.write_criteo_tsv(tmp_path / "c.tsv", df))
    np.testing.assert_allclose(fixed.logit(frame), fixed.logit(df))
    assert frame["label"].tolist() == df["label"].tolist()
    with pytest.raises(KeyError, match="C99"):
        SyntheticCTR(informative=["C99"])


def test_synthetic_label_depends_only_on_informative_fields():
    gen = SyntheticCTR(num_rows=20_000, seed=0)
    frame = gen.generate()
    assert abs(frame["label"].mean() - gen.base_rate) < 0.02  # the bias is fitted on a pilot draw
    informative = list(gen.informative_fields)
    noise = [c for c in gen.field_names if c not in informative]
    # the generating logit ignores the noise columns: replace them all with another draw's
    swapped = frame.copy()
    swapped[noise] = SyntheticCTR(num_rows=20_000, seed=9).generate()[noise].to_numpy()
    np.testing.assert_array_equal(gen.logit(swapped), gen.logit(frame))
    changed = frame.copy()
    changed[informative[-1]] = changed[informative[-1]].sample(frac=1.0, random_state=0).to_numpy()
    assert not np.allclose(gen.logit(changed), gen.logit(frame))
    # and a quick model sees it: informative fields alone are as good as all fields, noise alone is chance
    prep = Preprocessor(gen.schema).fit(frame.iloc[:15000])
    enc = prep.transform(frame)
    auc = {name: quick_naive_bayes_auc(enc, names) for name, names in
           (("all", list(gen.field_names)), ("informative", informative), ("noise", noise))}
    assert auc["informative"] > 0.75
    assert auc["informative"] >= auc["all"] - 0.01
    assert auc["noise"] < 0.56


def quick_naive_bayes_auc(enc, names: list[str], n_train: int = 15000) -> float:
    """Held-out AUC (rows ``n_train``..) of naive Bayes: the sum of per-field smoothed log-odds of each id
    (dense columns cut at their training deciles), counted on the first ``n_train`` rows. Closed form."""
    y = enc.labels.numpy()
    columns = []
    for j, name in enumerate(enc.spec.dense):
        if name in names:
            x = enc.dense[:, j].numpy()
            columns.append(np.digitize(x, np.unique(np.quantile(x[:n_train], np.linspace(0.1, 0.9, 9)))))
    for j, feat in enumerate(f for f in enc.spec.sparse if not f.multi_valued):
        if feat.name in names:
            columns.append(enc.sparse[:, j].numpy())
    base = np.log((y[:n_train].sum() + 1) / (n_train - y[:n_train].sum() + 1))
    score = np.zeros(len(y))
    for ids in columns:
        pos = np.bincount(ids[:n_train], weights=y[:n_train], minlength=ids.max() + 1)
        tot = np.bincount(ids[:n_train], minlength=ids.max() + 1)
        score += np.log((pos + 1) / (tot - pos + 1))[ids] - base
    ranks = pd.Series(score[n_train:]).rank().to_numpy()
    pos_te = y[n_train:] == 1
    return float((ranks[pos_te].sum() - pos_te.sum() * (pos_te.sum() + 1) / 2) / (pos_te.sum() * (~pos_te).sum()))


# ------------------------------------------------------------------------------------------- datamodule
def test_datamodule_stages_cover_train_split_and_loaders():
    dm = CTRDataModule(format="synthetic", synthetic_rows=4000, subset="pretrain", batch_size=256,
                       eval_batch_size=1000, pretrain_fraction=0.25, seed=3)
    dm.setup("fit")
    assert dm.num_train_samples == 800  # 0.25 of the 3200 training rows
    fine = dm.for_subset("finetune")
    fine.setup("fit")
    assert fine.preprocessor is dm.preprocessor
    pre_rows, fine_rows = dm.train_indices, fine.train_indices
    assert len(np.intersect1d(pre_rows, fine_rows)) == 0
    assert np.array_equal(np.sort(np.concatenate([pre_rows, fine_rows])), dm.splits.train)
    assert np.array_equal(fine.splits.val, dm.splits.val) and np.array_equal(fine.splits.test, dm.splits.test)
    loader = dm.train_dataloader()
    positions = list(loader.sampler)  # one epoch of index batches
    rows = loader.dataset.indices[torch.cat(positions)]
    assert sorted(rows.tolist()) == pre_rows.tolist()  # every pretrain row once per epoch
    batches = list(loader)  # the next epoch: a new permutation
    assert [len(b) for b in batches] == [256, 256, 256, 32]
    first = dm.encoded.batch(loader.dataset.indices[positions[0]])
    assert not torch.equal(batches[0].labels, first.labels) or not torch.equal(batches[0].dense, first.dense)
    again = CTRDataModule(format="synthetic", synthetic_rows=4000, subset="pretrain", batch_size=256, seed=3,
                          pretrain_fraction=0.25)
    again.setup()
    assert torch.equal(next(iter(again.train_dataloader())).dense, first.dense)  # same seed, same first epoch
    val = list(dm.val_dataloader())
    assert [len(b) for b in val] == [400] and torch.equal(val[0].labels, dm.encoded.labels[torch.as_tensor(dm.splits.val)])
    assert val[0].sparse.keys() == list(dm.feature_spec.sparse_names)


def test_datamodule_kept_fields_reuse_vocabulary(tmp_path):
    dm = CTRDataModule(format="adult", batch_size=512, max_rows=5000)
    dm.setup()
    path = tmp_path / "prep.json"
    dm.preprocessor.save(path)
    keep = ["age", "education", "occupation"]
    stage3 = CTRDataModule(format="adult", batch_size=512, max_rows=5000, subset="finetune", fields=keep,
                           preprocessor=str(path))
    stage3.setup()
    assert stage3.feature_spec == dm.feature_spec.select(keep)
    assert set(stage3.encoded.spec.names) == set(keep)
    full = dm.val_dataloader().dataset[torch.arange(50)]
    kept = stage3.val_dataloader().dataset[torch.arange(50)]
    assert torch.equal(kept.dense[:, 0], full.dense[:, 0])
    for name in ("education", "occupation"):
        assert torch.equal(kept.sparse[name].values(), full.sparse[name].values())
    with pytest.raises(KeyError, match="salary"):
        CTRDataModule(format="adult", max_rows=500, fields=["age", "salary"]).setup()


def test_datamodule_state_dict_and_chronological(tmp_path):
    root = ml100k_dir(tmp_path / "ml")
    dm = CTRDataModule(format="movielens", path=str(root), split="chronological", val_fraction=0.25,
                       test_fraction=0.25, batch_size=2)
    dm.setup()
    times = pd.Series([100, 300, 200, 50])  # u.data timestamps, in file order
    assert list(dm.splits.test) == [1] and list(dm.splits.val) == [2] and sorted(dm.splits.train) == [0, 3]
    assert times[dm.splits.train].max() <= times[dm.splits.val].min()
    state = dm.state_dict()
    other = CTRDataModule(format="movielens", path=str(root), split="chronological", val_fraction=0.25,
                          test_fraction=0.25, batch_size=2, min_count=5)  # would fit an all-OOV vocabulary
    other.setup()
    other.load_state_dict(state)
    assert other.preprocessor.state_dict() == dm.preprocessor.state_dict()
    a = dm.train_dataloader().dataset[torch.arange(2)]
    b = other.train_dataloader().dataset[torch.arange(2)]
    assert torch.equal(a.sparse.values(), b.sparse.values()) and torch.equal(a.sparse.lengths(), b.sparse.lengths())
    with pytest.raises(ValueError, match="needs a time column"):
        CTRDataModule(format="adult", split="chronological", max_rows=100).setup()
    with pytest.raises(ValueError, match="unknown data format"):
        CTRDataModule(format="svmlight")


def test_field_count_check_with_quotes(tmp_path):
    path = write(tmp_path / "q.csv", 'a,b,y\n"x, with comma",1,0\n"multi\nline ""q""",2,1\nplain,3,0,extra\n')
    with pytest.raises(ValueError, match="line 5: it has 4 fields"):
        check_field_counts(path, ",", skip_lines=1, quote='"', block_bytes=4)
    ok = write(tmp_path / "ok.csv", 'a,b,y\n"x, with comma",1,0\n"multi\nline ""q""",2,1\n')
    frame, _ = read_frame("csv", ok, schema=Schema("y", (FieldSpec("a"), FieldSpec("b", kind="dense"))))
    assert frame["a"].tolist() == ["x, with comma", 'multi\nline "q"'] and frame["y"].tolist() == [0, 1]


class _TinyCTRModel:
    """A LightningModule factory (Lightning imported lazily): linear model on dense + per-id weights."""

    @staticmethod
    def build(spec):
        import lightning as L
        from torchrec.modules.embedding_configs import EmbeddingBagConfig
        from torchrec.modules.embedding_modules import EmbeddingBagCollection

        class Tiny(L.LightningModule):
            def __init__(self):
                super().__init__()
                self.ebc = EmbeddingBagCollection(tables=[
                    EmbeddingBagConfig(num_embeddings=f.num_embeddings, embedding_dim=2, name=f"t_{f.name}",
                                       feature_names=[f.name]) for f in spec.sparse])
                self.head = torch.nn.Linear(len(spec.dense) + 2 * len(spec.sparse), 1)

            def training_step(self, batch, _):
                x = torch.cat([batch.dense, self.ebc(batch.sparse).values()], 1)
                loss = torch.nn.functional.binary_cross_entropy_with_logits(self.head(x).squeeze(1), batch.labels)
                self.log("loss", loss, batch_size=len(batch))
                return loss

            validation_step = training_step

            def configure_optimizers(self):
                return torch.optim.Adam(self.parameters(), 1e-2)

        return Tiny()


def test_lightning_fit_checkpoint_carries_preprocessor(tmp_path):
    import lightning as L

    kwargs = dict(format="synthetic", synthetic_rows=3000, synthetic_sparse=5, synthetic_dense=3,
                  synthetic_num_informative=2, batch_size=512)
    dm = CTRDataModule(**kwargs)
    dm.setup()
    trainer = L.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu", default_root_dir=tmp_path)
    trainer.fit(_TinyCTRModel.build(dm.feature_spec), datamodule=dm)
    assert trainer.global_step == math.ceil(2400 / 512)
    ckpt_path = trainer.checkpoint_callback.best_model_path
    ckpt = torch.load(ckpt_path, weights_only=False)
    assert ckpt["CTRDataModule"]["preprocessor"] == dm.preprocessor.state_dict()
    fresh = CTRDataModule(**{**kwargs, "min_count": 10_000})  # alone, it would map everything to OOV
    model = _TinyCTRModel.build(dm.feature_spec)
    L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu").validate(
        model, datamodule=fresh, ckpt_path=ckpt_path, verbose=False)
    assert fresh.preprocessor.state_dict() == dm.preprocessor.state_dict()
    assert torch.equal(fresh.encoded.sparse, dm.encoded.sparse)


def test_datamodule_arguments_parse_from_command_line():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(CTRDataModule, "data")
    cfg = parser.parse_args(["--data.format", "criteo", "--data.path", "train.txt", "--data.fields", "[I1, C3]",
                             "--data.subset", "finetune", "--data.pretrain_fraction", "0.3"])
    dm = CTRDataModule(**cfg.data.as_dict())
    assert dm.hparams.fields == ["I1", "C3"] and dm.subset == "finetune" and dm.hparams.path == "train.txt"
    with pytest.raises(Exception, match="subset"):
        parser.parse_args(["--data.subset", "warmup"])
    # the flag's old name still works, with a deprecation warning
    old = parser.parse_args(["--data.format", "criteo", "--data.stage", "finetune"])
    with pytest.warns(DeprecationWarning, match="subset"):
        assert CTRDataModule(**old.data.as_dict()).subset == "finetune"
    with pytest.raises(Exception, match="stage"):
        parser.parse_args(["--data.stage", "warmup"])


def test_index_batches_epochs_and_rank_shards():
    sampler = IndexBatches(103, 10, shuffle=True, seed=4)
    first, second = torch.cat(list(sampler)), torch.cat(list(sampler))  # epochs 0 and 1 (counted)
    assert sorted(first.tolist()) == list(range(103)) and not torch.equal(first, second)
    sampler.set_epoch(0)
    assert torch.equal(torch.cat(list(sampler)), first)  # Lightning's set_epoch makes epochs reproducible
    shards = [IndexBatches(103, 10, shuffle=True, seed=4, num_replicas=3, rank=r) for r in range(3)]
    for s in shards:
        s.set_epoch(5)
    rows = [torch.cat(list(s)) for s in shards]
    assert [len(s) for s in shards] == [4, 4, 4] and [len(r) for r in rows] == [34, 34, 34]
    assert len(set(torch.cat(rows).tolist())) == 102  # disjoint; one remainder row dropped this epoch
    evals = [torch.cat(list(IndexBatches(103, 10, shuffle=False, num_replicas=3, rank=r))) for r in range(3)]
    assert sorted(torch.cat(evals).tolist()) == list(range(103))


def test_builtin_format_schema_override(criteo_file):
    schema = Schema("label", (FieldSpec("I2", kind="dense", transform="bucket", num_buckets=2), FieldSpec("C1", min_count=2)))
    frame, got = read_frame("criteo", criteo_file, schema=schema)
    assert got == schema and sorted(frame.columns) == ["C1", "I2", "label"]
    prep = Preprocessor(got).fit(frame)
    assert prep.feature_spec.dense == () and prep.feature_spec.sparse_names == ("I2", "C1")
    assert prep.states["C1"]["vocab"] == ["68fd1e64"]  # seen twice; "05db9164" once
    with pytest.raises(ValueError, match="must keep label 'label'"):
        read_frame("criteo", criteo_file, schema=Schema("y", (FieldSpec("C1"),)))
    with pytest.raises(KeyError, match="C77"):
        read_frame("criteo", criteo_file, schema=Schema("label", (FieldSpec("C77"),)))


def test_datamodule_parquet_list_valued_field_matches_csv_strings(tmp_path):
    rng = np.random.default_rng(0)
    n = 300
    tag_lists = [list(rng.choice(["a", "b", "c", "d"], size=k, replace=False)) for k in rng.integers(0, 4, n)]
    frame = pd.DataFrame({"x": rng.normal(size=n), "u": rng.integers(0, 9, n).astype(str),
                          "tags": tag_lists, "y": rng.integers(0, 2, n)})
    frame.to_parquet(tmp_path / "d.parquet")
    frame.assign(tags=["|".join(t) for t in tag_lists]).to_csv(tmp_path / "d.csv", index=False)
    write(tmp_path / "s.yaml", """
        label: y
        fields: [{name: x, kind: dense}, u, {name: tags, kind: multi}]
        """)
    loaders = []
    for fmt in ("parquet", "csv"):
        dm = CTRDataModule(format=fmt, path=str(tmp_path / f"d.{fmt}"), schema=str(tmp_path / "s.yaml"), batch_size=64)
        dm.setup()
        loaders.append(list(dm.val_dataloader()))
    for a, b in zip(*loaders):
        assert torch.equal(a.sparse.values(), b.sparse.values()) and torch.equal(a.sparse.lengths(), b.sparse.lengths())
        torch.testing.assert_close(a.dense, b.dense)
    assert loaders[0][0].sparse["tags"].lengths().sum() > 0
