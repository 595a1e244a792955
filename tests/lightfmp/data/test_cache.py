"""The on-disk cache (lightfmp.data.cache, lightfmp.data.streaming): equal to the in-memory encoding, reused while
the file and options match, rebuilt when they change, never half-built, and built holding one chunk at a time."""

from __future__ import annotations

import gc
import gzip
import json
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

import lightfmp.data.datamodule as datamodule_module
from lightfmp.data.cache import NpyWriter, build_once, load_column
from lightfmp.data.datamodule import CTRDataModule
from lightfmp.data.formats import Chunks, iter_frames
from lightfmp.data.preprocess import Preprocessor
from lightfmp.data.schema import FieldSpec, Schema
from lightfmp.data.splits import train_subsets
from lightfmp.data.streaming import fit_streaming, ingest
from tests.lightfmp.data.files import criteo_line, write


def criteo_rows(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        dense = [("" if rng.random() < 0.2 else int(rng.integers(-3, 500))) for _ in range(13)]
        sparse = [("" if rng.random() < 0.1 else f"{int(rng.integers(0, 5 + 7 * j)):x}") for j in range(26)]
        rows.append(criteo_line(int(rng.random() < 0.3), dense, sparse))
    return rows


@pytest.fixture
def big_criteo(tmp_path) -> Path:
    return write(tmp_path / "train.txt", "\n".join(criteo_rows(600)) + "\n")


def same_rows(a: CTRDataModule, b: CTRDataModule) -> None:
    """Same splits, subsets, fitted state (dense statistics to rounding) and encoded rows."""
    assert a.splits is not None and b.splits is not None
    for x, y in zip((a.splits.train, a.splits.val, a.splits.test), (b.splits.train, b.splits.val, b.splits.test)):
        assert np.array_equal(x, y)
    if a.subset == b.subset:
        assert np.array_equal(a.train_indices, b.train_indices)
    assert a.preprocessor is not None and b.preprocessor is not None
    for name, state in a.preprocessor.states.items():
        other = b.preprocessor.states[name]
        if state["type"] == "dense":
            assert state["mean"] == pytest.approx(other["mean"], rel=1e-12, abs=1e-12)
            assert state["std"] == pytest.approx(other["std"], rel=1e-12)
        else:
            assert state == other, name
    assert a.encoded is not None and b.encoded is not None
    rows = torch.arange(len(a.encoded))
    x, y = a.encoded.batch(rows), b.encoded.batch(rows)
    torch.testing.assert_close(x.dense, y.dense, atol=1e-6, rtol=0)
    assert x.sparse.keys() == y.sparse.keys()
    assert torch.equal(x.sparse.values(), y.sparse.values()) and torch.equal(x.sparse.lengths(), y.sparse.lengths())
    assert x.sparse.values().dtype == y.sparse.values().dtype == torch.long
    assert torch.equal(x.labels, y.labels) and y.labels.dtype == torch.float32


@pytest.mark.parametrize("gz", [False, True], ids=["tsv", "gzip"])
@pytest.mark.parametrize("options", [{}, {"min_count": 2}, {"hash_threshold": 20}], ids=["plain", "min2", "hash"])
def test_cached_criteo_equals_in_memory(tmp_path, big_criteo, gz, options):
    path = big_criteo
    if gz:
        path = tmp_path / "train.txt.gz"
        path.write_bytes(gzip.compress(big_criteo.read_bytes()))
    common = dict(format="criteo", path=str(path), chunksize=128, pretrain_fraction=0.3, **options)
    memory = CTRDataModule(**common)
    cached = CTRDataModule(**common, cache_dir=str(tmp_path / "cache"), progress=False)
    memory.setup()
    cached.setup()
    same_rows(memory, cached)


def test_cached_table_with_multi_valued_and_bucket_fields_equals_in_memory(tmp_path):
    rng = np.random.default_rng(1)
    n = 500
    tags = ["|".join(rng.choice(list("abcdefg"), size=k, replace=False)) for k in rng.integers(0, 4, n)]
    frame = pd.DataFrame(
        {
            "x": np.where(rng.random(n) < 0.1, np.nan, rng.normal(size=n)),
            "age": rng.integers(0, 90, n).astype(float),
            "u": rng.integers(0, 30, n).astype(str),
            "tags": tags,
            "t": rng.permutation(n),
            "y": rng.integers(0, 2, n),
        }
    )
    frame.to_csv(tmp_path / "d.csv", index=False)
    write(
        tmp_path / "s.yaml",
        """
        label: y
        time_column: t
        fields:
          - {name: x, kind: dense, transform: none}
          - {name: age, kind: dense, transform: bucket, num_buckets: 7}
          - {name: u, kind: sparse, min_count: 3}
          - {name: tags, kind: multi}
        """,
    )
    for split in ("random", "chronological"):
        common = dict(format="csv", path=str(tmp_path / "d.csv"), schema=str(tmp_path / "s.yaml"), split=split)
        memory = CTRDataModule(**common, chunksize=77)
        cached = CTRDataModule(**common, chunksize=77, cache_dir=str(tmp_path / "cache"), progress=False)
        memory.setup()
        cached.setup()
        same_rows(memory, cached)
        assert cached.encoded is not None and cached.encoded.multi["tags"][1].numel() > 0


def test_cached_avazu_chronological_equals_in_memory(tmp_path):
    rng = np.random.default_rng(2)
    lines = ["id,click,hour,C1,site_id"]
    for i in range(300):
        hour = f"1410{21 + int(rng.integers(0, 9)):02d}{int(rng.integers(0, 24)):02d}"
        lines.append(
            f"{i},{int(rng.integers(0, 2))},{hour},{int(rng.integers(1000, 1010))},s{int(rng.integers(0, 40))}"
        )
    path = write(tmp_path / "avazu.csv", "\n".join(lines) + "\n")
    common = dict(format="avazu", path=str(path), split="chronological", chunksize=50)
    memory, cached = CTRDataModule(**common), CTRDataModule(**common, cache_dir=str(tmp_path / "c"), progress=False)
    memory.setup()
    cached.setup()
    same_rows(memory, cached)


def test_cache_reused_when_file_and_options_match(tmp_path, big_criteo, monkeypatch):
    common = dict(format="criteo", path=str(big_criteo), cache_dir=str(tmp_path / "cache"), progress=False)
    first = CTRDataModule(**common)
    first.setup()

    def refuse(*args, **kwargs):
        raise AssertionError("the cache should have been reused")

    monkeypatch.setattr(datamodule_module, "ingest", refuse)
    monkeypatch.setattr(datamodule_module, "fit_streaming", refuse)
    monkeypatch.setattr(datamodule_module, "encode_streaming", refuse)
    again = CTRDataModule(**common, subset="pretrain")  # the subset is not part of the cache
    again.setup()
    same_rows(first, again)
    # a moved copy of the file is the same data
    copy = tmp_path / "moved.txt"
    copy.write_bytes(big_criteo.read_bytes())
    CTRDataModule(**{**common, "path": str(copy)}).setup()


def test_cache_rebuilt_when_file_or_options_change(tmp_path, big_criteo):
    cache = tmp_path / "cache"
    common = dict(format="criteo", path=str(big_criteo), cache_dir=str(cache), progress=False)
    CTRDataModule(**common).setup()
    sources = sorted(p.name for p in cache.iterdir() if p.is_dir())
    assert len(sources) == 1
    root = cache / sources[0]
    assert len(list(root.glob("fit-*"))) == 1 and len(list(root.glob("encoded-*"))) == 1
    # other preprocessing options: same raw columns, a new fit and encoding
    CTRDataModule(**common, min_count=2).setup()
    CTRDataModule(**common, seed=3).setup()
    assert len(list(root.glob("fit-*"))) == 3 and len(list(root.glob("encoded-*"))) == 3
    # fewer fields with the stage-1 vocabularies (the finetune stage): a new encoding, no new fit
    full = CTRDataModule(**common)
    full.setup()
    part = full.for_subset("finetune", fields=["I1", "C2"])
    part.setup()
    assert len(list(root.glob("fit-*"))) == 3 and len(list(root.glob("encoded-*"))) == 4
    assert part.encoded is not None and part.feature_spec.names == ("I1", "C2")
    # another max_rows or a changed file: new raw columns
    CTRDataModule(**common, max_rows=300).setup()
    big_criteo.write_text("\n".join(criteo_rows(600, seed=9)) + "\n")
    changed = CTRDataModule(**common)
    changed.setup()
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 3
    memory = CTRDataModule(format="criteo", path=str(big_criteo))
    memory.setup()
    same_rows(memory, changed)


_KILLED_BUILD = """
import os, signal, sys
import lightfmp.data.datamodule as dm_module
from lightfmp.data.datamodule import CTRDataModule

real = dm_module.iter_frames

def dying(*args, **kwargs):
    chunks = real(*args, **kwargs)
    source = chunks.frames
    def frames():
        for i, frame in enumerate(source):
            if i == 2:
                os.kill(os.getpid(), signal.SIGKILL)
            yield frame
    chunks.frames = frames()
    return chunks

dm_module.iter_frames = dying
CTRDataModule(format="criteo", path=sys.argv[1], cache_dir=sys.argv[2], chunksize=100, progress=False).setup()
"""


def test_killed_build_leaves_no_valid_looking_cache(tmp_path, big_criteo):
    cache = tmp_path / "cache"
    proc = subprocess.run([sys.executable, "-c", _KILLED_BUILD, str(big_criteo), str(cache)], capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    dirs = [p.name for p in cache.iterdir() if p.is_dir()]
    assert dirs and all(".tmp-" in d for d in dirs)  # only the unfinished build, under a name never opened
    dm = CTRDataModule(format="criteo", path=str(big_criteo), cache_dir=str(cache), progress=False)
    dm.setup()
    dirs = [p.name for p in cache.iterdir() if p.is_dir()]
    assert len(dirs) == 1 and ".tmp-" not in dirs[0]  # rebuilt; the leftover removed
    memory = CTRDataModule(format="criteo", path=str(big_criteo))
    memory.setup()
    same_rows(memory, dm)


def test_build_once_builds_once_for_concurrent_callers(tmp_path):
    calls = []

    def build(out: Path) -> None:
        calls.append(out)
        time.sleep(0.2)
        (out / "done").write_text("x")

    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(build_once(tmp_path / "c", build, tmp_path / "c.lock")))
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and results == [tmp_path / "c"] * 3 and (tmp_path / "c" / "done").is_file()


def test_ingest_holds_one_chunk_at_a_time(tmp_path, big_criteo):
    """When the reader reads a chunk, ingest holds none of the previous ones (it drops each once written): the
    pass never holds more than the chunk being read, whatever the file's length."""
    source = iter_frames("criteo", big_criteo, chunksize=50)
    refs: list[weakref.ref] = []
    held = []

    def frames():
        for frame in source.frames:
            gc.collect()
            held.append(sum(len(f) for f in (r() for r in refs) if f is not None))
            refs.append(weakref.ref(frame))
            del frame  # this generator's own reference: yielded below, then only ingest's
            yield refs[-1]()

    out = tmp_path / "raw"
    out.mkdir()
    ingest(Chunks(source.schema, source.rows, frames()), out, progress=False)
    assert len(held) == 12 and max(held) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["rows"] == 600 and load_column(out / "dense.npy").shape == (600, 13)


def test_streaming_fit_quantiles_exact_then_sampled(tmp_path):
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"v": rng.lognormal(size=4000), "y": rng.integers(0, 2, 4000).astype(np.int8)})
    schema = Schema(label="y", fields=(FieldSpec("v", kind="dense", transform="bucket", num_buckets=10),))
    out = tmp_path / "raw"
    out.mkdir()
    ingest(Chunks(schema, len(frame), iter([frame.iloc[:1500], frame.iloc[1500:]])), out, progress=False)
    from lightfmp.data.cache import RawColumns

    raw = RawColumns(out)
    train = np.arange(0, 4000, 2)
    exact = fit_streaming(raw, schema, train).states["v"]["edges"]
    assert exact == Preprocessor(schema).fit(frame.iloc[train]).states["v"]["edges"]
    sampled = fit_streaming(raw, schema, train, quantile_values=500).states["v"]["edges"]
    assert sampled != exact
    # a sample of ~500 values: each edge's rank in the training values within a few standard errors
    ranks = np.searchsorted(np.sort(frame["v"].to_numpy()[train]), sampled) / len(train)
    assert np.abs(ranks - np.arange(1, 10) / 10).max() < 0.08


