r"""Preprocessing in chunks with bounded memory: ingest a file into raw columns, fit on the training split,
encode, and open the encoded rows as an :class:`~lightfmp.data.preprocess.EncodedFrame` over memory maps.

Three passes (the layout is :mod:`lightfmp.data.cache`'s):

1. :func:`ingest` (the only pass over the text): each chunk's labels, dense numbers (float64) and time are
   appended to their column files; a categorical value becomes a *raw id* (its position among the distinct
   values in order of first appearance, a sorted array of value hashes per field), so that the vocabulary can
   be fitted later on whichever rows are training rows. Memory: the chunk being parsed (each is dropped once
   written) plus 12 bytes per distinct value (:class:`_RawIds`); the distinct values themselves are written
   out as they appear. With the Arrow reader a chunk's categorical values arrive as dictionary arrays and are
   hashed from their buffers (:mod:`lightfmp.data.strings`), never as Python strings.
2. :func:`fit_streaming`, once the row count (and so the split) is known: per field, the training count of each
   raw id is a sum of ``bincount``\ s over row blocks; ``min_count``, ``hash_threshold`` and the vocabulary
   order (count descending, then value) are :class:`Preprocessor`'s. Dense ``log`` / ``none`` fields: mean of
   ``t(x)`` over the training values, then ``std = sqrt(sum (t - mean)^2 / n)`` in a second block pass (equal
   to numpy's ``mean`` / ``std`` up to float64 rounding, ~1e-15 relative). Bucket edges: ``np.quantile`` of
   the training values, exact when a field has at most ``quantile_values`` of them (default 4,194,304); above,
   of a seeded Bernoulli sample of about that many (rank error about ``1 / sqrt(quantile_values)``, 5e-4).
   Memory: a row block (read, not mapped: :func:`~lightfmp.data.cache.read_rows`), one field's counts and
   distinct values (8 + about 16 bytes per distinct value), the lookup tables (4 bytes per distinct value) and
   the quantile sample; each vocabulary is kept as an :class:`~lightfmp.data.strings.ArrowStrings` (about
   16 bytes per kept value; Python strings cost about 65). The fit is stored by :func:`save_fit` (each
   vocabulary as the raw ids in id order) and read back by :func:`load_fit`.
3. :func:`encode_streaming`: row blocks of the raw columns through the fitted state: a categorical raw id
   maps through a lookup table ``lut[raw id]`` (the fit's, or built once from the distinct values by
   :meth:`Preprocessor.encode_ids`), so ids equal the in-memory path's exactly; dense values are
   ``(t(x) - mean) / std`` as there.

So the cached rows equal :meth:`Preprocessor.transform` of the whole frame, bit for bit, for categorical and
bucketed fields (exact quantiles) and labels, and up to float32 rounding of the (rounding-level) differences of
the streaming mean / std for dense fields; unless two distinct values of a field have the same 64-bit hash
(:class:`_RawIds`: not detected, probability about ``n^2 / 2^65``), which then share a raw id.

TorchRec's ``BinaryCriteoUtils.tsv_to_npys`` does not fit pass 1: it holds the whole file in Python lists,
maps a missing number to 0 and shifts every dense value by the column minimum before ``log``, and parses
categories as hexadecimal integers (Criteo only; no vocabulary, no ``min_count``). Its ``load_npy_range`` (a
row range of a 2-D ``.npy``, memory-mapped) does fit and reads the dense blocks of pass 2 and 3.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torchrec.datasets.criteo import BinaryCriteoUtils
from tqdm import tqdm

from lightfmp.data.cache import CACHE_VERSION, NpyWriter, RawColumns, load_column, write_json
from lightfmp.data.formats import Chunks
from lightfmp.data.preprocess import EncodedFrame, Preprocessor, category_codes, dense_transform, multi_codes
from lightfmp.data.schema import Schema
from lightfmp.data.strings import ArrowStrings, TabulationHash, nul_joined

QUANTILE_VALUES = 1 << 22
BLOCK_ROWS = 1 << 20


def progress_bar(total: Optional[int], desc: str, enabled: bool) -> tqdm:
    """A rows/s and ETA bar on stderr; silent unless ``enabled`` and stderr is a terminal."""
    return tqdm(
        total=total,
        desc=desc,
        unit=" rows",
        unit_scale=True,
        disable=not (enabled and sys.stderr.isatty()),
        file=sys.stderr,
        smoothing=0.1,
    )


class _RawIds:
    """Raw ids of one categorical field: distinct value -> its rank in order of first appearance.

    A value is known by its 64-bit tabulation hash (:class:`~lightfmp.data.strings.TabulationHash`, computed on
    the Arrow string buffers, no Python string per value); the hashes seen are kept sorted (``uint64``) beside
    their raw ids (``int32``): 12 bytes per distinct value, looked up by binary search (a hash table took
    about 30, and twice that while it grew). A chunk's new hashes are merged in (``np.insert``: a copy of the
    field's arrays, so 24 bytes per distinct value of one field for a moment). The values themselves are
    appended to ``keys_<j>.txt`` (NUL-separated) as they first appear, so the file lists each once. Two values
    with one hash would share a raw id (probability about ``n^2 / 2^65`` for ``n`` distinct values: 3e-6 for
    Criteo's largest field, 10 million).
    """

    def __init__(self, name: str, keys_path: Path, hasher: TabulationHash) -> None:
        self.name = name
        self.hashes = np.zeros(0, dtype=np.uint64)
        self.ids = np.zeros(0, dtype=np.int32)
        self.count = 0
        self._hash = hasher
        self._keys = open(keys_path, "wb")

    def lookup(self, keys: pa.Array) -> np.ndarray:
        """int64 raw ids of the strings ``keys`` (an Arrow string array, in order of first appearance in the
        chunk), adding the new ones."""
        if len(keys) == 0:
            return np.zeros(0, dtype=np.int64)
        distinct, first, inverse = np.unique(self._hash(keys), return_index=True, return_inverse=True)
        pos = np.searchsorted(self.hashes, distinct)
        found = pos < len(self.hashes)
        found[found] = self.hashes[pos[found]] == distinct[found]
        ids = np.empty(len(distinct), dtype=np.int64)
        ids[found] = self.ids[pos[found]]
        new = np.flatnonzero(~found)
        if len(new) and self.count + len(new) >= 2**31:
            raise ValueError(f"field {self.name!r} has more than 2^31 distinct values; hash it (hash_buckets)")
        if len(new):
            order = new[np.argsort(first[new], kind="stable")]  # the new values in order of first appearance
            ids[order] = np.arange(self.count, self.count + len(new), dtype=np.int64)
            text = nul_joined(keys.take(pa.array(first[order])))
            self._keys.write((b"\0" if self.count else b"") + text)
            self.count += len(new)
            self.hashes = np.insert(self.hashes, pos[new], distinct[new])  # stays sorted: distinct is
            self.ids = np.insert(self.ids, pos[new], ids[new].astype(np.int32))
        return ids[inverse.ravel()]

    def close(self) -> None:
        self._keys.close()


def category_pieces(col: pd.Series) -> Iterator[tuple[np.ndarray, pa.Array]]:
    """``(codes, keys)`` pieces of a categorical column, in row order: piece row ``i`` holds ``keys[codes[i]]``
    or is missing (``codes[i] == -1``: null or the empty string); ``keys``: distinct strings (Arrow), in order
    of first appearance. An Arrow dictionary column (:func:`~lightfmp.data.formats.base.arrow_chunks`) gives
    its pieces as parsed; another column goes through :func:`category_codes` (one piece)."""
    if isinstance(col.dtype, pd.ArrowDtype):
        for piece in col.array.__arrow_array__().chunks:
            if not pa.types.is_dictionary(piece.type):
                piece = piece.dictionary_encode()
            codes = piece.indices.fill_null(-1).to_numpy().astype(np.int64)
            keys = piece.dictionary
            empty = np.flatnonzero(pc.binary_length(keys).to_numpy(zero_copy_only=False) == 0)
            if len(empty):
                codes[np.isin(codes, empty)] = -1
            yield codes, keys
        return
    codes, keys = category_codes(col)
    yield codes, pa.array(keys, type=pa.string())


def ingest(chunks: Chunks, out: Path, progress: bool = True) -> None:
    """Pass 1: the chunks' columns into ``out`` (the raw layout of :mod:`lightfmp.data.cache`); see the module
    docstring. Raises ``ValueError`` for a file without rows or with more than 2^31 distinct values in a field."""
    schema = chunks.schema
    dense = [f.name for f in schema.fields if f.kind == "dense"]
    files = {f.name: j for j, f in enumerate(schema.fields)}
    label = NpyWriter(out / "label.npy", np.int8)
    time = NpyWriter(out / "time.npy", np.float64) if schema.time_column else None
    dense_out = NpyWriter(out / "dense.npy", np.float64, (len(dense),))
    ids: dict[str, NpyWriter] = {}
    offsets: dict[str, NpyWriter] = {}
    values: dict[str, NpyWriter] = {}
    hasher = TabulationHash()
    raw = {
        f.name: _RawIds(f.name, out / f"keys_{files[f.name]}.txt", hasher) for f in schema.fields if f.kind != "dense"
    }
    nnz = {f.name: 0 for f in schema.fields if f.kind == "multi"}
    for f in schema.fields:
        j = files[f.name]
        if f.kind == "sparse":
            ids[f.name] = NpyWriter(out / f"ids_{j}.npy", np.int32)
        elif f.kind == "multi":
            offsets[f.name] = NpyWriter(out / f"offsets_{j}.npy", np.int64)
            offsets[f.name].append(np.zeros(1, dtype=np.int64))
            values[f.name] = NpyWriter(out / f"values_{j}.npy", np.int32)

    def write(chunk: pd.DataFrame) -> int:
        """Append one chunk's columns; its arrays are freed on return, before the next chunk is parsed."""
        n = len(chunk)
        label.append(chunk[schema.label].to_numpy(dtype=np.int8))
        if time is not None and schema.time_column is not None:
            time.append(_time_values(chunk[schema.time_column], schema.time_column))
        block = np.empty((n, len(dense)), dtype=np.float64)
        for k, name in enumerate(dense):
            block[:, k] = Preprocessor.numeric(schema[name], chunk[name])
        dense_out.append(block)
        for f in schema.fields:
            if f.kind == "sparse":
                parts = []
                for codes, keys in category_pieces(chunk[f.name]):
                    glob = raw[f.name].lookup(keys)
                    parts.append(np.where(codes >= 0, glob[np.maximum(codes, 0)], -1))
                ids[f.name].append(np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64))
            elif f.kind == "multi":
                owner, codes, keys = multi_codes(chunk[f.name], f.separator)
                counts = np.bincount(owner, minlength=n)
                offsets[f.name].append(nnz[f.name] + np.cumsum(counts))
                nnz[f.name] += len(codes)
                values[f.name].append(raw[f.name].lookup(pa.array(keys, type=pa.string()))[codes])
        return n

    rows = 0
    by_bytes = chunks.rows is None and chunks.size is not None and chunks.position is not None
    with _read_bar(chunks, progress) as bar:
        for chunk in chunks.frames:
            n = write(chunk)
            del chunk  # not held while the next chunk is parsed
            rows += n
            if by_bytes:
                assert chunks.position is not None
                bar.update(chunks.position() - bar.n)
                bar.set_postfix_str(f"{rows:,} rows", refresh=False)
            else:
                bar.update(n)
    if rows == 0:
        raise ValueError("the data file has no data rows")
    for writer in [label, dense_out, *ids.values(), *offsets.values(), *values.values()] + ([time] if time else []):
        writer.close()
    for r in raw.values():
        r.close()
    distinct = {name: r.count for name, r in raw.items()}
    meta = {
        "version": CACHE_VERSION,
        "rows": rows,
        "schema": schema.to_dict(),
        "dense": dense,
        "files": files,
        "distinct": distinct,
    }
    write_json(out / "meta.json", meta)


