"""UCI Adult CSV with header (the packaged copy when ``path`` is None); label ``income`` (``>50K`` or ``>50K.``
is 1, ``<=50K`` or ``<=50K.`` is 0), ``?`` is missing."""

from __future__ import annotations

from collections.abc import Iterable
from importlib import resources
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd

from lightfmp.data.formats.base import (
    DEFAULT_CHUNKSIZE,
    PathLike,
    check_field_counts,
    check_file,
    concat_chunks,
    convert_fields,
    fast_then_exact,
    finish_frame,
    override_schema,
    read_chunks,
    read_header,
    select_columns,
)
from lightfmp.data.formats.registry import register_reader
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


@register_reader("adult", needs_path=False)
def read_adult(
    path: Optional[PathLike] = None,
    columns: Optional[Iterable[str]] = None,
    chunksize: int = DEFAULT_CHUNKSIZE,
    max_rows: Optional[int] = None,
    schema: Optional[Schema] = None,
) -> tuple[pd.DataFrame, Schema]:
    """UCI Adult CSV with header; ``path=None`` reads the copy packaged with lightfmp."""
    if path is None:
        path = adult_path()
    path = check_file(path)
    raw_header = read_header(path)
    header = [c.strip() for c in raw_header]
    missing = [c for c in ADULT_COLUMNS if c not in header]
    if missing:
        raise ValueError(f"schema does not match {str(path)!r}: missing column(s) {missing}; the file has {header}")
    check_field_counts(path, ",", expected=len(header), skip_lines=1)
    full = adult_schema()
    full = override_schema(full, schema)
    schema = select_columns(full, columns)

    def collect(dense_dtype: Any) -> list[pd.DataFrame]:
        dtypes = {raw: (dense_dtype if raw.strip() in dense else str) for raw in raw_header}
        chunks, offset = [], 0
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
            lines = offset + 2 + np.arange(len(chunk))
            raw = chunk["income"].str.strip().str.rstrip(".")
            known = raw.isin([">50K", "<=50K"]).to_numpy()
            if not known.all():
                i = int(np.flatnonzero(~known)[0])
                raise ValueError(
                    f"non-binary label {chunk['income'].iloc[i]!r} in column 'income' of {str(path)!r} "
                    f"at line {int(lines[i])}: expected '>50K' or '<=50K' (optionally with a final '.')"
                )
            chunk["income"] = (raw == ">50K").astype(np.int8)
            for f in schema.fields:
                if f.kind != "dense":
                    chunk[f.name] = chunk[f.name].str.strip()
            chunks.append(convert_fields(chunk, schema, path, lines))
            offset += len(chunk)
        return chunks

    dense = {f.name for f in schema.fields if f.kind == "dense"}
    return finish_frame(concat_chunks(fast_then_exact(collect), path), schema, path)


def adult_path() -> Path:
    """Path of the packaged UCI Adult file (CC BY 4.0; see ``lightfmp/data/resources/ATTRIBUTION.md``)."""
    return Path(str(resources.files("lightfmp.data") / "resources" / "adult.csv.gz"))