def test_npy_writer_appends_blocks(tmp_path):
    writer = NpyWriter(tmp_path / "a.npy", np.float32, (3,))
    writer.append(np.ones((2, 3)))
    writer.append(np.zeros((4, 3)))
    writer.close()
    a = np.load(tmp_path / "a.npy")
    assert a.shape == (6, 3) and a.dtype == np.float32 and a[:2].sum() == 6
    with pytest.raises(ValueError, match="rows of"):
        NpyWriter(tmp_path / "b.npy", np.int32).append(np.zeros((2, 2)))


def test_pretrain_rows_is_a_seeded_random_sample(tmp_path, big_criteo):
    train = np.arange(100, 600)
    pre, fine = train_subsets(train, 0.2, seed=0, pretrain_rows=40)
    assert len(pre) == 40 and len(fine) == 460 and not np.array_equal(pre, train[:40])
    assert np.array_equal(pre, train_subsets(train, 0.9, seed=0, pretrain_rows=40)[0])
    assert len(train_subsets(train, 0.2, pretrain_rows=10_000)[0]) == 500
    dm = CTRDataModule(format="criteo", path=str(big_criteo), subset="pretrain", pretrain_rows=33)
    dm.setup()
    assert dm.num_train_samples == 33
    with pytest.raises(ValueError, match="pretrain_rows must be >= 1, got 0"):
        CTRDataModule(pretrain_rows=0)
    with pytest.raises(ValueError, match="synthetic"):
        CTRDataModule(format="synthetic", cache_dir=str(tmp_path))


