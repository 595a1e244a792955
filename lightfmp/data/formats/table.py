"""``csv`` / ``parquet``: any file with a header (a Parquet file's columns) described by a schema (a YAML path or
a :class:`~lightfmp.data.schema.Schema`)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import pandas as pd

from lightfmp.data.formats.base import (
    DEFAULT_CHUNKSIZE,
    Engine,
    PathLike,
    binary_labels,
    check_engine,
    check_file,
    check_positive_labels,
    check_unique_columns,
    concat_chunks,
    finish_chunks,
    finish_frame,
    read_chunks,
    read_header,
    scan_fields,
    select_columns,
    stream_fast_then_exact,
)
from lightfmp.data.formats.registry import Chunks, register_chunk_reader, register_reader
from lightfmp.data.schema import Schema


def iter_table(
    path: PathLike,
    schema: Union[Schema, PathLike, None],
    columns: Optional[Iterable[str]] = None,
    chunksize: int = DEFAULT_CHUNKSIZE,
    max_rows: Optional[int] = None,
    file_format: str = "csv",
) -> Chunks:
    """Any CSV (with header) or Parquet file described by a schema (a :class:`Schema` or a YAML path), streamed
    in chunks of ``chunksize`` rows: pandas' chunked ``read_csv`` (gzip by the ``.gz`` name) after the field-count
    check, or ``pyarrow.parquet.ParquetFile.iter_batches``. Memory: a chunk. With the schema's ``positive``
    values, matching none (or all) of the labels raises after the last chunk."""
    if schema is None:
        raise ValueError(f"format {file_format!r} needs a schema (a YAML file naming label and fields)")
    if not isinstance(schema, Schema):
        schema = Schema.from_yaml(schema)
    path = check_file(path)
    schema = select_columns(schema, columns)
    wanted = list(schema.columns)
    if file_format == "parquet":
        import pyarrow.parquet as pq

        try:
            pfile = pq.ParquetFile(path)
        except Exception as e:  # pyarrow raises several types for a file that is not Parquet
            raise ValueError(f"{str(path)!r} is not a readable Parquet file: {e}") from None
        available = pfile.schema_arrow.names
        check_unique_columns(available, path)
        rows: int = pfile.metadata.num_rows
    else:
        available = read_header(path)
        rows = check_field_counts_rows(path, available)
    missing = [c for c in wanted if c not in available]
    if missing:
        raise ValueError(f"schema does not match {str(path)!r}: missing column(s) {missing}; the file has {available}")
    row_base = 0 if file_format == "parquet" else 1  # Parquet rows are reported as "line" row + 1
    label = schema.label

    def raw(dense_dtype: Any) -> Iterator[pd.DataFrame]:
        if file_format == "csv":
            dtypes = {f.name: (dense_dtype if f.kind == "dense" else str) for f in schema.fields}
            dtypes[label] = str
            yield from read_chunks(
                path,
                chunksize,
                max_rows,
                usecols=wanted,
                dtype=dtypes,
                keep_default_na=False,
                na_values=["", "NA", "NaN", "nan", "null"],
            )
            return
        left = max_rows
        for batch in pfile.iter_batches(batch_size=chunksize, columns=wanted):
            frame = batch.to_pandas()
            if left is not None:
                frame = frame.iloc[:left]
                left -= len(frame)
            if len(frame):
                yield frame
            if left is not None and left <= 0:
                return

    seen: set[str] = set()  # raw label values (a few), named when `positive` matches none of them
    ones = [0, 0]  # positive labels, labels

    def prepare(chunk: pd.DataFrame, lines: np.ndarray) -> pd.DataFrame:
        if schema.positive is not None and len(seen) <= 20:
            seen.update(str(v).strip() for v in pd.unique(chunk[label].dropna()))
        chunk[label] = binary_labels(chunk[label], path, lines, label, schema.positive)
        ones[0] += int(chunk[label].sum())
        ones[1] += len(chunk)
        return chunk

    def frames() -> Iterator[pd.DataFrame]:
        yield from finish_chunks(stream_fast_then_exact(raw), schema, path, row_base + 1, prepare)
        if ones[1] == 0:
            raise ValueError(f"data file {str(path)!r} has no data rows")
        if schema.positive is not None:
            check_positive_labels(ones[0], ones[1], seen, schema.positive, path, label)

    return Chunks(schema, rows if max_rows is None else min(rows, max_rows), frames())


def check_field_counts_rows(path: Path, header: list[str]) -> int:
    """The data rows of a CSV file with ``header``, every record checked to have its field count (quotes
    honoured)."""
    return scan_fields(path, ",", expected=len(header), skip_lines=1, quote='"')[1]


def read_table(
    path: PathLike,
    schema: Union[Schema, PathLike, None],
    columns: Optional[Iterable[str]] = None,
    chunksize: int = DEFAULT_CHUNKSIZE,
    max_rows: Optional[int] = None,
    file_format: str = "csv",
) -> tuple[pd.DataFrame, Schema]:
    """Any CSV (with header) or Parquet file described by a schema: :func:`iter_table`'s chunks in one frame."""
    chunks = iter_table(path, schema, columns, chunksize, max_rows, file_format)
    path = Path(path)
    return finish_frame(concat_chunks(list(chunks.frames), path), chunks.schema, path)


@register_chunk_reader("csv")
def iter_csv(
    path: PathLike,
    columns: Optional[Iterable[str]] = None,
    chunksize: int = DEFAULT_CHUNKSIZE,
    max_rows: Optional[int] = None,
    schema: Union[Schema, PathLike, None] = None,
    engine: Engine = "pandas",
) -> Chunks:
    """A CSV file with a header, described by ``schema`` (required), in chunks (pandas' parser, any ``engine``)."""
    check_engine(engine)
    return iter_table(path, schema, columns, chunksize, max_rows, file_format="csv")


@register_chunk_reader("parquet")
def iter_parquet(
    path: PathLike,
    columns: Optional[Iterable[str]] = None,
    chunksize: int = DEFAULT_CHUNKSIZE,
    max_rows: Optional[int] = None,
    schema: Union[Schema, PathLike, None] = None,
    engine: Engine = "pandas",
) -> Chunks:
    """A Parquet file described by ``schema`` (required), in record batches of ``chunksize`` rows."""
    check_engine(engine)
    return iter_table(path, schema, columns, chunksize, max_rows, file_format="parquet")


@register_reader("csv")
def read_csv(
    path: PathLike,
    columns: Optional[Iterable[str]] = None,
    chunksize: int = DEFAULT_CHUNKSIZE,
    max_rows: Optional[int] = None,
    schema: Union[Schema, PathLike, None] = None,
) -> tuple[pd.DataFrame, Schema]:
    """A CSV file with a header, described by ``schema`` (required)."""
    return read_table(path, schema, columns, chunksize, max_rows, file_format="csv")


@register_reader("parquet")
def read_parquet(
    path: PathLike,
    columns: Optional[Iterable[str]] = None,
    chunksize: int = DEFAULT_CHUNKSIZE,
    max_rows: Optional[int] = None,
    schema: Union[Schema, PathLike, None] = None,
) -> tuple[pd.DataFrame, Schema]:
    """A Parquet file, described by ``schema`` (required)."""
    return read_table(path, schema, columns, chunksize, max_rows, file_format="parquet")