def _read_bar(chunks: Chunks, enabled: bool) -> tqdm:
    """The read bar: in rows when the reader knows the row count, else in bytes of the file."""
    if chunks.rows is None and chunks.size is not None:
        return tqdm(
            total=chunks.size,
            desc="read",
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            disable=not (enabled and sys.stderr.isatty()),
            file=sys.stderr,
            smoothing=0.1,
        )
    return progress_bar(chunks.rows, "read", enabled)


def _time_values(col: pd.Series, name: str) -> np.ndarray:
    try:
        return pd.to_numeric(col).to_numpy(dtype=np.float64, na_value=np.nan)
    except (ValueError, TypeError):
        raise ValueError(
            f"the cache stores the time column {name!r} as numbers, and it holds a non-number; "
            "use a numeric time column (e.g. seconds) or no cache_dir"
        ) from None


def _blocks(rows: int, block_rows: int) -> Iterator[tuple[int, int]]:
    for start in range(0, rows, block_rows):
        yield start, min(rows, start + block_rows)


def _dense_block(raw: RawColumns, start: int, stop: int) -> np.ndarray:
    """Rows ``start:stop`` of the raw dense matrix (TorchRec's memory-mapped ``load_npy_range``)."""
    if not raw.dense_names:
        return np.zeros((stop - start, 0))
    return BinaryCriteoUtils.load_npy_range(str(raw.dense_path), start, stop - start, mmap_mode=True)


