"""Readers: raw files -> a pandas DataFrame with the columns of a :class:`~lightfmp.data.schema.Schema`.

:func:`read_frame` returns ``(frame, schema)``. The frame has one column per schema field (in no particular
order) (dense fields as float64 with NaN for missing; sparse fields as strings with NaN for missing;
multi-valued fields as separator-joined strings or lists), the label as int8 in {0, 1}, and the time column
when the schema has one. Files are read with pandas in chunks; ``columns`` restricts the read to some fields
(plus the label and the time column), which is how the fine-tuning stage reads only the kept fields.

One module per format (its docstring describes the layout): :mod:`.criteo`, :mod:`.avazu`, :mod:`.movielens`,
:mod:`.adult`, :mod:`.table` (``csv`` and ``parquet``). Each registers its reader with
:func:`~lightfmp.data.formats.registry.register_reader`; :func:`read_frame` dispatches by name, and
``FORMATS`` lists the registered names. Shared helpers live in :mod:`.base`.

:func:`iter_frames` streams a file as :class:`~lightfmp.data.formats.registry.Chunks` (the same frames, a chunk
at a time; memory holds one chunk): every format registers a chunk reader (gzip streamed too); MovieLens streams
its ratings and reads its small users and movies tables whole. ``engine="arrow"`` parses Criteo and Avazu with
pyarrow (what the data cache uses).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Optional, Union

import pandas as pd

from lightfmp.data.formats.adult import ADULT_COLUMNS, ADULT_DENSE, adult_path, adult_schema, read_adult  # noqa: E402
from lightfmp.data.formats.avazu import avazu_schema, iter_avazu, read_avazu  # noqa: E402
from lightfmp.data.formats.base import DEFAULT_CHUNKSIZE, Engine, PathLike, binary_labels, check_field_counts

# Imported for their registration, in FORMATS order.
from lightfmp.data.formats.criteo import (  # noqa: E402
    CRITEO_NUM_DENSE,
    CRITEO_NUM_SPARSE,
    criteo_schema,
    iter_criteo,
    read_criteo,
)
from lightfmp.data.formats.movielens import (  # noqa: E402
    ML100K_GENRES,
    ML_AGE_GROUPS,
    movielens_schema,
    read_movielens,
)
from lightfmp.data.formats.registry import (
    CHUNK_READERS,
    READERS,
    Chunks,
    Format,
    Reader,
    register_chunk_reader,
    register_reader,
)
from lightfmp.data.formats.table import read_csv, read_parquet, read_table  # noqa: E402
from lightfmp.data.schema import Schema

FORMATS: tuple[str, ...] = tuple(READERS)

__all__ = [
    "ADULT_COLUMNS",
    "CHUNK_READERS",
    "Chunks",
    "ADULT_DENSE",
    "CRITEO_NUM_DENSE",
    "CRITEO_NUM_SPARSE",
    "DEFAULT_CHUNKSIZE",
    "FORMATS",
    "ML100K_GENRES",
    "ML_AGE_GROUPS",
    "READERS",
    "Format",
    "PathLike",
    "Reader",
    "adult_path",
    "adult_schema",
    "avazu_schema",
    "binary_labels",
    "check_field_counts",
    "criteo_schema",
    "iter_avazu",
    "iter_criteo",
    "iter_frames",
    "movielens_schema",
    "read_adult",
    "read_avazu",
    "read_criteo",
    "read_csv",
    "read_frame",
    "read_movielens",
    "read_parquet",
    "read_table",
    "register_chunk_reader",
    "register_reader",
]


def _check_options(format: str, chunksize: int, max_rows: Optional[int]) -> None:
    if format not in READERS:
        raise ValueError(f"unknown data format {format!r}; expected one of {list(FORMATS)}")
    if max_rows is not None and max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows}")
    if chunksize < 1:
        raise ValueError(f"chunksize must be >= 1, got {chunksize}")


def iter_frames(
    format: str,
    path: Optional[PathLike] = None,
    schema: Union[Schema, PathLike, None] = None,
    columns: Optional[Iterable[str]] = None,
    chunksize: int = DEFAULT_CHUNKSIZE,
    max_rows: Optional[int] = None,
    engine: Engine = "pandas",
) -> Chunks:
    """The data set as :class:`Chunks` of about ``chunksize`` rows (arguments as :func:`read_frame`); a
    format without a chunk reader is read whole and then cut (see the module docstring). ``engine="arrow"``:
    a streaming reader parses with pyarrow (categorical fields as pandas categoricals of the same strings)."""
    _check_options(format, chunksize, max_rows)
    if schema is not None and not isinstance(schema, Schema):
        schema = Schema.from_yaml(schema)
    cols = None if columns is None else list(columns)
    stream = CHUNK_READERS.get(format)
    if stream is not None:
        if path is None and READERS[format].needs_path:
            raise ValueError(f"format {format!r} needs a path")
        return stream(path, columns=cols, chunksize=chunksize, max_rows=max_rows, schema=schema, engine=engine)
    frame, full = read_frame(format, path, schema, cols, chunksize, max_rows)

    def cut() -> Iterator[pd.DataFrame]:
        for start in range(0, len(frame), chunksize):
            yield frame.iloc[start : start + chunksize]

    return Chunks(full, len(frame), cut())


def read_frame(
    format: str,
    path: Optional[PathLike] = None,
    schema: Union[Schema, PathLike, None] = None,
    columns: Optional[Iterable[str]] = None,
    chunksize: int = DEFAULT_CHUNKSIZE,
    max_rows: Optional[int] = None,
) -> tuple[pd.DataFrame, Schema]:
    """Read a data set into ``(frame, schema)``; see the module docstring for formats and frame layout.

    Args:
        format: one of ``FORMATS``: ``criteo``, ``avazu``, ``movielens``, ``adult``, ``csv``, ``parquet``.
        path: the file (a directory for MovieLens); optional for ``adult`` (the packaged copy).
        schema: required for csv/parquet; for the built-in formats an optional override (same field names,
            e.g. other transforms or min counts).
        columns: read only these fields (plus label and time column); unknown names raise ``KeyError``.
        chunksize: rows per pandas chunk.
        max_rows: read at most this many rows: the first ones in file order (a prefix, not a sample).
    """
    _check_options(format, chunksize, max_rows)
    reader = READERS[format]
    if path is None and reader.needs_path:
        raise ValueError(f"format {format!r} needs a path")
    if schema is not None and not isinstance(schema, Schema):
        schema = Schema.from_yaml(schema)
    return reader.read(
        path, columns=None if columns is None else list(columns), chunksize=chunksize, max_rows=max_rows, schema=schema
    )
