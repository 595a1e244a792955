"""A GroupLens MovieLens directory, ml-100k (``u.data``, ``u.user``, ``u.item``) or ml-1m (``ratings.dat``,
``users.dat``, ``movies.dat``), detected from the file names. Label ``rating >= 4``; fields user_id, item_id, age
(100k ages bucketed into ml-1m's age groups), gender, occupation, zip_prefix (first 3 characters), genres
(multi-valued), release_year; time column ``timestamp``."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd

from lightfmp.data.formats.base import (
    DEFAULT_CHUNKSIZE,
    Engine,
    PathLike,
    check_engine,
    check_field_counts,
    check_file,
    concat_chunks,
    finish_chunks,
    finish_frame,
    override_schema,
    scan_fields,
    select_columns,
)
from lightfmp.data.formats.registry import Chunks, register_chunk_reader, register_reader
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


def _ml_options(sep: str, names: Sequence[str], encoding: str) -> dict[str, Any]:
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
    return kwargs


def _ml_table(path: Path, sep: str, names: Sequence[str], encoding: str) -> pd.DataFrame:
    """A small MovieLens table (users, movies) read whole."""
    check_file(path)
    check_field_counts(path, sep, expected=len(names))
    try:
        return pd.read_csv(path, **_ml_options(sep, names, encoding))
    except pd.errors.ParserError as e:
        raise ValueError(f"malformed row in {str(path)!r}: {e}") from None


def _ml_int(col: pd.Series, path: Path, name: str, first_line: int = 1) -> pd.Series:
    num = pd.to_numeric(col, errors="coerce")
    bad = (num.isna() | (num != num.round())).to_numpy()
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"malformed {name} {col.iloc[i]!r} in {str(path)!r} at line {i + first_line}: expected an integer"
        )
    return num.astype(np.int64)


@register_chunk_reader("movielens")
def iter_movielens(
    path: PathLike,
    columns: Optional[Iterable[str]] = None,
    chunksize: int = DEFAULT_CHUNKSIZE,
    max_rows: Optional[int] = None,
    schema: Optional[Schema] = None,
    engine: Engine = "pandas",
) -> Chunks:
    """A GroupLens MovieLens directory (ml-100k or ml-1m layout; see the module docstring): the users and movies
    tables read whole (thousands of rows), the ratings streamed in chunks of ``chunksize`` rows (pandas' parser,
    any ``engine``) and joined to them chunk by chunk."""
    check_engine(engine)
    root = Path(path)
    if root.is_file():
        root = root.parent
    if not root.is_dir():
        raise FileNotFoundError(f"MovieLens directory {str(root)!r} does not exist")
    rating_names = ["user_id", "item_id", "rating", "timestamp"]
    if (root / "u.data").exists():
        ratings_path, sep = root / "u.data", "\t"
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
        ratings_path, sep = root / "ratings.dat", "::"
        users = _ml_table(root / "users.dat", "::", ["user_id", "gender", "age", "occupation", "zip"], "latin-1")
        items = _ml_table(root / "movies.dat", "::", ["item_id", "title", "genres"], "latin-1")
        items["release_year"] = items["title"].str.extract(r"\((\d{4})\)\s*$", expand=False)
    else:
        raise ValueError(
            f"{str(root)!r} is not a MovieLens directory: expected u.data, u.user, u.item (ml-100k) "
            "or ratings.dat, users.dat, movies.dat (ml-1m)"
        )
    check_file(ratings_path)
    rows = scan_fields(ratings_path, sep, expected=len(rating_names))[1]
    for table, key, what in ((users, "user_id", "users"), (items, "item_id", "movies")):
        dupes = table[key].duplicated()
        if dupes.any():
            raise ValueError(f"MovieLens {what} table in {str(root)!r} lists {key} {table[key][dupes].iloc[0]!r} twice")
    users["zip_prefix"] = users["zip"].str[:3]
    users = users[["user_id", "age", "gender", "occupation", "zip_prefix"]]
    items = items[["item_id", "genres", "release_year"]]
    full = override_schema(movielens_schema(), schema)
    schema = select_columns(full, columns)

    def prepare(ratings: pd.DataFrame, lines: np.ndarray) -> pd.DataFrame:
        first = int(lines[0]) if len(lines) else 1
        rating = _ml_int(ratings["rating"], ratings_path, "rating", first)
        out_of_range = ~rating.between(1, 5)
        if out_of_range.any():
            i = int(np.flatnonzero(out_of_range.to_numpy())[0])
            raise ValueError(f"rating {rating.iloc[i]} in {str(ratings_path)!r} at line {i + first}: expected 1..5")
        ratings["timestamp"] = _ml_int(ratings["timestamp"], ratings_path, "timestamp", first)
        for table, key, what in ((users, "user_id", "users"), (items, "item_id", "movies")):
            unknown = ~ratings[key].isin(table[key])
            if unknown.any():
                i = int(np.flatnonzero(unknown.to_numpy())[0])
                raise ValueError(
                    f"rating at line {i + first} of {str(ratings_path)!r} refers to {key} {ratings[key].iloc[i]!r} "
                    f"that the {what} table does not list"
                )
        frame = (
            ratings.reset_index(drop=True).merge(users, on="user_id", how="left").merge(items, on="item_id", how="left")
        )
        frame["rating"] = (rating.to_numpy() >= 4).astype(np.int8)
        return frame

    def raw() -> Iterator[pd.DataFrame]:
        try:
            yield from pd.read_csv(
                ratings_path, chunksize=chunksize, nrows=max_rows, **_ml_options(sep, rating_names, "latin-1")
            )
        except pd.errors.ParserError as e:
            raise ValueError(f"malformed row in {str(ratings_path)!r}: {e}") from None

    frames = finish_chunks(raw(), schema, ratings_path, 1, prepare)
    return Chunks(schema, rows if max_rows is None else min(rows, max_rows), frames)


@register_reader("movielens")
def read_movielens(
    path: PathLike,
    columns: Optional[Iterable[str]] = None,
    chunksize: int = DEFAULT_CHUNKSIZE,
    max_rows: Optional[int] = None,
    schema: Optional[Schema] = None,
) -> tuple[pd.DataFrame, Schema]:
    """A GroupLens MovieLens directory (ml-100k or ml-1m layout; see the module docstring): :func:`iter_movielens`'s
    chunks in one frame."""
    chunks = iter_movielens(path, columns=columns, chunksize=chunksize, max_rows=max_rows, schema=schema)
    root = Path(path) if Path(path).is_dir() else Path(path).parent
    return finish_frame(concat_chunks(list(chunks.frames), root), chunks.schema, root)