def test_preprocess_command_builds_the_cache(tmp_path, big_criteo, capsys):
    from lightfmp.cli import run_cli

    cache = tmp_path / "cache"
    args = ["--data.format", "criteo", "--data.path", str(big_criteo), "--data.cache_dir", str(cache)]
    run_cli(["preprocess", *args, "--quiet", "true"])
    roots = [p for p in cache.iterdir() if p.is_dir()]
    assert len(roots) == 1 and list(roots[0].glob("encoded-*"))
    with pytest.raises(ValueError, match="cache_dir"):
        run_cli(["preprocess", "--data.format", "criteo", "--data.path", str(big_criteo)])


@pytest.mark.parametrize("bad", ["abc", "1.5.2"])
def test_arrow_engine_falls_back_to_pandas_errors(tmp_path, bad):
    rows = criteo_rows(300)
    fields = rows[203].split("\t")
    fields[3] = bad
    rows[203] = "\t".join(fields)
    path = write(tmp_path / "bad.txt", "\n".join(rows) + "\n")
    chunks = iter_frames("criteo", path, chunksize=64, engine="arrow")
    with pytest.raises(ValueError, match=f"malformed value '{bad}' in numeric field 'I3' .* at line 204"):
        list(chunks.frames)
    with pytest.raises(ValueError, match="line 204"):
        CTRDataModule(format="criteo", path=str(path), cache_dir=str(tmp_path / "c"), progress=False).setup()
    assert not [p for p in (tmp_path / "c").iterdir() if p.is_dir()]


