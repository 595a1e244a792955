"""Preprocessing fitted on the training split and saved with the model; vectorised batch collation.

:class:`Preprocessor` turns a frame from :mod:`lightfmp.data.formats` into an :class:`EncodedFrame`:

* dense field, transform ``log``: ``t(x) = sign(x) log(1 + |x|)``; ``none``: ``t(x) = x``; then
  ``(t(x) - mean) / std`` with the training mean and standard deviation of ``t(x)`` (std 0 -> 1); a missing
  value encodes as 0 (the training mean).
* dense field, transform ``bucket``: ``edges`` = the distinct training quantiles at ``k / num_buckets``,
  ``k = 1 .. num_buckets - 1``; id = ``1 + #{edges <= x}`` (ids 1 .. len(edges) + 1), missing -> 0.
* sparse / multi-valued field: values seen at least ``min_count`` times in training get ids 1 .. V,
  by decreasing count then by value (deterministic); every other value, and a missing one, is id 0.
  With ``hash_buckets`` (per field) or when more than ``hash_threshold`` values pass ``min_count``, the
  field is hashed instead: id = ``1 + h(value) mod n`` with pandas' keyed, process-independent
  ``hash_array`` (not Python's salted ``hash``); a missing value stays 0.

Categorical values are compared as strings (an integer stored as a float, 3.0, is the string "3"), so a
vocabulary saved as JSON is exact. The whole state is plain JSON (:meth:`Preprocessor.save`).
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from lightfmp.data.schema import FieldSpec, Schema
from lightfmp.data.strings import ArrowStrings, as_list
from lightfmp.inputs import CTRBatch, ModelInputs, SparseFeature

STATE_VERSION = 1


# ------------------------------------------------------------------------------------------ encoded frame
@dataclass
class EncodedFrame:
    """A whole table encoded for a model.

    ``dense``: (N, n_dense) float32; ``sparse``: (N, n_single) int64 ids of the single-valued sparse inputs
    (spec order, multi-valued ones skipped); ``multi[name] = (offsets (N + 1,), values (nnz,))`` int64 in CSR
    layout (row ``i`` holds ``values[offsets[i]:offsets[i + 1]]``); ``labels``: (N,) float32 in {0, 1} (NaN when
    unknown: rows encoded for scoring). Built from the on-disk cache (:func:`lightfmp.data.streaming.open_encoded`)
    the tensors map column files, with int32 ids and int8 labels; :meth:`batch` returns int64 ids and float32
    labels either way.
    """

    spec: ModelInputs
    dense: torch.Tensor
    sparse: torch.Tensor
    multi: dict[str, tuple[torch.Tensor, torch.Tensor]]
    labels: torch.Tensor
    _single_col: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        singles = [f.name for f in self.spec.sparse if not f.multi_valued]
        self._single_col = {n: j for j, n in enumerate(singles)}
        n = self.labels.shape[0]
        if self.dense.shape != (n, len(self.spec.dense)) or self.sparse.shape != (n, len(singles)):
            raise ValueError(
                f"EncodedFrame: inconsistent shapes dense {tuple(self.dense.shape)}, sparse "
                f"{tuple(self.sparse.shape)} for {n} rows and spec {self.spec.names}"
            )

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def batch(self, index: Union[torch.Tensor, np.ndarray, list[int]]) -> CTRBatch:
        """The rows ``index`` as a :class:`CTRBatch`, collated with tensor indexing only (no per-row loop).

        Multi-valued rows are gathered from CSR: with ``starts = offsets[index]``, ``lengths =
        offsets[index + 1] - starts`` and ``out = cumsum(lengths) - lengths``, output position ``k`` of row
        ``r`` reads ``values[k + starts[r] - out[r]]`` (``repeat_interleave`` spreads the shift over ``k``).
        """
        index = torch.as_tensor(index, dtype=torch.long)
        b = index.numel()
        singles = self.sparse[index].t().long()  # (n_single, B); a cache stores int32 ids
        keys = list(self.spec.sparse_names)
        lengths, values, per_key = [], [], []
        pending: list[int] = []  # a run of consecutive single-valued columns, gathered in one reshape

        def flush() -> None:
            if pending:
                values.append(singles[pending[0] : pending[-1] + 1].reshape(-1))
                lengths.append(torch.ones(b * len(pending), dtype=torch.int32))
                per_key.extend([b] * len(pending))
                pending.clear()

        for feat in self.spec.sparse:
            if not feat.multi_valued:
                pending.append(self._single_col[feat.name])
                continue
            flush()
            offsets, flat = self.multi[feat.name]
            starts = offsets[index]
            lens = offsets[index + 1] - starts
            out = torch.cumsum(lens, 0) - lens
            total = int(lens.sum())
            shift = torch.repeat_interleave(starts - out, lens, output_size=total)
            values.append(flat[torch.arange(total, dtype=torch.long) + shift].long())
            lengths.append(lens.int())
            per_key.append(total)
        flush()
        all_lengths = torch.cat(lengths) if lengths else torch.zeros(0, dtype=torch.int32)
        all_values = torch.cat(values) if values else torch.zeros(0, dtype=torch.long)
        offset_per_key = np.concatenate([[0], np.cumsum(per_key, dtype=np.int64)]).tolist()
        # Metadata given up front: from_lengths_sync would recompute it (about 15 ms for 26 keys x 4096 rows).
        kjt = KeyedJaggedTensor(
            keys=keys,
            values=all_values,
            lengths=all_lengths,
            stride=b,
            length_per_key=list(per_key),
            offset_per_key=offset_per_key,
        )
        return CTRBatch(dense=self.dense[index], sparse=kjt, labels=self.labels[index].float())


# ------------------------------------------------------------------------------------------ helpers
def dense_transform(x: np.ndarray, transform: str) -> np.ndarray:
    """``sign(x) log(1 + |x|)`` for "log", ``x`` otherwise (NaN stays NaN)."""
    return np.sign(x) * np.log1p(np.abs(x)) if transform == "log" else x


def _unique_keys(uniques: pd.Series) -> np.ndarray:
    """Distinct raw values as strings; integral floats as integers ("3.0" -> "3"), booleans as 0/1."""
    if pd.api.types.is_bool_dtype(uniques.dtype):
        uniques = uniques.astype(np.int64)
    elif pd.api.types.is_float_dtype(uniques.dtype):
        arr = uniques.to_numpy(dtype=np.float64)
        if np.all(arr == np.round(arr)):
            uniques = pd.Series(arr.astype(np.int64))
    return uniques.astype(str).to_numpy(dtype=object)


def category_codes(col: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """``(codes, keys)``: row ``i`` holds the string ``keys[codes[i]]``, or is missing when ``codes[i] == -1``.

    Missing = NaN/None/NA or the empty string. ``pd.factorize`` finds the distinct values in one hashed pass,
    so string conversion, vocabulary lookup and hashing run once per distinct value, not per row.
    """
    codes, uniques = pd.factorize(col.reset_index(drop=True), use_na_sentinel=True)
    keys = _unique_keys(pd.Series(uniques))
    codes = codes.astype(np.int64)
    empty = np.flatnonzero(keys == "")
    if len(empty):
        codes[np.isin(codes, empty)] = -1
    return codes, keys


def multi_codes(col: pd.Series, separator: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(rows, codes, keys)`` of a multi-valued column: token ``k`` of the flattened lists belongs to row
    ``rows[k]`` (ascending) and is ``keys[codes[k]]``. Elements are separator-joined strings or list-like;
    missing values and empty tokens are dropped.

    Strings are split once per distinct string (a genre list repeats across ratings), and the tokens are
    spread back to the rows with the CSR gather of :meth:`EncodedFrame.batch`.
    """
    col = col.reset_index(drop=True)
    first = col.dropna()
    if len(first) and isinstance(first.iloc[0], (list, tuple, np.ndarray)):
        exploded = col.explode()
        codes, keys = category_codes(pd.Series(exploded.to_numpy(dtype=object)))
        present = codes >= 0
        return exploded.index.to_numpy()[present].astype(np.int64), codes[present], keys
    row_code, uniques = pd.factorize(col, use_na_sentinel=True)
    tokens = pd.Series(uniques, dtype=object).astype("string").str.split(separator, regex=False).explode()
    codes, keys = category_codes(pd.Series(tokens.to_numpy(dtype=object)))
    present = codes >= 0
    owner, codes = tokens.index.to_numpy()[present].astype(np.int64), codes[present]  # unique string of each token
    u_len = np.bincount(owner, minlength=len(uniques))
    u_start = np.cumsum(u_len) - u_len
    lens = np.where(row_code >= 0, u_len[np.maximum(row_code, 0)], 0)
    starts = u_start[np.maximum(row_code, 0)]
    out = np.cumsum(lens) - lens
    total = int(lens.sum())
    gather = np.arange(total, dtype=np.int64) + np.repeat(starts - out, lens)
    return np.repeat(np.arange(len(col), dtype=np.int64), lens), codes[gather], keys