def fit_streaming(
    raw: RawColumns,
    schema: Schema,
    train: np.ndarray,
    min_count: int = 1,
    hash_threshold: Optional[int] = None,
    quantile_values: int = QUANTILE_VALUES,
    seed: int = 0,
    block_rows: int = BLOCK_ROWS,
    luts: Optional[dict[str, np.ndarray]] = None,
) -> Preprocessor:
    """Pass 2: a :class:`Preprocessor` of ``schema`` fitted on the rows ``train`` of ``raw`` (see the module
    docstring). Cost: two passes over the dense columns, one over each categorical field's ids. ``luts``, when
    given, receives each vocabulary field's lookup table (raw id -> id) for :func:`encode_streaming`."""
    if len(train) == 0:
        raise ValueError("cannot fit a preprocessor on an empty training split")
    pre = Preprocessor(schema, min_count=min_count, hash_threshold=hash_threshold)
    mask = np.zeros(raw.rows, dtype=bool)
    mask[np.asarray(train, dtype=np.int64)] = True
    states: dict[str, dict[str, Any]] = {}
    states.update(_fit_dense(raw, schema, mask, quantile_values, seed, block_rows))
    for f in schema.fields:
        if f.kind == "dense":
            continue
        if f.hash_buckets is not None:
            states[f.name] = {"type": "hash", "buckets": int(f.hash_buckets)}
            continue
        keys = raw.key_array(f.name)
        counts = np.zeros(len(keys), dtype=np.int64)
        if f.kind == "sparse":
            for start, stop in _blocks(raw.rows, block_rows):
                r = raw.id_rows(f.name, start, stop)[mask[start:stop]]
                counts += np.bincount(r[r >= 0], minlength=len(keys))
        else:
            offsets, values = raw.multi(f.name)
            for start, stop in _blocks(raw.rows, block_rows):
                lens = np.diff(offsets[start : stop + 1])
                tokens = values[offsets[start] : offsets[stop]]
                counts += np.bincount(tokens[np.repeat(mask[start:stop], lens)], minlength=len(keys))
        states[f.name], lut = pre.fit_vocabulary(f, keys, counts, unique=True)
        if luts is not None and lut is not None:
            luts[f.name] = lut
    pre.states = {f.name: states[f.name] for f in schema.fields}
    return pre