def test_arrow_engine_reads_the_same_frames(big_criteo):
    arrow = pd.concat(list(iter_frames("criteo", big_criteo, chunksize=100, engine="arrow").frames))
    pandas = pd.concat(list(iter_frames("criteo", big_criteo, chunksize=100).frames))
    assert isinstance(arrow["C1"].dtype, pd.ArrowDtype)  # Arrow dictionary arrays: no Python string per value
    arrow = arrow.reset_index(drop=True)
    for c in arrow.columns:
        if c.startswith("C"):
            arrow[c] = arrow[c].astype(object).where(arrow[c].notna(), np.nan)
    pd.testing.assert_frame_equal(arrow, pandas.reset_index(drop=True))
    with pytest.raises(ValueError, match="engine must be"):
        iter_frames("criteo", big_criteo, engine="spark")  # type: ignore[arg-type]


def test_fit_lookup_tables_equal_encode_ids(tmp_path, big_criteo):
    from lightfmp.data.cache import RawColumns

    out = tmp_path / "raw"
    out.mkdir()
    ingest(iter_frames("criteo", big_criteo, chunksize=100, engine="arrow"), out, progress=False)
    raw = RawColumns(out)
    luts: dict[str, np.ndarray] = {}
    pre = fit_streaming(raw, raw.schema, np.arange(0, 600, 3), min_count=2, luts=luts)
    assert set(luts) == {f"C{i}" for i in range(1, 27)}
    for name, lut in luts.items():
        assert np.array_equal(lut, pre.encode_ids(name, np.asarray(raw.keys(name), dtype=object)))
    assert len(raw.keys("C26")) == len(set(raw.keys("C26")))  # each value listed once