def rank_vocabulary(keys: Any, counts: np.ndarray, kept: np.ndarray) -> tuple[np.ndarray, Sequence[str]]:
    """``(ranked, vocab)``: the positions ``kept`` of the distinct strings ``keys`` (an object array or an Arrow
    string array) ordered by ``counts`` descending, then by value (code point order: Arrow compares UTF-8
    bytes, which orders as code points), and their strings: a list, or for Arrow ``keys`` an
    :class:`~lightfmp.data.strings.ArrowStrings` (no Python string per value). Sorted by Arrow (numpy's
    ``lexsort`` of a string array was most of a fit's time); a value UTF-8 cannot encode (a lone surrogate)
    falls back to it."""
    if isinstance(keys, (pa.Array, pa.ChunkedArray)):
        sub = keys.take(pa.array(kept))
    else:
        try:
            sub = pa.array(keys[kept], type=pa.string())
        except (pa.ArrowException, UnicodeEncodeError):
            ranked = kept[np.lexsort((keys[kept].astype(str), -counts[kept]))]
            return ranked, keys[ranked].tolist()
    order = pc.sort_indices(
        pa.table({"count": counts[kept], "value": sub}), sort_keys=[("count", "descending"), ("value", "ascending")]
    ).to_numpy()
    if isinstance(keys, (pa.Array, pa.ChunkedArray)):
        return kept[order], ArrowStrings(sub.take(pa.array(order)))
    return kept[order], sub.take(pa.array(order)).to_pylist()