def save_fit(pre: Preprocessor, raw: RawColumns, luts: dict[str, np.ndarray], out: Path) -> None:
    """Write the fitted ``pre`` into the directory ``out`` (``fit-<options>/`` of :mod:`lightfmp.data.cache`):
    ``state.json`` without the vocabularies, and each vocabulary field's raw ids in id order from its lookup
    table ``luts[name]`` (:func:`fit_streaming`'s) as ``vocab_<j>.npy``."""
    state = pre.state_dict(as_lists=False)
    for name, st in state["fields"].items():
        if st["type"] == "vocab":
            lut = luts[name]
            present = np.flatnonzero(lut)
            ranked = np.empty(len(present), dtype=np.int32)
            ranked[lut[present] - 1] = present
            np.save(out / f"vocab_{raw.field_file(name)}.npy", ranked)
            state["fields"][name] = {"type": "vocab", "vocab_file": f"vocab_{raw.field_file(name)}.npy"}
    write_json(out / "state.json", state)


def load_fit(raw: RawColumns, directory: Path, luts: dict[str, np.ndarray]) -> Preprocessor:
    """The preprocessor :func:`save_fit` wrote into ``directory``; each vocabulary field's lookup table (raw id
    -> id) goes into ``luts``."""
    state = json.loads((directory / "state.json").read_text())
    for name, st in state["fields"].items():
        if st["type"] == "vocab" and "vocab_file" in st:
            ranked = np.load(directory / st["vocab_file"])
            keys = raw.key_array(name)
            lut = np.zeros(len(keys), dtype=np.int32)
            lut[ranked] = np.arange(1, len(ranked) + 1, dtype=np.int32)
            luts[name] = lut
            state["fields"][name] = {"type": "vocab", "vocab": ArrowStrings(keys.take(pa.array(ranked)))}
    return Preprocessor.from_state_dict(state)


