"""A GroupLens MovieLens directory, ml-100k (``u.data``, ``u.user``, ``u.item``) or ml-1m (``ratings.dat``,
``users.dat``, ``movies.dat``), detected from the file names. Label ``rating >= 4``; fields user_id, item_id, age
(100k ages bucketed into ml-1m's age groups), gender, occupation, zip_prefix (first 3 characters), genres
(multi-valued), release_year; time column ``timestamp``."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd

from lightfmp.data.formats.base import (
    DEFAULT_CHUNKSIZE,
    PathLike,
    check_field_counts,
    check_file,
    finish_frame,
    override_schema,
    select_columns,
)
from lightfmp.data.formats.registry import register_reader
from lightfmp.data.schema import FieldSpec, Schema

ML100K_GENRES = (
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
)
# ml-1m's age groups (lower bounds); ml-100k's exact ages are bucketed into them.
ML_AGE_GROUPS = (1, 18, 25, 35, 45, 50, 56)


def movielens_schema() -> Schema:
    """The MovieLens fields (see the module docstring)."""
    return Schema(
        label="rating",
        time_column="timestamp",
        fields=(
            FieldSpec("user_id"),
            FieldSpec("item_id"),
            FieldSpec("age"),
            FieldSpec("gender"),
            FieldSpec("occupation"),
            FieldSpec("zip_prefix"),
            FieldSpec("genres", kind="multi", separator="|", pooling="mean"),
            FieldSpec("release_year"),
        ),
    )


def _ml_table(path: Path, sep: str, names: Sequence[str], encoding: str) -> pd.DataFrame:
    check_file(path)
    check_field_counts(path, sep, expected=len(names))
    kwargs: dict[str, Any] = dict(
        sep=sep,
        header=None,
        names=list(names),
        dtype=str,
        keep_default_na=False,
        na_values=[""],
        encoding=encoding,
        quoting=3,
    )
    if len(sep) > 1:
        kwargs["engine"] = "python"
        kwargs["sep"] = sep.replace(":", "[:]")  # a literal multi-character separator, not a regex
    try:
        return pd.read_csv(path, **kwargs)
    except pd.errors.ParserError as e:
        raise ValueError(f"malformed row in {str(path)!r}: {e}") from None


def _ml_int(col: pd.Series, path: Path, name: str, line_offset: int = 1) -> pd.Series:
    num = pd.to_numeric(col, errors="coerce")
    bad = (num.isna() | (num != num.round())).to_numpy()
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"malformed {name} {col.iloc[i]!r} in {str(path)!r} at line {i + line_offset}: expected an integer"
        )
    return num.astype(np.int64)


@register_reader("movielens")
def read_movielens(
    path: PathLike,
    columns: Optional[Iterable[str]] = None,
    chunksize: int = DEFAULT_CHUNKSIZE,
    max_rows: Optional[int] = None,
    schema: Optional[Schema] = None,
) -> tuple[pd.DataFrame, Schema]:
    """A GroupLens MovieLens directory (ml-100k or ml-1m layout; see the module docstring)."""
    root = Path(path)
    if root.is_file():
        root = root.parent
    if not root.is_dir():
        raise FileNotFoundError(f"MovieLens directory {str(root)!r} does not exist")
    if (root / "u.data").exists():
        ratings_path = root / "u.data"
        ratings = _ml_table(ratings_path, "\t", ["user_id", "item_id", "rating", "timestamp"], "latin-1")
        users = _ml_table(root / "u.user", "|", ["user_id", "age", "gender", "occupation", "zip"], "latin-1")
        item_cols = ["item_id", "title", "release_date", "video_release_date", "url"] + [f"g{i}" for i in range(19)]
        items = _ml_table(root / "u.item", "|", item_cols, "latin-1")
        ages = _ml_int(users["age"], root / "u.user", "age")
        groups = np.asarray(ML_AGE_GROUPS)
        users["age"] = groups[np.clip(np.searchsorted(groups, ages.to_numpy(), side="right") - 1, 0, None)].astype(str)
        flags = items[[f"g{i}" for i in range(19)]].fillna("0").to_numpy() == "1"
        names = np.asarray(ML100K_GENRES, dtype=object)
        items["genres"] = ["|".join(names[row]) for row in flags]  # once per movie, not per rating
        items["release_year"] = items["release_date"].str.extract(r"(\d{4})\s*$", expand=False)
    elif (root / "ratings.dat").exists():
        ratings_path = root / "ratings.dat"
        ratings = _ml_table(ratings_path, "::", ["user_id", "item_id", "rating", "timestamp"], "latin-1")
        users = _ml_table(root / "users.dat", "::", ["user_id", "gender", "age", "occupation", "zip"], "latin-1")
        items = _ml_table(root / "movies.dat", "::", ["item_id", "title", "genres"], "latin-1")
        items["release_year"] = items["title"].str.extract(r"\((\d{4})\)\s*$", expand=False)
    else:
        raise ValueError(
            f"{str(root)!r} is not a MovieLens directory: expected u.data, u.user, u.item (ml-100k) "
            "or ratings.dat, users.dat, movies.dat (ml-1m)"
        )
    if len(ratings) == 0:
        raise ValueError(f"data file {str(ratings_path)!r} has no data rows")
    if max_rows is not None:
        ratings = ratings.iloc[:max_rows]
    rating = _ml_int(ratings["rating"], ratings_path, "rating")
    out_of_range = ~rating.between(1, 5)
    if out_of_range.any():
        i = int(np.flatnonzero(out_of_range.to_numpy())[0])
        raise ValueError(f"rating {rating.iloc[i]} in {str(ratings_path)!r} at line {i + 1}: expected 1..5")
    ratings["timestamp"] = _ml_int(ratings["timestamp"], ratings_path, "timestamp")
    for table, key, what in ((users, "user_id", "users"), (items, "item_id", "movies")):
        dupes = table[key].duplicated()
        if dupes.any():
            raise ValueError(f"MovieLens {what} table in {str(root)!r} lists {key} {table[key][dupes].iloc[0]!r} twice")
        unknown = ~ratings[key].isin(table[key])
        if unknown.any():
            i = int(np.flatnonzero(unknown.to_numpy())[0])
            raise ValueError(
                f"rating at line {i + 1} of {str(ratings_path)!r} refers to {key} {ratings[key].iloc[i]!r} "
                f"that the {what} table does not list"
            )
    users["zip_prefix"] = users["zip"].str[:3]
    frame = ratings.merge(users[["user_id", "age", "gender", "occupation", "zip_prefix"]], on="user_id", how="left")
    frame = frame.merge(items[["item_id", "genres", "release_year"]], on="item_id", how="left")
    frame["rating"] = (rating.to_numpy() >= 4).astype(np.int8)
    full = movielens_schema()
    full = override_schema(full, schema)
    return finish_frame(frame, select_columns(full, columns), root)