def _small_table(tmp_path: Path) -> tuple[Path, Path]:
    rng = np.random.default_rng(3)
    n = 250
    frame = pd.DataFrame({"x": rng.normal(size=n), "u": rng.integers(0, 9, n).astype(str), "y": rng.integers(0, 2, n)})
    frame.to_csv(tmp_path / "d.csv", index=False)
    frame.to_parquet(tmp_path / "d.parquet", index=False)
    (tmp_path / "d.csv.gz").write_bytes(gzip.compress((tmp_path / "d.csv").read_bytes()))
    schema = write(tmp_path / "s.yaml", "label: y\nfields:\n  - {name: x, kind: dense}\n  - {name: u}\n")
    return tmp_path, schema


@pytest.mark.parametrize("fmt", ["csv", "csv.gz", "parquet", "adult", "movielens"])
def test_every_reader_streams_chunks_equal_to_the_whole_read(tmp_path, fmt):
    """csv (plain and gzip), Parquet, Adult and MovieLens stream their rows in chunks of ``chunksize`` (not read
    whole and cut): more than one chunk, none larger, and together the whole read's frame."""
    from lightfmp.data.formats import read_frame
    from tests.lightfmp.data.files import ml100k_dir

    schema: Any = None
    if fmt.startswith("csv") or fmt == "parquet":
        root, schema = _small_table(tmp_path)
        path: Any = str(root / f"d.{fmt}")
        name = "csv" if fmt.startswith("csv") else "parquet"
    elif fmt == "adult":
        path, name = None, "adult"
    else:
        path, name = str(ml100k_dir(tmp_path / "ml")), "movielens"
    size = 3 if name == "movielens" else 37  # the MovieLens sample has 4 ratings
    whole, _ = read_frame(name, path, schema=schema, max_rows=5000)
    chunks = iter_frames(name, path, schema=schema, chunksize=size, max_rows=5000)
    frames = list(chunks.frames)
    assert len(frames) > 1 and max(len(f) for f in frames) <= size
    streamed = pd.concat(frames, ignore_index=True)[list(whole.columns)]
    pd.testing.assert_frame_equal(streamed, whole)
    assert chunks.rows == len(whole)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda f: f[:-1], "line 204: it has 39 fields, expected 40"),
        (lambda f: f + ["x"], "line 204: it has 41 fields, expected 40"),
        (lambda f: [], "line 204: it is blank"),
    ],
    ids=["short", "long", "blank"],
)
def test_arrow_reader_names_a_malformed_record(tmp_path, edit, message):
    """The Arrow path does not check the file first: a record with another field count (or a blank line) stops
    Arrow, and the checked pandas path names the line, for the reader and for the cache build."""
    rows = criteo_rows(300)
    rows[203] = "\t".join(edit(rows[203].split("\t")))
    path = write(tmp_path / "bad.txt", "\n".join(rows) + "\n")
    with pytest.raises(ValueError, match=message):
        list(iter_frames("criteo", path, chunksize=64, engine="arrow").frames)
    with pytest.raises(ValueError, match=message):
        CTRDataModule(format="criteo", path=str(path), cache_dir=str(tmp_path / "c"), progress=False).setup()


def test_arrow_reader_streams_gzip_and_reports_bytes(tmp_path, big_criteo):
    """A gzip file is read by the Arrow path in blocks (several chunks), its progress in compressed bytes."""
    path = tmp_path / "train.txt.gz"
    path.write_bytes(gzip.compress(big_criteo.read_bytes()))
    chunks = iter_frames("criteo", path, chunksize=100, engine="arrow")
    assert chunks.rows is None and chunks.size == path.stat().st_size and chunks.position is not None
    sizes, positions = [], []
    for frame in chunks.frames:
        sizes.append(len(frame))
        positions.append(chunks.position())
    assert len(sizes) > 2 and sum(sizes) == 600 and positions[-1] == path.stat().st_size
    truncated = tmp_path / "cut.txt.gz"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match="not a readable gzip file"):
        list(iter_frames("criteo", truncated, chunksize=100, engine="arrow").frames)


def test_tabulation_hash_and_nul_joined_round_trip(tmp_path):
    import pyarrow as pa

    from lightfmp.data.strings import TabulationHash, nul_joined, read_nul_joined

    values = ["", "a", "ab", "ba", "é", "a" * 300, "x\u20acy", "ab"]
    arr = pa.array(values)
    h = TabulationHash()(arr)
    assert h[2] == h[7] and len(set(h[:7].tolist())) == 7 and h[0] == 0
    assert np.array_equal(TabulationHash()(arr.slice(2, 3)), h[2:5])  # an array's offset is honoured
    (tmp_path / "k.txt").write_bytes(nul_joined(arr.slice(1)))
    assert read_nul_joined(tmp_path / "k.txt", 7).to_pylist() == values[1:]
    with pytest.raises(ValueError, match="NUL"):
        nul_joined(pa.array(["ok", "a\0b"]))


