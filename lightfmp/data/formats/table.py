"""``csv`` / ``parquet``: any file with a header (a Parquet file's columns) described by a schema (a YAML path or
a :class:`~lightfmp.data.schema.Schema`)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Optional, Union

import numpy as np
import pandas as pd

from lightfmp.data.formats.base import (
    DEFAULT_CHUNKSIZE,
    PathLike,
    binary_labels,
    check_field_counts,
    check_file,
    check_positive_labels,
    check_unique_columns,
    concat_chunks,
    convert_fields,
    fast_then_exact,
    finish_frame,
    read_chunks,
    read_header,
    select_columns,
)
from lightfmp.data.formats.registry import register_reader
from lightfmp.data.schema import Schema


def read_table(
    path: PathLike,
    schema: Union[Schema, PathLike, None],
    columns: Optional[Iterable[str]] = None,
    chunksize: int = DEFAULT_CHUNKSIZE,
    max_rows: Optional[int] = None,
    file_format: str = "csv",
) -> tuple[pd.DataFrame, Schema]:
    """Any CSV (with header) or Parquet file described by a schema (a :class:`Schema` or a YAML path)."""
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
    else:
        available = read_header(path)
        check_field_counts(path, ",", expected=len(available), skip_lines=1, quote='"')
    missing = [c for c in wanted if c not in available]
    if missing:
        raise ValueError(f"schema does not match {str(path)!r}: missing column(s) {missing}; the file has {available}")
    row_base = 0 if file_format == "parquet" else 1  # Parquet rows are reported as "line" row + 1
    seen_labels: set[str] = set()  # raw label values (a few), named when `positive` matches none of them

    def collect(dense_dtype: Any) -> list[pd.DataFrame]:
        remaining = max_rows if file_format == "parquet" else None  # read_csv applies max_rows itself
        chunks, offset = [], 0
        if file_format == "parquet":
            it: Iterable[pd.DataFrame] = (
                b.to_pandas() for b in pfile.iter_batches(batch_size=chunksize, columns=wanted)
            )
        else:
            dtypes = {f.name: (dense_dtype if f.kind == "dense" else str) for f in schema.fields}
            dtypes[schema.label] = str
            it = read_chunks(
                path,
                chunksize,
                max_rows,
                usecols=wanted,
                dtype=dtypes,
                keep_default_na=False,
                na_values=["", "NA", "NaN", "nan", "null"],
            )
        for chunk in it:
            if remaining is not None:
                chunk = chunk.iloc[:remaining]
                remaining -= len(chunk)
            lines = offset + row_base + 1 + np.arange(len(chunk))
            if schema.positive is not None and len(seen_labels) <= 20:
                seen_labels.update(str(v).strip() for v in pd.unique(chunk[schema.label].dropna()))
            chunk[schema.label] = binary_labels(chunk[schema.label], path, lines, schema.label, schema.positive)
            chunks.append(convert_fields(chunk, schema, path, lines))
            offset += len(chunk)
            if remaining is not None and remaining <= 0:
                break
        return chunks

    frame = concat_chunks(fast_then_exact(collect), path)
    if schema.positive is not None:
        check_positive_labels(frame[schema.label], seen_labels, schema.positive, path, schema.label)
    return finish_frame(frame, schema, path)


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
