"""The preprocessor and batch collation."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from lightfmp.data import FieldSpec, Preprocessor, Schema
from lightfmp.data.preprocess import dense_transform
from lightfmp.inputs import make_sparse


def toy_frame(n: int = 200, seed: int = 0) -> tuple[pd.DataFrame, Schema]:
    rng = np.random.default_rng(seed)
    x = rng.exponential(10, n)
    x[rng.random(n) < 0.1] = np.nan
    cat = rng.choice(["a", "b", "c", "d", "rare"], size=n, p=[0.4, 0.3, 0.2, 0.095, 0.005]).astype(object)
    cat[rng.random(n) < 0.1] = None
    tags = np.array(["p|q", "q", "", None, "r|p|s", "s|s"], dtype=object)[rng.integers(0, 6, n)]
    frame = pd.DataFrame(
        {
            "x": x,
            "xb": rng.normal(size=n),
            "cat": cat,
            "num": rng.integers(0, 50, n),
            "tags": tags,
            "y": rng.integers(0, 2, n).astype(np.int8),
        }
    )
    schema = Schema(
        "y",
        (
            FieldSpec("x", kind="dense", transform="log"),
            FieldSpec("cat", kind="sparse", min_count=3),
            FieldSpec("xb", kind="dense", transform="bucket", num_buckets=4),
            FieldSpec("tags", kind="multi"),
            FieldSpec("num", kind="sparse", hash_buckets=16),
        ),
    )
    return frame, schema


def reference_batch(prep: Preprocessor, frame: pd.DataFrame, rows: list[int]):
    """Slow, per-row encoding and collation straight from the raw values and the fitted state."""
    dense, lengths, values = [], [], []
    spec = prep.feature_spec
    for r in rows:
        row = []
        for name in spec.dense:
            st, v = prep.states[name], frame[name].iloc[r]
            row.append(
                0.0
                if pd.isna(v)
                else (float(dense_transform(np.array([v]), prep.schema[name].transform)[0]) - st["mean"]) / st["std"]
            )
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
    return (
        torch.tensor(dense, dtype=torch.float32).reshape(len(rows), -1),
        torch.tensor(lengths),
        torch.tensor(values),
        torch.tensor(labels),
    )


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
    code = (
        "import numpy as np, pandas as pd; "
        "print(pd.util.hash_array(np.array(['a', 'zz', '12'], dtype=object)).tolist())"
    )
    outs = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        for _ in range(2)
    }
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
