"""UCI Adult CSV with header (the packaged copy when ``path`` is None); label ``income`` (``>50K`` or ``>50K.``
is 1, ``<=50K`` or ``<=50K.`` is 0), ``?`` is missing."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from importlib import resources
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd

from lightfmp.data.formats.base import (
    DEFAULT_CHUNKSIZE,
    Engine,
    PathLike,
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
    stream_fast_then_exact,
)
from lightfmp.data.formats.registry import Chunks, register_chunk_reader, register_reader
from lightfmp.data.schema import FieldSpec, Schema

ADULT_COLUMNS = (
    "age",
    "workclass",
    "fnlwgt",
    "education",
    "educational-num",
    "marital-status",
    "occupation",
    "relationship",
    "race",
    "gender",
    "capital-gain",
    "capital-loss",
    "hours-per-week",
    "native-country",
    "income",
)
ADULT_DENSE = ("age", "fnlwgt", "educational-num", "capital-gain", "capital-loss", "hours-per-week")


def adult_schema() -> Schema:
    """Label ``income``; the six numeric columns dense (log transform), the others sparse."""
    return Schema(
        label="income",
        fields=tuple(
            FieldSpec(c, kind="dense", transform="log") if c in ADULT_DENSE else FieldSpec(c, kind="sparse")
            for c in ADULT_COLUMNS[:-1]
        ),
    )


@register_chunk_reader("adult")
def iter_adult(
    path: Optional[PathLike] = None,
    columns: Optional[Iterable[str]] = None,
    chunksize: int = DEFAULT_CHUNKSIZE,
    max_rows: Optional[int] = None,
    schema: Optional[Schema] = None,
    engine: Engine = "pandas",
) -> Chunks:
    """UCI Adult CSV with header (``path=None``: the copy packaged with lightfmp) in chunks of ``chunksize`` rows
    (pandas' parser, any ``engine``), after the header and field-count check."""
    check_engine(engine)
    if path is None:
        path = adult_path()
    path = check_file(path)
    raw_header = read_header(path)
    header = [c.strip() for c in raw_header]
    missing = [c for c in ADULT_COLUMNS if c not in header]
    if missing:
        raise ValueError(f"schema does not match {str(path)!r}: missing column(s) {missing}; the file has {header}")
    rows = scan_fields(path, ",", expected=len(header), skip_lines=1)[1]
    full = adult_schema()
    full = override_schema(full, schema)
    schema = select_columns(full, columns)
    dense = {f.name for f in schema.fields if f.kind == "dense"}

    def raw(dense_dtype: Any) -> Iterator[pd.DataFrame]:
        dtypes = {name: (dense_dtype if name.strip() in dense else str) for name in raw_header}
        for chunk in read_chunks(
            path,
            chunksize,
            max_rows,
            usecols=lambda c: c.strip() in schema.columns,
            dtype=dtypes,
            keep_default_na=False,
            na_values=["", "?"],
            skipinitialspace=True,
        ):
            chunk.columns = [c.strip() for c in chunk.columns]
            yield chunk

    def prepare(chunk: pd.DataFrame, lines: np.ndarray) -> pd.DataFrame:
        label = chunk["income"].str.strip().str.rstrip(".")
        known = label.isin([">50K", "<=50K"]).to_numpy()
        if not known.all():
            i = int(np.flatnonzero(~known)[0])
            raise ValueError(
                f"non-binary label {chunk['income'].iloc[i]!r} in column 'income' of {str(path)!r} "
                f"at line {int(lines[i])}: expected '>50K' or '<=50K' (optionally with a final '.')"
            )
        chunk["income"] = (label == ">50K").astype(np.int8)
        for f in schema.fields:
            if f.kind != "dense":
                chunk[f.name] = chunk[f.name].str.strip()
        return chunk

    frames = finish_chunks(stream_fast_then_exact(raw), schema, path, 2, prepare)
    return Chunks(schema, rows if max_rows is None else min(rows, max_rows), frames)


@register_reader("adult", needs_path=False)
def read_adult(
    path: Optional[PathLike] = None,
    columns: Optional[Iterable[str]] = None,
    chunksize: int = DEFAULT_CHUNKSIZE,
    max_rows: Optional[int] = None,
    schema: Optional[Schema] = None,
) -> tuple[pd.DataFrame, Schema]:
    """UCI Adult CSV with header; ``path=None`` reads the copy packaged with lightfmp: :func:`iter_adult`'s chunks
    in one frame."""
    chunks = iter_adult(path, columns=columns, chunksize=chunksize, max_rows=max_rows, schema=schema)
    where = Path(path) if path is not None else adult_path()
    return finish_frame(concat_chunks(list(chunks.frames), where), chunks.schema, where)


def adult_path() -> Path:
    """Path of the packaged UCI Adult file (CC BY 4.0; see ``lightfmp/data/resources/ATTRIBUTION.md``)."""
    return Path(str(resources.files("lightfmp.data") / "resources" / "adult.csv.gz"))
