"""Streaming new rows for scoring: the fields a model needs, read in chunks of rows, with no label column needed.

:func:`feature_chunks` yields ``(frame, row_ids)`` per chunk of at most ``chunksize`` rows; ``frame`` has the
raw columns of the requested fields (dense fields as float64 with NaN for missing, categorical fields as
strings), ready for :meth:`~lightfmp.data.preprocess.Preprocessor.encode_features`. A file is never read whole:
pandas' chunked ``read_csv`` (CSV and TSV) or pyarrow's ``ParquetFile.iter_batches`` read ``chunksize`` rows at a
time, so memory is bounded by the chunk size, not the file size.

``row_ids`` are the row numbers in the file (0 for the first data row) or, with ``id_column``, that column's
values (as strings). Supported formats (``PREDICT_FORMATS``):

* ``csv``: a CSV file with a header naming the fields (any extra columns, the label included, are ignored);
* ``parquet``: the same as a Parquet file;
* ``adult``: a UCI Adult CSV (``?`` is missing, spaces after commas ignored);
* ``avazu``: an Avazu CSV (``hour`` gives ``hour_of_day``, ``weekday``, ``weekend``);
* ``criteo``: a headerless TSV in the training file's column order (``layout``), with or without the leading
  label column (told apart by the field count of the first line).

Bad input raises before anything is scored where it can be seen up front (missing file, missing columns, a line
with another number of fields than the header: :func:`~lightfmp.data.formats.base.check_field_counts`, one
streamed pass over the file, as the training readers do), else when its chunk is read, naming the file, and for
a non-numeric value in a dense field the value, the field and the line.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd

from lightfmp.data.formats.base import (
    PathLike,
    check_field_counts,
    check_file,
    check_unique_columns,
    gzip_errors,
    open_binary,
    read_chunks,
    read_header,
    to_numeric,
)
from lightfmp.data.schema import Schema

PREDICT_FORMATS: tuple[str, ...] = ("csv", "parquet", "adult", "avazu", "criteo")
DEFAULT_PREDICT_CHUNKSIZE = 100_000
_AVAZU_DERIVED = ("hour_of_day", "weekday", "weekend")
_NA_VALUES = ["", "NA", "NaN", "nan", "null"]
_CHECK_BLOCK = 1 << 22  # bytes per block of the field-count check (its temporary arrays take about 10x that)

__all__ = ["DEFAULT_PREDICT_CHUNKSIZE", "PREDICT_FORMATS", "feature_chunks"]


def _check_format(format: str) -> None:
    if format not in PREDICT_FORMATS:
        raise ValueError(
            f"cannot read new rows of format {format!r} for scoring; expected one of {list(PREDICT_FORMATS)} "
            "(write the rows as a CSV file whose header names the fields and pass --data.format csv)"
        )


def _missing_columns(path: Path, wanted: Sequence[str], available: Sequence[str], what: str) -> None:
    missing = [c for c in wanted if c not in available]
    if missing:
        raise ValueError(
            f"{str(path)!r} lacks the {what} column(s) {missing} that the model needs; the file has {list(available)}"
        )


def _first_line_fields(path: Path) -> int:
    with gzip_errors(path), open_binary(path) as fh:
        line = fh.readline().rstrip(b"\r\n")
    return line.count(b"\t") + 1


def feature_chunks(
    format: str,
    path: PathLike,
    schema: Schema,
    chunksize: int = DEFAULT_PREDICT_CHUNKSIZE,
    id_column: Optional[str] = None,
    layout: Optional[Sequence[str]] = None,
) -> Iterator[tuple[pd.DataFrame, np.ndarray]]:
    """``(frame, row_ids)`` chunks of the fields of ``schema`` read from ``path`` (see the module docstring).

    Args:
        format: one of ``PREDICT_FORMATS``.
        schema: the fields to read (the model's kept fields); its label is not needed.
        chunksize: rows per chunk.
        id_column: a column whose values identify the rows (not for ``criteo``, which has no header).
        layout: ``criteo`` only: the field names of the training file in column order, label excluded.

    The checks that need no data (file, format, columns) run when this is called, not at the first chunk.
    """
    _check_format(format)
    if chunksize < 1:
        raise ValueError(f"chunksize must be >= 1, got {chunksize}")
    path = check_file(path)
    names = list(schema.names)
    if format == "criteo":
        if id_column is not None:
            raise ValueError("a criteo file has no header, so it has no id column; drop --id_column")
        if layout is None:
            raise ValueError("reading a criteo file needs the training file's column layout")
        n = _first_line_fields(path)
        if n == len(layout) + 1:
            columns = ["label", *layout]
        elif n == len(layout):
            columns = list(layout)
        else:
            raise ValueError(
                f"{str(path)!r} has {n} tab-separated fields in its first line; the model's training file had "
                f"{len(layout)} fields after the label, so expected {len(layout)} (no label) or {len(layout) + 1}"
            )
        _missing_columns(path, names, columns, "field")
        # a line of another width would shift the fields: refused before anything is scored
        check_field_counts(path, "\t", expected=n, block_bytes=_CHECK_BLOCK)
        chunks = read_chunks(
            path, chunksize, None, sep="\t", header=None, names=columns, usecols=names, dtype=str,
            keep_default_na=False, na_values=[""], quoting=3,
        )  # fmt: skip
        return _convert(chunks, schema, path, None, first_line=1)
    if format == "parquet":
        return _parquet_chunks(path, schema, chunksize, id_column)
    header = [c.strip() for c in read_header(path)] if format == "adult" else read_header(path)
    raw = [c for c in names if not (format == "avazu" and c in _AVAZU_DERIVED)]
    if format == "avazu" and len(raw) < len(names):
        raw.append("hour")
    _missing_columns(path, raw, header, "field")
    if id_column is not None:
        _missing_columns(path, [id_column], header, "id")
    quote = None if format == "avazu" else '"'
    check_field_counts(path, ",", expected=len(header), skip_lines=1, quote=quote, block_bytes=_CHECK_BLOCK)
    usecols = list(dict.fromkeys(raw + ([id_column] if id_column else [])))
    options: dict[str, Any] = {"dtype": str, "keep_default_na": False, "na_values": _NA_VALUES}
    if format == "adult":
        options.update(na_values=["", "?"], skipinitialspace=True)
        chunks = (
            c.rename(columns=str.strip)
            for c in read_chunks(path, chunksize, None, usecols=lambda c: c.strip() in usecols, **options)
        )
    else:
        chunks = read_chunks(path, chunksize, None, usecols=usecols, **options)
    if format == "avazu":
        chunks = (_avazu_hours(c, path) for c in chunks)
    return _convert(chunks, schema, path, id_column, first_line=2, strip=format == "adult")


def _parquet_chunks(
    path: Path, schema: Schema, chunksize: int, id_column: Optional[str]
) -> Iterator[tuple[pd.DataFrame, np.ndarray]]:
    import pyarrow.parquet as pq

    try:
        pfile = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a file that is not Parquet
        raise ValueError(f"{str(path)!r} is not a readable Parquet file: {e}") from None
    available = pfile.schema_arrow.names
    check_unique_columns(available, path)
    _missing_columns(path, schema.names, available, "field")
    if id_column is not None:
        _missing_columns(path, [id_column], available, "id")
    columns = list(dict.fromkeys([*schema.names, *([id_column] if id_column else [])]))
    batches = (b.to_pandas() for b in pfile.iter_batches(batch_size=chunksize, columns=columns))
    return _convert(batches, schema, path, id_column, first_line=1)


def _avazu_hours(chunk: pd.DataFrame, path: Path) -> pd.DataFrame:
    if "hour" not in chunk.columns:
        return chunk
    when = pd.to_datetime(chunk["hour"], format="%y%m%d%H", errors="coerce")
    bad = when.isna().to_numpy()
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"malformed 'hour' {chunk['hour'].iloc[i]!r} in {str(path)!r}: expected YYMMDDHH")
    chunk["hour_of_day"] = when.dt.hour.astype(str)
    chunk["weekday"] = when.dt.dayofweek.astype(str)
    chunk["weekend"] = (when.dt.dayofweek >= 5).astype(int).astype(str)
    return chunk


def _convert(
    chunks: Iterator[pd.DataFrame],
    schema: Schema,
    path: Path,
    id_column: Optional[str],
    first_line: int,
    strip: bool = False,
) -> Iterator[tuple[pd.DataFrame, np.ndarray]]:
    """Dense fields to float64 (a bad value names its line: ``first_line`` is the line of data row 0) and the
    row ids of each chunk."""
    offset = 0
    for chunk in chunks:
        chunk = chunk.reset_index(drop=True)
        rows = offset + np.arange(len(chunk), dtype=np.int64)
        frame = pd.DataFrame(index=chunk.index)
        for f in schema.fields:
            col = chunk[f.name]
            if f.kind == "dense":
                frame[f.name] = to_numeric(col, path, first_line + rows, f.name)
            else:
                frame[f.name] = col.str.strip() if strip and col.dtype == object else col
        ids = rows if id_column is None else chunk[id_column].astype(str).to_numpy()
        offset += len(chunk)
        yield frame, ids