def _fit_dense(
    raw: RawColumns, schema: Schema, mask: np.ndarray, quantile_values: int, seed: int, block_rows: int
) -> dict[str, dict[str, Any]]:
    fields = [f for f in schema.fields if f.kind == "dense"]
    if not fields:
        return {}
    cols = [raw.dense_names.index(f.name) for f in fields]
    count = np.zeros(len(fields), dtype=np.int64)
    total = np.zeros(len(fields))
    for start, stop in _blocks(raw.rows, block_rows):
        x = _dense_block(raw, start, stop)[mask[start:stop]][:, cols]
        for k, f in enumerate(fields):
            v = x[:, k][~np.isnan(x[:, k])]
            count[k] += len(v)
            total[k] += dense_transform(v, f.transform).sum() if f.transform != "bucket" else 0.0
    mean = np.where(count > 0, total / np.maximum(count, 1), 0.0)
    squares = np.zeros(len(fields))
    rng = np.random.default_rng([seed, 11])
    share = [min(1.0, quantile_values / c) if c else 1.0 for c in count]
    samples: list[list[np.ndarray]] = [[] for _ in fields]
    for start, stop in _blocks(raw.rows, block_rows):
        x = _dense_block(raw, start, stop)[mask[start:stop]][:, cols]
        for k, f in enumerate(fields):
            v = x[:, k][~np.isnan(x[:, k])]
            if f.transform == "bucket":
                samples[k].append(v if share[k] >= 1 else v[rng.random(len(v)) < share[k]])
            else:
                squares[k] += np.square(dense_transform(v, f.transform) - mean[k]).sum()
    states: dict[str, dict[str, Any]] = {}
    for k, f in enumerate(fields):
        if f.transform == "bucket":
            v = np.concatenate(samples[k]) if samples[k] else np.zeros(0)
            qs = np.quantile(v, np.arange(1, f.num_buckets) / f.num_buckets) if len(v) else np.zeros(0)
            states[f.name] = {"type": "bucket", "edges": [float(e) for e in np.unique(qs)]}
        else:
            std = float(np.sqrt(squares[k] / count[k])) if count[k] else 1.0
            states[f.name] = {"type": "dense", "mean": float(mean[k]), "std": std if std > 0 else 1.0}
    return states


