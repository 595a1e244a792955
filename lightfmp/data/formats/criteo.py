"""Criteo Kaggle / DAC TSV without header: label, I1..I13 (integers, may be empty or negative), C1..C26 (hashed
categories, may be empty). A file with more categorical columns is read as C1..Cn."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Optional

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
    first_record_fields,
    override_schema,
    read_chunks,
    scan_fields,
    select_columns,
    stream_fast_then_exact,
)
from lightfmp.data.formats.registry import Chunks, register_chunk_reader, register_reader
from lightfmp.data.schema import FieldSpec, Schema

CRITEO_NUM_DENSE = 13
CRITEO_NUM_SPARSE = 26


def criteo_schema(num_dense: int = CRITEO_NUM_DENSE, num_sparse: int = CRITEO_NUM_SPARSE) -> Schema:
    """The Criteo layout: label, I1..I{num_dense} (dense, log transform), C1..C{num_sparse} (sparse)."""
    return Schema(
        label="label",
        fields=tuple(FieldSpec(f"I{i}", kind="dense", transform="log") for i in range(1, num_dense + 1))
        + tuple(FieldSpec(f"C{i}", kind="sparse") for i in range(1, num_sparse + 1)),
    )


@register_chunk_reader("criteo")
def iter_criteo(
    path: PathLike,
    columns: Optional[Iterable[str]] = None,
    chunksize: int = DEFAULT_CHUNKSIZE,
    max_rows: Optional[int] = None,
    schema: Optional[Schema] = None,
    engine: Engine = "pandas",
) -> Chunks:
    """Criteo Kaggle/DAC TSV (see the module docstring) streamed in chunks of ``chunksize`` rows.

    ``engine="pandas"``: the file is checked first (field counts, row count: ``Chunks.rows``), then read by
    pandas' C parser. ``engine="arrow"``: one pass, parsed by pyarrow (:func:`~lightfmp.data.formats.base.
    arrow_chunks`: categorical fields as Arrow dictionary arrays of the same strings, a chunk per block of about
    ``chunksize`` rows, progress in bytes); Arrow checks the field counts while parsing, and at its first error
    the file is checked and read by the pandas path, which names the bad line."""
    check_engine(engine)
    path = check_file(path)
    n, rows = scan_fields(path, "\t") if engine == "pandas" else (first_record_fields(path, "\t"), None)
    if n < 1 + CRITEO_NUM_DENSE + 1:
        raise ValueError(
            f"{str(path)!r} has {n} tab-separated fields; the Criteo layout needs label, "
            f"I1..I{CRITEO_NUM_DENSE} and at least one categorical field"
        )
    full = criteo_schema(CRITEO_NUM_DENSE, n - 1 - CRITEO_NUM_DENSE)
    full = override_schema(full, schema)
    schema = select_columns(full, columns)
    names = (
        ["label"]
        + [f"I{i}" for i in range(1, CRITEO_NUM_DENSE + 1)]
        + [f"C{i}" for i in range(1, n - CRITEO_NUM_DENSE)]
    )
    usecols = ["label"] + list(schema.names)
    dense = {f.name for f in schema.fields if f.kind == "dense"}

    def pandas_chunks(dense_dtype: Any) -> Iterator[pd.DataFrame]:
        dtypes = {c: (dense_dtype if c in dense else str) for c in usecols}
        return read_chunks(
            path,
            chunksize,
            max_rows,
            sep="\t",
            header=None,
            names=names,
            usecols=usecols,
            dtype=dtypes,
            keep_default_na=False,
            na_values=[""],
            quoting=3,
        )

    def checked_pandas() -> Iterator[pd.DataFrame]:
        if engine == "arrow":
            scan_fields(path, "\t", expected=n)
        return stream_fast_then_exact(pandas_chunks)

    read = [0]  # bytes of the file read by the Arrow path (its progress)

    def advance(position: int) -> None:
        read[0] = position

    def raw() -> Iterator[pd.DataFrame]:
        if engine == "pandas":
            return checked_pandas()
        kinds: dict[str, ArrowKind] = {
            c: ("number" if c in dense else "text" if c == "label" else "category") for c in usecols
        }
        return arrow_then_pandas(
            lambda: arrow_chunks(path, names, kinds, "\t", chunksize, max_rows, progress=advance),
            checked_pandas,
        )

    def label(chunk: pd.DataFrame, lines: np.ndarray) -> pd.DataFrame:
        chunk["label"] = binary_labels(chunk["label"], path, lines, "label")
        return chunk

    frames = finish_chunks(raw(), schema, path, 1, label)
    if rows is not None:
        return Chunks(schema, rows if max_rows is None else min(rows, max_rows), frames)
    return Chunks(schema, None, frames, size=path.stat().st_size, position=lambda: read[0])


@register_reader("criteo")
def read_criteo(
    path: PathLike,
    columns: Optional[Iterable[str]] = None,
    chunksize: int = DEFAULT_CHUNKSIZE,
    max_rows: Optional[int] = None,
    schema: Optional[Schema] = None,
) -> tuple[pd.DataFrame, Schema]:
    """Criteo Kaggle/DAC TSV (see the module docstring): :func:`iter_criteo`'s chunks in one frame."""
    chunks = iter_criteo(path, columns=columns, chunksize=chunksize, max_rows=max_rows, schema=schema)
    path = Path(path)
    return finish_frame(concat_chunks(list(chunks.frames), path), chunks.schema, path)