# ------------------------------------------------------------------------------------------ preprocessor
class Preprocessor:
    """Vocabularies, hashes and dense transforms of a :class:`Schema`, fitted on the training split.

    Args:
        schema: the fields to encode (their ``min_count`` / ``hash_buckets`` override the defaults here).
        min_count: default minimum training count for a value to get its own id.
        hash_threshold: hash a field into this many buckets when more values than this pass ``min_count``
            (None: never, unless the field sets ``hash_buckets``).
    """

    def __init__(self, schema: Schema, min_count: int = 1, hash_threshold: Optional[int] = None) -> None:
        if min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {min_count}")
        if hash_threshold is not None and hash_threshold < 1:
            raise ValueError(f"hash_threshold must be >= 1, got {hash_threshold}")
        self.schema = schema
        self.min_count = min_count
        self.hash_threshold = hash_threshold
        self.states: dict[str, dict[str, Any]] = {}
        self._indexes: dict[str, pd.Index] = {}

    # -- fitting
    @property
    def is_fitted(self) -> bool:
        return all(f.name in self.states for f in self.schema.fields)

    def fit(self, frame: pd.DataFrame) -> Preprocessor:
        """Fit every field on ``frame`` (the training split only)."""
        self._check_columns(frame, with_label=False)
        if len(frame) == 0:
            raise ValueError("cannot fit a preprocessor on an empty frame")
        states = {f.name: self._fit_field(f, frame[f.name]) for f in self.schema.fields}
        self.states = states
        self._indexes = {}
        return self

    def _fit_field(self, f: FieldSpec, col: pd.Series) -> dict[str, Any]:
        if f.kind == "dense":
            x = self.numeric(f, col)
            x = x[~np.isnan(x)]
            if f.transform == "bucket":
                qs = np.quantile(x, np.arange(1, f.num_buckets) / f.num_buckets) if len(x) else np.zeros(0)
                return {"type": "bucket", "edges": [float(e) for e in np.unique(qs)]}
            t = dense_transform(x, f.transform)
            mean = float(t.mean()) if len(t) else 0.0
            std = float(t.std()) if len(t) else 1.0
            return {"type": "dense", "mean": mean, "std": std if std > 0 else 1.0}
        if f.hash_buckets is not None:
            return {"type": "hash", "buckets": int(f.hash_buckets)}
        codes, keys = multi_codes(col, f.separator)[1:] if f.kind == "multi" else category_codes(col)
        return self.vocabulary_state(f, keys, np.bincount(codes[codes >= 0], minlength=len(keys)))

    def vocabulary_state(
        self, f: FieldSpec, keys: np.ndarray, counts: np.ndarray, unique: bool = False
    ) -> dict[str, Any]:
        """The fitted state of categorical field ``f`` from its training ``counts`` of the values ``keys``
        (strings, aligned; a value given twice is counted once with the sum, unless the caller knows them
        ``unique``): vocabulary or hash."""
        return self.fit_vocabulary(f, keys, counts, unique)[0]

    def fit_vocabulary(
        self, f: FieldSpec, keys: np.ndarray, counts: np.ndarray, unique: bool = False
    ) -> tuple[dict[str, Any], Optional[np.ndarray]]:
        """:meth:`vocabulary_state`, and for ``unique`` keys and a vocabulary, ``lut``: the id of each of
        ``keys`` (int32, 0 = out of vocabulary), equal to :meth:`encode_ids` of ``keys`` without hashing the
        strings."""
        if not unique:
            seen = counts > 0  # min_count >= 1: an unseen value never gets an id
            per_key = pd.Series(counts[seen], index=pd.Index(keys[seen], dtype=object))
            if not per_key.index.is_unique:  # e.g. 3 and "3" in one object column
                per_key = per_key.groupby(level=0).sum()
            keys, counts = per_key.index.to_numpy(), per_key.to_numpy()
        min_count = f.min_count if f.min_count is not None else self.min_count
        kept = np.flatnonzero(counts >= min_count)
        if self.hash_threshold is not None and len(kept) > self.hash_threshold:
            return {"type": "hash", "buckets": int(self.hash_threshold)}, None
        ranked, vocab = rank_vocabulary(keys, counts, kept)
        lut = None
        if unique:
            lut = np.zeros(len(keys), dtype=np.int32)
            lut[ranked] = np.arange(1, len(ranked) + 1, dtype=np.int32)
        return {"type": "vocab", "vocab": vocab}, lut

    @staticmethod
    def numeric(f: FieldSpec, col: pd.Series) -> np.ndarray:
        """Dense field ``f``'s column as float64 (NaN = missing); a non-number or an infinity raises naming it."""
        try:
            x = pd.to_numeric(col).to_numpy(dtype=np.float64, na_value=np.nan)
        except (ValueError, TypeError) as e:
            raise ValueError(f"dense field {f.name!r} has a non-numeric value: {e}") from None
        if np.isinf(x).any():
            i = int(np.flatnonzero(np.isinf(x))[0])
            raise ValueError(
                f"dense field {f.name!r} has an infinite value at row {i}; expected finite numbers or missing"
            )
        return x

    # -- encoding
    def _require_fitted(self) -> None:
        if not self.is_fitted:
            raise RuntimeError("the preprocessor is not fitted: call fit(train_frame) or load a saved one")

    def _check_columns(self, frame: pd.DataFrame, with_label: bool) -> None:
        wanted = list(self.schema.names) + ([self.schema.label] if with_label else [])
        missing = [c for c in wanted if c not in frame.columns]
        if missing:
            raise ValueError(
                f"the frame lacks column(s) {missing} required by the schema; it has {list(frame.columns)}"
            )

    def num_embeddings(self, name: str) -> int:
        st = self.states[name]
        if st["type"] == "vocab":
            return len(st["vocab"]) + 1
        if st["type"] == "hash":
            return st["buckets"] + 1
        if st["type"] == "bucket":
            return len(st["edges"]) + 2
        raise ValueError(f"field {name!r} is dense and has no embedding table")

    @property
    def feature_spec(self) -> ModelInputs:
        """Dense inputs and sparse tables, in schema order (bucketed numbers are sparse inputs)."""
        self._require_fitted()
        return ModelInputs(
            dense=tuple(f.name for f in self.schema.fields if f.is_dense_input),
            sparse=tuple(
                SparseFeature(f.name, self.num_embeddings(f.name), multi_valued=f.kind == "multi", pooling=f.pooling)
                for f in self.schema.fields
                if not f.is_dense_input
            ),
        )

    def encode_ids(self, name: str, keys: np.ndarray) -> np.ndarray:
        """int64 ids of the distinct values ``keys`` (strings) of categorical field ``name`` (0: out of vocabulary)."""
        self._require_fitted()
        return self._ids(name, keys)

    def encode_numbers(self, name: str, x: np.ndarray) -> np.ndarray:
        """Dense field ``name``'s float64 values ``x`` (NaN = missing) encoded: float32 standardised values, or
        int64 bucket ids."""
        st = self.states[name]
        missing = np.isnan(x)
        if st["type"] == "bucket":
            ids = 1 + np.searchsorted(np.asarray(st["edges"], dtype=np.float64), x, side="right")
            return np.where(missing, 0, ids).astype(np.int64)
        z = (dense_transform(x, self.schema[name].transform) - st["mean"]) / st["std"]
        return np.where(missing, 0.0, z).astype(np.float32)

    def _ids(self, name: str, keys: np.ndarray) -> np.ndarray:
        st = self.states[name]
        if st["type"] == "hash":
            if len(keys) == 0:
                return np.zeros(0, dtype=np.int64)
            h = pd.util.hash_array(np.asarray(keys, dtype=object), categorize=True)
            return (h % np.uint64(st["buckets"])).astype(np.int64) + 1
        index = self._indexes.get(name)
        if index is None:
            index = self._indexes[name] = pd.Index(as_list(st["vocab"]), dtype=object)
        return index.get_indexer(keys).astype(np.int64) + 1  # -1 (unknown) -> 0

    def encode_field(self, name: str, col: pd.Series) -> Union[np.ndarray, tuple[np.ndarray, np.ndarray]]:
        """One column encoded: float32 (N,) for dense, int64 (N,) ids, or CSR ``(offsets, values)`` for multi."""
        self._require_fitted()
        f = self.schema[name]
        n = len(col)
        if f.kind == "dense":
            return self.encode_numbers(name, self.numeric(f, col))
        if f.kind == "multi":
            rows, codes, keys = multi_codes(col, f.separator)
            offsets = np.zeros(n + 1, dtype=np.int64)
            np.cumsum(np.bincount(rows, minlength=n), out=offsets[1:])
            return offsets, self._ids(name, keys)[codes]
        codes, keys = category_codes(col)
        return np.where(codes >= 0, self._ids(name, keys)[np.maximum(codes, 0)], 0).astype(np.int64)

    def encode_labels(self, col: pd.Series) -> np.ndarray:
        y = pd.to_numeric(col, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
        bad = ~np.isin(y, (0.0, 1.0))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            value = col.iloc[i].item() if hasattr(col.iloc[i], "item") else col.iloc[i]
            raise ValueError(f"non-binary label {value!r} in column {self.schema.label!r} at row {i}: expected 0 or 1")
        return y.astype(np.float32)

    def transform(self, frame: pd.DataFrame) -> EncodedFrame:
        """Encode ``frame`` (its fields and label) with the fitted state."""
        self._check_columns(frame, with_label=True)
        return self._encode(frame, torch.from_numpy(self.encode_labels(frame[self.schema.label])))

    def encode_features(self, frame: pd.DataFrame) -> EncodedFrame:
        """Encode the fields of ``frame`` for scoring: no label column needed (the labels are NaN). A value not in
        a field's vocabulary gets the out-of-vocabulary id 0, as in training."""
        self._check_columns(frame, with_label=False)
        return self._encode(frame, torch.full((len(frame),), float("nan")))

    def _encode(self, frame: pd.DataFrame, labels: torch.Tensor) -> EncodedFrame:
        self._require_fitted()
        spec = self.feature_spec
        n = len(frame)
        dense = np.zeros((n, len(spec.dense)), dtype=np.float32)
        for j, name in enumerate(spec.dense):
            dense[:, j] = self.encode_field(name, frame[name])
        singles = [f.name for f in spec.sparse if not f.multi_valued]
        sparse = np.zeros((n, len(singles)), dtype=np.int64)
        for j, name in enumerate(singles):
            sparse[:, j] = self.encode_field(name, frame[name])
        multi = {}
        for f in spec.sparse:
            if f.multi_valued:
                offsets, values = self.encode_field(f.name, frame[f.name])
                multi[f.name] = (torch.from_numpy(offsets), torch.from_numpy(values))
        return EncodedFrame(
            spec=spec,
            dense=torch.from_numpy(dense),
            sparse=torch.from_numpy(sparse),
            multi=multi,
            labels=labels,
        )

    # -- restriction and persistence
    def select(self, names: Iterable[str]) -> Preprocessor:
        """The preprocessor restricted to ``names`` (same ids); unknown names raise ``KeyError``."""
        schema = self.schema.select(names)
        out = Preprocessor(schema, min_count=self.min_count, hash_threshold=self.hash_threshold)
        out.states = {n: self.states[n] for n in schema.names if n in self.states}
        out._indexes = {n: i for n, i in self._indexes.items() if n in out.states}
        return out

    def state_dict(self, as_lists: bool = True) -> dict[str, Any]:
        """The fitted state (plain JSON); ``as_lists`` False keeps each vocabulary as it is held (a list, or an
        :class:`~lightfmp.data.strings.ArrowStrings` from the on-disk cache's fit: not JSON, no Python strings)."""
        self._require_fitted()
        fields = {n: self.states[n] for n in self.schema.names}
        if as_lists:
            fields = {n: ({**st, "vocab": as_list(st["vocab"])} if "vocab" in st else st) for n, st in fields.items()}
        return {
            "version": STATE_VERSION,
            "schema": self.schema.to_dict(),
            "min_count": self.min_count,
            "hash_threshold": self.hash_threshold,
            "fields": fields,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(
                f"unsupported preprocessor state version {state.get('version')!r}; expected {STATE_VERSION}"
            )
        schema = Schema.from_dict(state["schema"])
        missing = [n for n in schema.names if n not in state["fields"]]
        if missing:
            raise ValueError(f"preprocessor state lacks the fitted state of field(s) {missing}")
        self.schema = schema
        self.min_count = int(state["min_count"])
        self.hash_threshold = state["hash_threshold"]
        self.states = {n: state["fields"][n] for n in schema.names}
        self._indexes = {}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> Preprocessor:
        out = cls(Schema.from_dict(state["schema"]))
        out.load_state_dict(state)
        return out

    def save(self, path: Union[str, Path]) -> None:
        """Write the state as JSON (gzip when the name ends in .gz); atomic (temporary file, then rename)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        data = json.dumps(self.state_dict()).encode()
        with gzip.open(tmp, "wb") if path.suffix == ".gz" else open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Union[str, Path]) -> Preprocessor:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"preprocessor file {str(path)!r} does not exist")
        with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as fh:
            try:
                state = json.loads(fh.read())
            except json.JSONDecodeError as e:
                raise ValueError(f"{str(path)!r} is not a saved preprocessor (invalid JSON: {e})") from None
        return cls.from_state_dict(state)