def encode_streaming(
    raw: RawColumns,
    pre: Preprocessor,
    out: Path,
    progress: bool = True,
    block_rows: int = BLOCK_ROWS,
    luts: Optional[dict[str, np.ndarray]] = None,
) -> None:
    """Pass 3: every row of ``raw`` encoded by the fitted ``pre`` into ``out`` (``dense.npy`` float32
    ``(N, n_dense_inputs)``, ``sparse.npy`` int32 ``(N, n_single)``, ``values_<j>.npy`` int32). Memory: a row
    block (read, not mapped) and one lookup table (4 bytes per distinct value, 8 when built here) per
    categorical field: ``luts[name]`` when :func:`fit_streaming` gave it, else :meth:`Preprocessor.encode_ids`
    of the field's distinct values."""
    spec = pre.feature_spec
    singles = [f.name for f in spec.sparse if not f.multi_valued]
    given = luts or {}
    luts = {}
    for field in pre.schema.fields:
        if field.kind != "dense":
            keys = None if field.name in given else np.asarray(raw.keys(field.name), dtype=object)
            luts[field.name] = given[field.name] if keys is None else pre.encode_ids(field.name, keys)
    dense_cols = [raw.dense_names.index(n) for n in spec.dense]
    dense_out = NpyWriter(out / "dense.npy", np.float32, (len(spec.dense),))
    sparse_out = NpyWriter(out / "sparse.npy", np.int32, (len(singles),))
    with progress_bar(raw.rows, "encode", progress) as bar:
        for start, stop in _blocks(raw.rows, block_rows):
            x = _dense_block(raw, start, stop)
            dense = np.empty((stop - start, len(spec.dense)), dtype=np.float32)
            for k, (name, col) in enumerate(zip(spec.dense, dense_cols)):
                dense[:, k] = pre.encode_numbers(name, x[:, col])
            sparse = np.empty((stop - start, len(singles)), dtype=np.int32)
            for k, name in enumerate(singles):
                if pre.schema[name].kind == "sparse":
                    r = raw.id_rows(name, start, stop)
                    sparse[:, k] = np.where(r >= 0, luts[name][np.maximum(r, 0)], 0)
                else:  # a bucketed dense field
                    sparse[:, k] = pre.encode_numbers(name, x[:, raw.dense_names.index(name)])
            dense_out.append(dense)
            sparse_out.append(sparse)
            bar.update(stop - start)
    dense_out.close()
    sparse_out.close()
    for f in spec.sparse:
        if f.multi_valued:
            _, values = raw.multi(f.name)
            writer = NpyWriter(out / f"values_{raw.field_file(f.name)}.npy", np.int32)
            for start, stop in _blocks(len(values), block_rows):
                writer.append(luts[f.name][values[start:stop]])
            writer.close()


def open_encoded(raw: RawColumns, pre: Preprocessor, directory: Path) -> EncodedFrame:
    """The encoded rows in ``directory`` as an :class:`EncodedFrame` whose tensors map the column files (no copy:
    a batch reads its rows from the page cache)."""
    spec = pre.feature_spec
    multi = {}
    for f in spec.sparse:
        if f.multi_valued:
            offsets, _ = raw.multi(f.name)
            values = load_column(directory / f"values_{raw.field_file(f.name)}.npy")
            multi[f.name] = (torch.from_numpy(offsets), torch.from_numpy(values))
    return EncodedFrame(
        spec=spec,
        dense=torch.from_numpy(load_column(directory / "dense.npy")),
        sparse=torch.from_numpy(load_column(directory / "sparse.npy")),
        multi=multi,
        labels=torch.from_numpy(raw.labels()),
    )
