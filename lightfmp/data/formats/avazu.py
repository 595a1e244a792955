"""Avazu CSV with header (id, click, hour, ...). ``hour`` (YYMMDDHH) is the time column and gives the fields
``hour_of_day``, ``weekday``, ``weekend``; ``id`` is dropped; every other column is a sparse field."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from lightfmp.data.formats.base import (
    DEFAULT_CHUNKSIZE,
    ArrowKind,
    Engine,
    PathLike,
    arrow_chunks,
    arrow_then_pandas,
    binary_labels,
    check_engine,
    check_file,
    concat_chunks,
    finish_chunks,
    finish_frame,
    override_schema,
    read_chunks,
    read_header,
    scan_fields,
    select_columns,
)
from lightfmp.data.formats.registry import Chunks, register_chunk_reader, register_reader
from lightfmp.data.schema import FieldSpec, Schema


def avazu_schema(file_columns: Sequence[str]) -> Schema:
    """The Avazu fields of a file with these header columns: the three derived from ``hour``, then the others."""
    other = [c for c in file_columns if c not in ("id", "click", "hour")]
    names = ["hour_of_day", "weekday", "weekend"] + other
    return Schema(label="click", time_column="hour", fields=tuple(FieldSpec(n) for n in names))


@register_chunk_reader("avazu")
def iter_avazu(
    path: PathLike,
    columns: Optional[Iterable[str]] = None,
    chunksize: int = DEFAULT_CHUNKSIZE,
    max_rows: Optional[int] = None,
    schema: Optional[Schema] = None,
    engine: Engine = "pandas",
) -> Chunks:
    """Avazu CSV with header (see the module docstring) streamed in chunks of ``chunksize`` rows; the header is
    checked first, and with ``engine="pandas"`` the field counts and row count too. ``engine="arrow"``: one pass
    parsed by pyarrow, as :func:`~lightfmp.data.formats.criteo.iter_criteo`."""
    check_engine(engine)
    path = check_file(path)
    header = read_header(path)
    missing = [c for c in ("click", "hour") if c not in header]
    if missing:
        raise ValueError(
            f"schema does not match {str(path)!r}: missing column(s) {missing} "
            f"(an Avazu file needs 'click' and 'hour'); the file has {header}"
        )
    rows = scan_fields(path, ",", expected=len(header), skip_lines=1)[1] if engine == "pandas" else None
    full = avazu_schema(header)
    full = override_schema(full, schema)
    schema = select_columns(full, columns)
    derived = {"hour_of_day", "weekday", "weekend"}
    usecols = ["click", "hour"] + [n for n in schema.names if n not in derived]

    def pandas_chunks() -> Iterator[pd.DataFrame]:
        if engine == "arrow":
            scan_fields(path, ",", expected=len(header), skip_lines=1)
        return read_chunks(path, chunksize, max_rows, usecols=usecols, dtype=str, keep_default_na=False, na_values=[""])

    read = [0]  # bytes of the file read by the Arrow path (its progress)

    def advance(position: int) -> None:
        read[0] = position

    def raw() -> Iterator[pd.DataFrame]:
        if engine == "pandas":
            return pandas_chunks()
        kinds: dict[str, ArrowKind] = {c: ("text" if c in ("click", "hour") else "category") for c in usecols}
        return arrow_then_pandas(
            lambda: arrow_chunks(
                path, header, kinds, ",", chunksize, max_rows, skip_rows=1, quote=True, progress=advance
            ),
            pandas_chunks,
        )

    def prepare(chunk: pd.DataFrame, lines: np.ndarray) -> pd.DataFrame:
        chunk["click"] = binary_labels(chunk["click"], path, lines, "click")
        hour = chunk["hour"].astype(str)
        when = pd.to_datetime(hour, format="%y%m%d%H", errors="coerce")
        bad = when.isna().to_numpy()
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(
                f"malformed 'hour' {chunk['hour'].iloc[i]!r} in {str(path)!r} at line {int(lines[i])}: "
                "expected YYMMDDHH"
            )
        chunk["hour"] = hour.astype(np.int64)
        chunk["hour_of_day"] = when.dt.hour.astype(str)
        chunk["weekday"] = when.dt.dayofweek.astype(str)
        chunk["weekend"] = (when.dt.dayofweek >= 5).astype(int).astype(str)
        return chunk

    frames = finish_chunks(raw(), schema, path, 2, prepare)
    if rows is not None:
        return Chunks(schema, rows if max_rows is None else min(rows, max_rows), frames)
    return Chunks(schema, None, frames, size=path.stat().st_size, position=lambda: read[0])


@register_reader("avazu")
def read_avazu(
    path: PathLike,
    columns: Optional[Iterable[str]] = None,
    chunksize: int = DEFAULT_CHUNKSIZE,
    max_rows: Optional[int] = None,
    schema: Optional[Schema] = None,
) -> tuple[pd.DataFrame, Schema]:
    """Avazu CSV with header (see the module docstring): :func:`iter_avazu`'s chunks in one frame."""
    chunks = iter_avazu(path, columns=columns, chunksize=chunksize, max_rows=max_rows, schema=schema)
    path = Path(path)
    return finish_frame(concat_chunks(list(chunks.frames), path), chunks.schema, path)