def test_arrow_strings_behave_as_the_list_and_hash_alike():
    import pyarrow as pa

    from lightfmp.data.cache import state_key
    from lightfmp.data.strings import ArrowStrings, as_list

    values = [f"v{i}" for i in range(70_000)] + ["é", ""]
    arrow = ArrowStrings(pa.array(values, type=pa.large_string()))
    assert len(arrow) == len(values) and arrow[0] == "v0" and arrow[-2] == "é" and arrow[3:5] == ["v3", "v4"]
    assert list(arrow) == values and as_list(arrow) == values and arrow == values and values == arrow
    assert arrow == ArrowStrings(pa.array(values)) and arrow != values[:-1] and arrow != ["x"] * len(values)
    assert b"".join(arrow.nul_joined(step=1000)) == "\0".join(values).encode()
    with pytest.raises(IndexError):
        arrow[len(values)]
    state: dict[str, Any] = {"schema": {"x": 1}, "fields": {"c": {"type": "vocab", "vocab": values}}}
    other = {"schema": {"x": 1}, "fields": {"c": {"type": "vocab", "vocab": arrow}}}
    assert state_key(state) == state_key(other)  # an encoding found by either form of the fitted state
    other["fields"]["c"]["vocab"] = ArrowStrings(pa.array(values[:-1]))
    assert state_key(state) != state_key(other)


def test_raw_ids_number_values_in_order_of_first_appearance(tmp_path):
    import pyarrow as pa

    from lightfmp.data.streaming import _RawIds
    from lightfmp.data.strings import TabulationHash, read_nul_joined

    rng = np.random.default_rng(3)
    raw = _RawIds("c", tmp_path / "keys.txt", TabulationHash())
    reference: dict[str, int] = {}
    for _ in range(6):  # chunks with repeated, old and new values, not all distinct within a chunk
        chunk = [f"{int(v):x}" for v in rng.zipf(1.3, 400) % 5000]
        expected = [reference.setdefault(v, len(reference)) for v in chunk]
        assert raw.lookup(pa.array(chunk)).tolist() == expected
    assert raw.lookup(pa.array([], type=pa.string())).tolist() == []
    raw.close()
    assert raw.count == len(reference) and bool(np.all(raw.hashes[1:] > raw.hashes[:-1]))
    assert read_nul_joined(tmp_path / "keys.txt", raw.count).to_pylist() == list(reference)


def test_read_rows_equals_the_mapped_column(tmp_path):
    from lightfmp.data.cache import read_rows

    x = np.arange(60, dtype=np.float64).reshape(20, 3)
    np.save(tmp_path / "x.npy", x)
    assert np.array_equal(read_rows(tmp_path / "x.npy", 4, 11), x[4:11])
    assert read_rows(tmp_path / "x.npy", 20, 20).shape == (0, 3)
    with pytest.raises(ValueError, match="out of range"):
        read_rows(tmp_path / "x.npy", 5, 21)


def test_a_value_has_one_hash_and_raw_id_beside_a_long_value(tmp_path):
    """A string longer than the tabulation table is hashed by another function; that must not change the hash of
    the other strings of its chunk (it did: the whole chunk switched, giving a value a second raw id)."""
    import pyarrow as pa

    from lightfmp.data.streaming import _RawIds
    from lightfmp.data.strings import MAX_TABLE_LENGTH, TabulationHash, read_nul_joined

    long = "y" * (MAX_TABLE_LENGTH + 1)
    hasher = TabulationHash()
    alone = hasher(pa.array(["x", "", "ab"]))
    mixed = hasher(pa.array(["x", long, "", "ab", long + "z"]))
    assert mixed[[0, 2, 3]].tolist() == alone.tolist() and mixed[1] != mixed[4]
    assert hasher(pa.array([long]))[0] == mixed[1]
    raw = _RawIds("c", tmp_path / "keys.txt", hasher)
    assert raw.lookup(pa.array(["x", "z"])).tolist() == [0, 1]
    assert raw.lookup(pa.array(["x", long, "z"])).tolist() == [0, 2, 1]
    raw.close()
    assert read_nul_joined(tmp_path / "keys.txt", 3).to_pylist() == ["x", "z", long]
