r"""The on-disk cache of a data file: typed column files, built once, complete or absent, memory-mapped by every run.

Layout under ``cache_dir`` (one directory per source, named by :func:`source_key`)::

    <key>/meta.json            the cache version, rows, the file's schema, each field's column file and
                               distinct values
    <key>/label.npy            int8 (N,) labels 0/1
    <key>/time.npy             float64 (N,) the time column (when the schema has one)
    <key>/dense.npy            float64 (N, n_dense) raw numbers of the dense fields, NaN = missing
    <key>/ids_<j>.npy          int32 (N,) raw ids of categorical field j (-1 = missing); keys_<j>.txt: the
                               distinct values (UTF-8, NUL-separated) in order of first appearance (raw id =
                               position)
    <key>/offsets_<j>.npy      int64 (N + 1,), values_<j>.npy int32 (nnz,): multi-valued field j in CSR
    <key>/fit-<options>/       a preprocessor fitted on a training split (:func:`fit_key`): state.json (its
                               state without the vocabularies) and vocab_<j>.npy (int32, field j's vocabulary
                               as raw ids in id order: a binary file, not millions of JSON strings)
    <key>/encoded-<state>/     the rows encoded by one fitted preprocessor (:func:`state_key`): dense.npy
                               float32 (N, n_dense_inputs), sparse.npy int32 (N, n_single), values_<j>.npy int32
    <key>.lock                 the build lock (``filelock``)

The raw columns depend only on the file (``content_digest``), the format, the schema file and ``max_rows``; the
fit on the split and preprocessing options; the encoding on the fitted state. So a run with other split or
preprocessing options, or the finetune stage (fewer fields, same vocabularies), reuses the raw columns and
writes only what differs, and the fitting stage's reruns and later stages reuse everything.

A directory is built under a ``.tmp-*`` name and renamed into place when finished (a file: written to ``.tmp``
then ``os.replace``), under an exclusive file lock; so several processes (DDP ranks) wait for one builder and
then map the same files, and a killed build leaves only a ``.tmp-*`` directory that never counts as a cache
(the next builder removes it). Column files are ``.npy`` written by appending chunks (:class:`NpyWriter`);
``np.load(mmap_mode="c")`` maps them without reading them.

Disk per row: 1 (label) + 8 per dense field + 4 per categorical field (+ 12 per multi-valued token) for the raw
columns, 4 per field for each encoding: 365 bytes for a Criteo row (13 dense, 26 categorical).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
from filelock import FileLock

from lightfmp.data.fingerprint import content_digest
from lightfmp.data.schema import Schema
from lightfmp.data.strings import ArrowStrings, read_nul_joined

CACHE_VERSION = 4  # 3: fits stored as fit-<options>/, meta.json versioned; 4: a value's hash depends on it alone
_HEADER = 128  # bytes of an .npy v1.0 header for the shapes written here (numpy pads room for a 21-digit length)


def _digest(obj: Any) -> str:
    return hashlib.blake2b(json.dumps(obj, sort_keys=True, default=str).encode(), digest_size=10).hexdigest()


def source_key(format: str, path: Optional[Path], schema_file: Optional[Path], max_rows: Optional[int]) -> str:
    """The raw columns' key: format, the sampled content digest of the data file (directory) and of the schema
    file, ``max_rows`` and the cache version (not the path: a moved file is the same data)."""
    return f"{format}-" + _digest(
        {
            "version": CACHE_VERSION,
            "format": format,
            "content": content_digest(path) if path is not None else None,
            "schema": content_digest(schema_file) if schema_file is not None else None,
            "max_rows": max_rows,
        }
    )


def fit_key(options: dict[str, Any]) -> str:
    """The fitted preprocessor's key: the split and preprocessing options and the fitted fields' specs."""
    return _digest(options)


def state_key(state: dict[str, Any]) -> str:
    """An encoding's key: the fitted preprocessor's state (its fields, vocabularies, hashes, transforms); a
    vocabulary (a list or an :class:`~lightfmp.data.strings.ArrowStrings`, same digest) is hashed as its
    NUL-joined values (a JSON dump of millions of strings would take seconds)."""
    h = hashlib.blake2b(digest_size=10)
    h.update(json.dumps(state["schema"], sort_keys=True).encode())
    for name, st in state["fields"].items():
        rest = {k: v for k, v in st.items() if k != "vocab"}
        h.update(json.dumps([name, rest], sort_keys=True).encode())
        if "vocab" in st:
            vocab = st["vocab"]
            if isinstance(vocab, ArrowStrings):
                for piece in vocab.nul_joined():
                    h.update(piece)
            else:
                h.update("\0".join(vocab).encode())
            h.update(b"\1")
    return h.hexdigest()


class NpyWriter:
    """An ``.npy`` file of shape ``(rows,) + row_shape`` written by appending row blocks: the header is written
    first with 0 rows and rewritten with the final count by :meth:`close` (its length does not change: numpy
    pads the header so that the leading dimension can grow). Memory: the block being written."""

    def __init__(self, path: Path, dtype: Any, row_shape: tuple[int, ...] = ()) -> None:
        self.path, self.dtype, self.row_shape, self.rows = path, np.dtype(dtype), tuple(row_shape), 0
        self._fh = open(path, "wb")
        self._write_header()

    def _write_header(self) -> None:
        buf = io.BytesIO()
        header = {
            "descr": np.lib.format.dtype_to_descr(self.dtype),
            "fortran_order": False,
            "shape": (self.rows,) + self.row_shape,
        }
        np.lib.format.write_array_header_1_0(buf, header)
        if len(buf.getvalue()) != _HEADER:
            raise RuntimeError(f"unexpected .npy header length {len(buf.getvalue())} for {self.path}")
        self._fh.write(buf.getvalue())

    def append(self, block: np.ndarray) -> None:
        block = np.ascontiguousarray(block, dtype=self.dtype)
        if block.shape[1:] != self.row_shape:
            raise ValueError(f"{self.path.name}: block of shape {block.shape}, expected rows of {self.row_shape}")
        self._fh.write(block.tobytes())
        self.rows += block.shape[0]

    def close(self) -> None:
        self._fh.seek(0)
        self._write_header()
        self._fh.close()


def load_column(path: Path) -> np.ndarray:
    """A column file memory-mapped copy-on-write (writable in memory, never written back: torch maps it without
    a copy); an empty array is returned as an ordinary one (an empty file region cannot be mapped)."""
    with open(path, "rb") as fh:
        np.lib.format.read_magic(fh)
        shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
    if int(np.prod(shape)) == 0:
        return np.zeros(shape, dtype=dtype)
    return np.load(path, mmap_mode="c")


def read_rows(path: Path, start: int, stop: int) -> np.ndarray:
    """Rows ``start:stop`` of an ``.npy`` column file, read into memory (not mapped: the pages of a column read
    block by block do not accumulate in the process's resident memory as a long-lived map's do)."""
    with open(path, "rb") as fh:
        np.lib.format.read_magic(fh)
        shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
        if not 0 <= start <= stop <= shape[0]:
            raise ValueError(f"{path.name}: rows {start}:{stop} out of range for {shape[0]} rows")
        row = int(np.prod(shape[1:], dtype=np.int64))
        fh.seek(fh.tell() + start * row * dtype.itemsize)
        out = np.fromfile(fh, dtype=dtype, count=(stop - start) * row)
    return out.reshape((stop - start,) + tuple(shape[1:]))


def write_json(path: Path, obj: Any) -> None:
    """``obj`` as JSON at ``path``, atomically (a ``.tmp`` file renamed into place)."""
    tmp = path.with_name(path.name + f".tmp-{uuid.uuid4().hex}")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def build_once(final: Path, build: Callable[[Path], None], lock: Union[FileLock, Path]) -> Path:
    """``final``, built by ``build(tmp_dir)`` and renamed into place unless it exists; under ``lock``, so that
    one process builds and the others wait and reuse it. Leftover ``.tmp-*`` directories of killed builds are
    removed first (under the lock nobody else is building them)."""
    if final.is_dir():
        return final
    with lock if isinstance(lock, FileLock) else FileLock(str(lock)):
        if final.is_dir():
            return final
        for stale in final.parent.glob(final.name + ".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        tmp.mkdir(parents=True)
        try:
            build(tmp)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


class RawColumns:
    """The raw columns of one source (see the module docstring), memory-mapped; ``meta`` is ``meta.json``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        meta_path = root / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{str(root)!r} is not a data cache (no meta.json)")
        self.meta: dict[str, Any] = json.loads(meta_path.read_text())
        if self.meta.get("version") != CACHE_VERSION:
            raise ValueError(
                f"{str(root)!r} is a data cache of version {self.meta.get('version', 'before 3')}; this lightfmp "
                f"reads version {CACHE_VERSION} (a current run builds it under another name): remove the directory"
            )
        self.schema = Schema.from_dict(self.meta["schema"])
        self.rows = int(self.meta["rows"])

    def field_file(self, name: str) -> int:
        """Index ``j`` of field ``name``'s files (``ids_<j>.npy`` ...)."""
        return int(self.meta["files"][name])

    @property
    def dense_names(self) -> list[str]:
        """The dense fields in the columns of ``dense.npy``."""
        return list(self.meta["dense"])

    def labels(self) -> np.ndarray:
        return load_column(self.root / "label.npy")

    def time(self) -> Optional[np.ndarray]:
        path = self.root / "time.npy"
        return load_column(path) if path.is_file() else None

    @property
    def dense_path(self) -> Path:
        return self.root / "dense.npy"

    def dense(self) -> np.ndarray:
        return load_column(self.dense_path)

    def ids(self, name: str) -> np.ndarray:
        return load_column(self.root / f"ids_{self.field_file(name)}.npy")

    def id_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of :meth:`ids`, read (:func:`read_rows`), not mapped."""
        return read_rows(self.root / f"ids_{self.field_file(name)}.npy", start, stop)

    def multi(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        j = self.field_file(name)
        return load_column(self.root / f"offsets_{j}.npy"), load_column(self.root / f"values_{j}.npy")

    def key_array(self, name: str) -> Any:
        """The distinct values of a categorical field as an Arrow large string array (no Python strings)."""
        return read_nul_joined(self.root / f"keys_{self.field_file(name)}.txt", int(self.meta["distinct"][name]))

    def keys(self, name: str) -> list[str]:
        """The distinct values of a categorical field; raw id ``i`` is ``keys[i]``. Read from disk at each call
        (not kept: all fields' values at once would cost about 60 bytes per distinct value)."""
        text = (self.root / f"keys_{self.field_file(name)}.txt").read_text(encoding="utf-8")
        keys = text.split("\0") if text else []
        if len(keys) != self.meta["distinct"][name]:
            raise ValueError(
                f"{str(self.root)!r}: field {name!r} lists {len(keys)} values, meta.json says "
                f"{self.meta['distinct'][name]}; remove this cache directory to rebuild it"
            )
        return keys


class DataCache:
    """The cache directory of one data source: where its raw columns, fits and encodings live, and its lock."""

    def __init__(
        self,
        cache_dir: Union[str, Path],
        format: str,
        path: Optional[Union[str, Path]],
        schema_file: Optional[Union[str, Path]] = None,
        max_rows: Optional[int] = None,
    ) -> None:
        self.dir = Path(cache_dir)
        if self.dir.exists() and not self.dir.is_dir():
            raise ValueError(f"cache_dir {str(self.dir)!r} is a file; expected a directory")
        self.dir.mkdir(parents=True, exist_ok=True)
        source = Path(path) if path is not None else None
        if source is not None and not source.exists():
            raise FileNotFoundError(f"data file {str(source)!r} does not exist")
        self.key = source_key(format, source, Path(schema_file) if schema_file else None, max_rows)
        self.root = self.dir / self.key
        self.lock = FileLock(str(self.dir / f"{self.key}.lock"))

    def raw(self, build: Callable[[Path], None]) -> RawColumns:
        """The raw columns, built by ``build(directory)`` unless present."""
        return RawColumns(build_once(self.root, build, self.lock))

    def fit_dir(self, options: dict[str, Any]) -> Path:
        return self.root / f"fit-{fit_key(options)}"

    def encoded_dir(self, state: dict[str, Any]) -> Path:
        return self.root / f"encoded-{state_key(state)}"
