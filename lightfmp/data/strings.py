"""Arrow string arrays handled with numpy over their buffers, without a Python object per string: 64-bit
tabulation hashes, NUL-joined bytes (the cache's ``keys_<j>.txt``) and back, and :class:`ArrowStrings`, a
sequence of strings kept in Arrow buffers (a fitted vocabulary).

Tabulation hashing: ``h(s) = T[0, s_0] xor T[1, s_1] xor ... xor T[L-1, s_{L-1}]`` over the UTF-8 bytes ``s_i``
of a string of length ``L``, with ``T`` a table of independent uniform 64-bit words (seeded, one row of 256 per
byte position, grown on demand). Two different strings differ in at least one (position, byte) pair, so their
hashes are equal with probability ``2^-64`` (tabulation hashing is 3-independent): ``n`` distinct strings
collide with probability about ``n^2 / 2^65``. Cost: a few numpy passes over the bytes; the table holds 2 KiB
per position (a string longer than :data:`MAX_TABLE_LENGTH` bytes is hashed by pandas' ``hash_array`` of its
Python string instead: which function hashes a string depends on its length only, never on the other strings
hashed with it, so a value has one hash in every chunk).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Union, overload

import numpy as np
import pandas as pd
import pyarrow as pa

MAX_TABLE_LENGTH = 4096
_SEED = 0x1F3D5B79


def _buffers(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """``(offsets int64 (n + 1,) from 0, data uint8)`` of a string / large string array (nulls read as empty)."""
    if pa.types.is_string(arr.type):
        width = 4
    elif pa.types.is_large_string(arr.type):
        width = 8
    else:
        raise TypeError(f"expected an Arrow string array, got type {arr.type}")
    n = len(arr)
    bufs = arr.buffers()
    offsets = np.frombuffer(bufs[1], dtype=np.int32 if width == 4 else np.int64, count=n + 1, offset=arr.offset * width)
    offsets = offsets.astype(np.int64)
    base, total = int(offsets[0]), int(offsets[-1] - offsets[0])
    data = np.frombuffer(bufs[2], dtype=np.uint8, count=total, offset=base) if total else np.zeros(0, np.uint8)
    return offsets - base, data


class TabulationHash:
    """The 64-bit tabulation hash of the module docstring (the table grows with the longest string seen)."""

    def __init__(self, seed: int = _SEED) -> None:
        self.seed = seed
        self.table = np.zeros((0, 256), dtype=np.uint64)

    def _grow(self, length: int) -> None:
        rows = [self.table]
        for pos in range(len(self.table), length):
            rng = np.random.default_rng([self.seed, pos])
            rows.append(rng.integers(0, 2**64, size=(1, 256), dtype=np.uint64, endpoint=False))
        self.table = np.concatenate(rows)

    def __call__(self, arr: Any) -> np.ndarray:
        """uint64 hashes (n,) of the strings of ``arr`` (an Arrow string array; nulls hash as the empty string)."""
        offsets, data = _buffers(arr)
        lens = np.diff(offsets)
        out = np.zeros(len(lens), dtype=np.uint64)
        if len(data) == 0:
            return out
        long = np.flatnonzero(lens > MAX_TABLE_LENGTH)
        if len(long):  # those strings alone by pandas' hash (a function of the string, not of its neighbours)
            out[long] = pd.util.hash_array(
                np.asarray(arr.take(pa.array(long)).to_pylist(), dtype=object), categorize=False
            )
            lens = np.where(lens > MAX_TABLE_LENGTH, 0, lens)
            keep = np.repeat(lens > 0, np.diff(offsets))  # bytes of the strings left to the table
            data = data[keep]
            offsets = np.concatenate([[0], np.cumsum(lens)])
            if len(data) == 0:
                return out
        longest = int(lens.max())
        if longest > len(self.table):
            self._grow(longest)
        starts = offsets[:-1]
        pos = np.arange(len(data), dtype=np.int64) - np.repeat(starts, lens)
        per_byte = self.table.ravel()[pos * 256 + data]
        present = lens > 0
        out[present] = np.bitwise_xor.reduceat(per_byte, starts[present])
        return out


def nul_joined(arr: Any) -> bytes:
    """The UTF-8 bytes of the strings of ``arr`` joined by NUL characters; a string holding a NUL raises
    ``ValueError`` naming it (the separator must not occur in a value)."""
    offsets, data = _buffers(arr)
    n = len(offsets) - 1
    zero = np.flatnonzero(data == 0)
    if len(zero):
        i = int(np.searchsorted(offsets, zero[0], side="right") - 1)
        raise ValueError(f"a categorical value holds a NUL character: {arr[i].as_py()!r}")
    if n <= 1:
        return data.tobytes()
    out = np.zeros(len(data) + n - 1, dtype=np.uint8)
    lens = np.diff(offsets)
    out[np.arange(len(data), dtype=np.int64) + np.repeat(np.arange(n, dtype=np.int64), lens)] = data
    return out.tobytes()


def read_nul_joined(path: Path, count: int) -> pa.Array:
    """The ``count`` strings of a file written by :func:`nul_joined` (pieces appended with a NUL between them),
    as an Arrow large string array (no Python strings)."""
    data = np.fromfile(path, dtype=np.uint8)
    if count == 0:
        return pa.array([], type=pa.large_string())
    nul = np.flatnonzero(data == 0)
    if len(nul) != count - 1:
        raise ValueError(f"{str(path)!r} holds {len(nul) + 1} values, expected {count}")
    starts = np.concatenate([[0], nul + 1]).astype(np.int64)
    ends = np.concatenate([nul, [len(data)]]).astype(np.int64)
    keep = np.ones(len(data), dtype=bool)
    keep[nul] = False
    packed = data[keep]
    offsets = np.concatenate([[0], np.cumsum(ends - starts)]).astype(np.int64)
    return pa.LargeStringArray.from_buffers(count, pa.py_buffer(offsets), pa.py_buffer(packed))


class ArrowStrings(Sequence[str]):
    """An immutable sequence of strings over an Arrow (large) string array: about 16 bytes per value (offset
    and UTF-8 bytes) where a Python list of short strings costs about 65; a fitted vocabulary of millions of
    values is kept this way (:func:`~lightfmp.data.preprocess.rank_vocabulary` of an Arrow array). Equal to a
    list or tuple of the same strings (``==`` converts, for tests); :meth:`tolist` makes the Python strings
    (JSON, pandas' index)."""

    __slots__ = ("array",)

    def __init__(self, array: Any) -> None:
        if isinstance(array, pa.ChunkedArray):
            array = array.combine_chunks()
        if not (pa.types.is_string(array.type) or pa.types.is_large_string(array.type)):
            raise TypeError(f"expected an Arrow string array, got type {array.type}")
        if array.null_count:
            raise ValueError(f"an ArrowStrings holds no nulls; got {array.null_count}")
        self.array = array

    def __len__(self) -> int:
        return len(self.array)

    @overload
    def __getitem__(self, i: int) -> str: ...
    @overload
    def __getitem__(self, i: slice) -> list[str]: ...
    def __getitem__(self, i: Union[int, slice]) -> Union[str, list[str]]:
        if isinstance(i, slice):
            return self.tolist()[i]
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} strings")
        return str(self.array[i].as_py())

    def __iter__(self) -> Iterator[str]:
        step = 1 << 16  # Python strings for one slice at a time
        for start in range(0, len(self.array), step):
            yield from self.array.slice(start, step).to_pylist()

    def tolist(self) -> list[str]:
        return list(self.array.to_pylist())

    def nul_joined(self, step: int = 1 << 16) -> Iterator[bytes]:
        """Pieces whose concatenation is the UTF-8 bytes of the strings joined by NUL (``"\\0".join(self)
        .encode()``), ``step`` strings at a time: no Python strings, and memory for one piece."""
        for start in range(0, len(self.array), step):
            yield (b"\0" if start else b"") + nul_joined(self.array.slice(start, step))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ArrowStrings):
            large = pa.large_string()
            return bool(self.array.cast(large).equals(other.array.cast(large)))
        if isinstance(other, (list, tuple)):
            return len(self) == len(other) and self.tolist() == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        head = ", ".join(repr(s) for s in self.array.slice(0, 3).to_pylist())
        return f"ArrowStrings([{head}{', ...' if len(self) > 3 else ''}], {len(self)} strings)"


def as_list(values: Sequence[str]) -> list[str]:
    """``values`` as a Python list: an :class:`ArrowStrings` converted, a list returned as it is."""
    if isinstance(values, list):
        return values
    return values.tolist() if isinstance(values, ArrowStrings) else list(values)
