"""The registry of data formats: the one reader interface and ``register_reader``, which format modules use to
add themselves (``lightfmp.data.formats`` imports them in ``FORMATS`` order); a format that can stream its file
in chunks also registers a :class:`ChunkReader` (``register_chunk_reader``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Optional, Protocol, TypeVar

import pandas as pd

from lightfmp.data.schema import Schema


class Reader(Protocol):
    """How :func:`~lightfmp.data.formats.read_frame` calls a format: keyword arguments, ``(frame, schema)`` back."""

    def __call__(
        self,
        path: Any,
        *,
        columns: Optional[list[str]],
        chunksize: int,
        max_rows: Optional[int],
        schema: Optional[Schema],
    ) -> tuple[pd.DataFrame, Schema]: ...


@dataclass(frozen=True)
class Format:
    """A registered format: its name, its reader, and whether ``path`` may be None (a packaged file)."""

    name: str
    read: Reader
    needs_path: bool = True


READERS: dict[str, Format] = {}
R = TypeVar("R", bound=Callable[..., tuple[pd.DataFrame, Schema]])


def register_reader(name: str, needs_path: bool = True) -> Callable[[R], R]:
    """Decorator: register the decorated function as the reader of format ``name``."""

    def register(read: R) -> R:
        if name in READERS:
            raise ValueError(f"format {name!r} is already registered")
        READERS[name] = Format(name, read, needs_path)
        return read

    return register


@dataclass
class Chunks:
    """A file streamed in chunks: its ``schema``, its number of data ``rows`` (after ``max_rows``; None when not
    known before reading) and ``frames``, an iterator of frames laid out as :func:`read_frame`'s (consumed once).
    When ``rows`` is None, ``size`` (bytes of the file) and ``position()`` (bytes read so far) may show progress."""

    schema: Schema
    rows: Optional[int]
    frames: Iterator[pd.DataFrame]
    size: Optional[int] = None
    position: Optional[Callable[[], int]] = None


class ChunkReader(Protocol):
    """How :func:`~lightfmp.data.formats.iter_frames` calls a streaming format (arguments as :class:`Reader`;
    ``engine``: ``"pandas"`` or ``"arrow"``, the parser)."""

    def __call__(
        self,
        path: Any,
        *,
        columns: Optional[list[str]],
        chunksize: int,
        max_rows: Optional[int],
        schema: Optional[Schema],
        engine: Any,
    ) -> Chunks: ...


CHUNK_READERS: dict[str, ChunkReader] = {}
C = TypeVar("C", bound=Callable[..., Chunks])


def register_chunk_reader(name: str) -> Callable[[C], C]:
    """Decorator: register the decorated function as the streaming reader of format ``name``."""

    def register(read: C) -> C:
        if name in CHUNK_READERS:
            raise ValueError(f"format {name!r} already has a chunk reader")
        CHUNK_READERS[name] = read
        return read

    return register
