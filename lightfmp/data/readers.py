"""Readers: raw files -> a pandas DataFrame with the columns of a :class:`~lightfmp.data.schema.Schema`.

:func:`read_frame` returns ``(frame, schema)``. The frame has one column per schema field (in no particular order) (dense fields as
float64 with NaN for missing; sparse fields as strings with NaN for missing; multi-valued fields as
separator-joined strings or lists), the label as int8 in {0, 1}, and the time column when the schema has
one. Files are read with pandas in chunks; ``columns`` restricts the read to some fields (plus the label
and the time column), which is how the fine-tuning stage reads only the kept fields.

Formats:

* ``criteo``: Criteo Kaggle / DAC TSV without header: label, I1..I13 (integers, may be empty or negative),
  C1..C26 (hashed categories, may be empty). A file with more categorical columns is read as C1..Cn.
* ``avazu``: Avazu CSV with header (id, click, hour, ...). ``hour`` (YYMMDDHH) is the time column and gives
  the fields ``hour_of_day``, ``weekday``, ``weekend``; ``id`` is dropped; every other column is a sparse field.
* ``movielens``: a GroupLens directory, ml-100k (``u.data``, ``u.user``, ``u.item``) or ml-1m
  (``ratings.dat``, ``users.dat``, ``movies.dat``), detected from the file names. Label ``rating >= 4``;
  fields user_id, item_id, age (100k ages bucketed into ml-1m's age groups), gender, occupation,
  zip_prefix (first 3 characters), genres (multi-valued), release_year; time column ``timestamp``.
* ``adult``: UCI Adult CSV with header (the packaged copy when ``path`` is None); label ``income``
  (``>50K`` or ``>50K.`` is 1, ``<=50K`` or ``<=50K.`` is 0), ``?`` is missing.
* ``csv`` / ``parquet``: any file with a header and a schema (YAML path or :class:`Schema`).

Bad input raises ``ValueError`` (or ``FileNotFoundError`` / ``KeyError``) naming the file and, for
malformed rows, the line number (1-based, header included); nothing is returned partially.
"""

from __future__ import annotations

import gzip
import io
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

import numpy as np
import pandas as pd

from lightfmp.data.schema import FieldSpec, Schema

PathLike = Union[str, Path]
FORMATS = ("criteo", "avazu", "movielens", "adult", "csv", "parquet")
DEFAULT_CHUNKSIZE = 500_000

CRITEO_NUM_DENSE = 13
CRITEO_NUM_SPARSE = 26

ADULT_COLUMNS = (
    "age", "workclass", "fnlwgt", "education", "educational-num", "marital-status", "occupation",
    "relationship", "race", "gender", "capital-gain", "capital-loss", "hours-per-week", "native-country",
    "income",
)
ADULT_DENSE = ("age", "fnlwgt", "educational-num", "capital-gain", "capital-loss", "hours-per-week")

ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)
# ml-1m's age groups (lower bounds); ml-100k's exact ages are bucketed into them.
ML_AGE_GROUPS = (1, 18, 25, 35, 45, 50, 56)


# --------------------------------------------------------------------------------------------- schemas
def criteo_schema(num_dense: int = CRITEO_NUM_DENSE, num_sparse: int = CRITEO_NUM_SPARSE) -> Schema:
    """The Criteo layout: label, I1..I{num_dense} (dense, log transform), C1..C{num_sparse} (sparse)."""
    return Schema(
        label="label",
        fields=tuple(FieldSpec(f"I{i}", kind="dense", transform="log") for i in range(1, num_dense + 1))
        + tuple(FieldSpec(f"C{i}", kind="sparse") for i in range(1, num_sparse + 1)),
    )


def adult_schema() -> Schema:
    return Schema(
        label="income",
        fields=tuple(
            FieldSpec(c, kind="dense", transform="log") if c in ADULT_DENSE else FieldSpec(c, kind="sparse")
            for c in ADULT_COLUMNS[:-1]
        ),
    )


def movielens_schema() -> Schema:
    return Schema(
        label="rating",
        time_column="timestamp",
        fields=(
            FieldSpec("user_id"), FieldSpec("item_id"), FieldSpec("age"), FieldSpec("gender"),
            FieldSpec("occupation"), FieldSpec("zip_prefix"),
            FieldSpec("genres", kind="multi", separator="|", pooling="mean"), FieldSpec("release_year"),
        ),
    )


def avazu_schema(file_columns: Sequence[str]) -> Schema:
    other = [c for c in file_columns if c not in ("id", "click", "hour")]
    names = ["hour_of_day", "weekday", "weekend"] + other
    return Schema(label="click", time_column="hour", fields=tuple(FieldSpec(n) for n in names))


# --------------------------------------------------------------------------------------------- helpers
def _check_file(path: PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist")
    if path.is_dir():
        raise ValueError(f"{str(path)!r} is a directory; expected a file")
    if path.stat().st_size == 0:
        raise ValueError(f"data file {str(path)!r} is empty")
    return path


def _open_binary(path: Path) -> io.BufferedIOBase:
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")  # type: ignore[return-value]


def check_field_counts(path: PathLike, sep: str, expected: Optional[int] = None, skip_lines: int = 0,
                       quote: Optional[str] = None, block_bytes: int = 1 << 24) -> int:
    """Check that every record of a delimited file has the same number of fields; vectorised with numpy.

    ``expected``: the field count every record must have (the first checked record's count when None).
    With ``quote`` (e.g. ``'"'``), separators and newlines inside quotes do not count (a doubled quote
    inside a quoted field keeps the parity right). Returns the field count. Raises ``ValueError`` naming
    the file and the first bad line (1-based, physical lines) when a record has another count or is blank.
    ``skip_lines`` leading records (headers) are not checked. A missing final newline is fine.
    """
    path = Path(path)
    sep_b = sep.encode()
    quote_b = quote.encode()[0] if quote else None
    records = 0  # records completed before the current block
    lines = 0  # physical newlines before the current block
    inside = 0  # quote parity at the start of the current block
    carry = b""
    with _open_binary(path) as fh:
        while True:
            block = fh.read(block_bytes)
            final = not block
            data = carry + block
            carry = b""
            if final:
                if not data:
                    break
                if not data.endswith(b"\n"):
                    data += b"\n"
            arr = np.frombuffer(data, dtype=np.uint8)
            newline = arr == 10
            quoted = quote_b is not None and (inside or quote_b in data)
            if quoted:
                in_quotes = ((np.cumsum(arr == quote_b) + inside) % 2) == 1
                ends_mask = newline & ~in_quotes
            else:
                in_quotes = None
                ends_mask = newline
            ends = np.flatnonzero(ends_mask)
            if not final:  # keep the incomplete last record for the next block
                if len(ends) == 0:
                    carry = data
                    continue
                cut = int(ends[-1]) + 1
                carry, arr = data[cut:], arr[:cut]
                newline = newline[:cut]
                if in_quotes is not None:
                    in_quotes = in_quotes[:cut]
            if len(sep_b) == 1:
                is_sep = arr == sep_b[0]
            else:  # multi-byte separator such as "::" (non-overlapping occurrences assumed)
                is_sep = np.zeros(arr.shape, dtype=bool)
                win = np.lib.stride_tricks.sliding_window_view(arr, len(sep_b))
                is_sep[: len(win)] = (win == np.frombuffer(sep_b, dtype=np.uint8)).all(axis=1)
            if in_quotes is not None:
                is_sep &= ~in_quotes
            starts = np.concatenate([[0], ends[:-1] + 1])
            # each segment [starts[i], ends[i]] is non-empty (it holds its newline): reduceat sums it
            counts = np.add.reduceat(is_sep.view(np.uint8), starts, dtype=np.int64) + 1
            blank = (ends - starts) == 0
            blank |= (ends - starts == 1) & (arr[np.maximum(ends - 1, 0)] == 13)  # "\r\n"
            numbers = records + 1 + np.arange(len(ends))
            if quoted:
                line_csum = np.concatenate([[0], np.cumsum(newline)])
                first_line = lines + 1 + line_csum[starts]
            else:
                first_line = lines + numbers - records
            check = numbers > skip_lines
            if expected is None and check.any():
                expected = int(counts[check][0])
            bad = check & ((counts != expected) | blank)
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                what = "is blank" if blank[i] else f"has {int(counts[i])} fields"
                raise ValueError(
                    f"malformed row in {str(path)!r} at line {int(first_line[i])}: it {what}, expected {expected} "
                    f"fields separated by {sep!r}"
                )
            records += len(ends)
            lines += int(newline.sum())
            inside = int(in_quotes[-1]) if in_quotes is not None and len(arr) else 0
            if final:
                break
    if expected is None or records <= skip_lines:
        raise ValueError(f"data file {str(path)!r} has no data rows")
    return expected


class _NotNumeric(Exception):
    """The C parser met a non-number in a column typed float64: re-read it as text to name the line."""


def _read_chunks(path: Path, chunksize: int, nrows: Optional[int], **kwargs: Any) -> Iterator[pd.DataFrame]:
    try:
        reader = pd.read_csv(path, chunksize=chunksize, nrows=nrows, **kwargs)
        yield from reader
    except UnicodeDecodeError as e:
        raise ValueError(f"{str(path)!r} is not valid text in the expected encoding: {e}") from None
    except pd.errors.EmptyDataError as e:
        raise ValueError(f"data file {str(path)!r} is empty (no rows): {e}") from None
    except pd.errors.ParserError as e:
        raise ValueError(f"malformed row in {str(path)!r}: {e}") from None
    except ValueError as e:
        if any(m in str(e) for m in ("could not convert", "Unable to parse", "cannot safely convert")):
            raise _NotNumeric(str(e)) from None
        raise


def _header(path: Path) -> list[str]:
    """Column names of a CSV file with a header line."""
    try:
        return list(pd.read_csv(path, nrows=0).columns)
    except UnicodeDecodeError as e:
        raise ValueError(f"{str(path)!r} is not valid UTF-8 text: {e}") from None
    except pd.errors.EmptyDataError:
        raise ValueError(f"data file {str(path)!r} is empty") from None
    except pd.errors.ParserError as e:
        raise ValueError(f"malformed header in {str(path)!r}: {e}") from None


def _fast_then_exact(collect: Callable[[Any], list[pd.DataFrame]]) -> list[pd.DataFrame]:
    """``collect(np.float64)`` (dense columns parsed by pandas' C parser); if a dense value is not a number,
    ``collect(str)``, whose text columns let :func:`_to_numeric` name the bad value and its line."""
    try:
        return collect(np.float64)
    except _NotNumeric:
        return collect(str)


def _to_numeric(col: pd.Series, path: Path, first_line: np.ndarray, name: str) -> pd.Series:
    """``col`` as float64, missing -> NaN; a non-numeric or infinite entry raises naming file and line."""
    num = pd.to_numeric(col, errors="coerce")
    present = col.notna()
    if col.dtype == object:
        present &= col.astype(str).str.strip() != ""
    bad = (present & num.isna()) | np.isinf(num.to_numpy(dtype=np.float64, na_value=np.nan))
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise ValueError(
            f"malformed value {col.iloc[i]!r} in numeric field {name!r} of {str(path)!r} at line {int(first_line[i])}: "
            "expected a finite number or an empty value"
        )
    return num.astype(np.float64)


def binary_labels(raw: pd.Series, path: Path, lines: np.ndarray, name: str,
                  positive: Optional[Sequence[Any]] = None) -> pd.Series:
    """The label as int8 0/1. With ``positive``: 1 where ``raw`` (as a stripped string) is one of them.

    Without: the raw label must be 0/1, 0.0/1.0 or true/false. Missing or other values raise naming the
    file, the line and the value.
    """
    missing = raw.isna().to_numpy()
    if missing.any():
        i = int(np.flatnonzero(missing)[0])
        raise ValueError(f"missing label {name!r} in {str(path)!r} at line {int(lines[i])}")
    codes, uniques = pd.factorize(raw)  # map the few distinct raw labels, not every row
    as_str = pd.Series(uniques).astype(str).str.strip()
    if positive is not None:
        return pd.Series(as_str.isin([str(p) for p in positive]).to_numpy()[codes].astype(np.int8), index=raw.index)
    low = as_str.str.lower()
    per_unique = np.full(len(uniques), -1, dtype=np.int8)
    per_unique[low.isin(["1", "1.0", "true"]).to_numpy()] = 1
    per_unique[low.isin(["0", "0.0", "false"]).to_numpy()] = 0
    out = per_unique[codes]
    bad = out < 0
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"non-binary label {raw.iloc[i]!r} in column {name!r} of {str(path)!r} at line {int(lines[i])}: "
            "expected 0/1 (or list the positive values in the schema's 'positive')"
        )
    return pd.Series(out, index=raw.index)


def _override(full: Schema, schema: Optional[Schema]) -> Schema:
    """A user schema for a built-in format: its fields must be the format's, with the same label."""
    if schema is None:
        return full
    full.check_names(schema.names)
    if schema.label != full.label or schema.time_column not in (None, full.time_column):
        raise ValueError(f"a schema for this format must keep label {full.label!r} and time column "
                         f"{full.time_column!r}, got {schema.label!r} and {schema.time_column!r}")
    return schema


def _select(schema: Schema, columns: Optional[Iterable[str]]) -> Schema:
    return schema if columns is None else schema.select(columns)


def _finish(frame: pd.DataFrame, schema: Schema, path: PathLike) -> tuple[pd.DataFrame, Schema]:
    if len(frame) == 0:
        raise ValueError(f"data file {str(path)!r} has no data rows")
    wanted = list(schema.columns)
    if set(frame.columns) != set(wanted):  # select without copying when the columns are already the right ones
        frame = frame[wanted]
    if not isinstance(frame.index, pd.RangeIndex) or frame.index.start != 0:
        frame = frame.reset_index(drop=True)
    return frame, schema


def _concat(chunks: list[pd.DataFrame], path: PathLike) -> pd.DataFrame:
    if not chunks:
        raise ValueError(f"data file {str(path)!r} has no data rows")
    return pd.concat(chunks, ignore_index=True) if len(chunks) > 1 else chunks[0].reset_index(drop=True)


def _convert_fields(chunk: pd.DataFrame, schema: Schema, path: Path, lines: np.ndarray) -> pd.DataFrame:
    for f in schema.fields:
        if f.kind == "dense":
            chunk[f.name] = _to_numeric(chunk[f.name], path, lines, f.name)
    return chunk


# --------------------------------------------------------------------------------------------- formats
def read_criteo(path: PathLike, columns: Optional[Iterable[str]] = None, chunksize: int = DEFAULT_CHUNKSIZE,
                max_rows: Optional[int] = None, schema: Optional[Schema] = None) -> tuple[pd.DataFrame, Schema]:
    """Criteo Kaggle/DAC TSV (see the module docstring)."""
    path = _check_file(path)
    n = check_field_counts(path, "\t")
    if n < 1 + CRITEO_NUM_DENSE + 1:
        raise ValueError(f"{str(path)!r} has {n} tab-separated fields; the Criteo layout needs label, "
                         f"I1..I{CRITEO_NUM_DENSE} and at least one categorical field")
    full = criteo_schema(CRITEO_NUM_DENSE, n - 1 - CRITEO_NUM_DENSE)
    full = _override(full, schema)
    schema = _select(full, columns)
    names = ["label"] + [f"I{i}" for i in range(1, CRITEO_NUM_DENSE + 1)] + [f"C{i}" for i in range(1, n - CRITEO_NUM_DENSE)]
    usecols = ["label"] + list(schema.names)

    def collect(dense_dtype: Any) -> list[pd.DataFrame]:
        dtypes = {c: (dense_dtype if c in dense else str) for c in usecols}
        chunks, offset = [], 0
        for chunk in _read_chunks(path, chunksize, max_rows, sep="\t", header=None, names=names, usecols=usecols,
                                  dtype=dtypes, keep_default_na=False, na_values=[""], quoting=3):
            lines = offset + 1 + np.arange(len(chunk))
            chunk["label"] = binary_labels(chunk["label"], path, lines, "label")
            chunks.append(_convert_fields(chunk, schema, path, lines))
            offset += len(chunk)
        return chunks

    dense = {f.name for f in schema.fields if f.kind == "dense"}
    return _finish(_concat(_fast_then_exact(collect), path), schema, path)


def read_avazu(path: PathLike, columns: Optional[Iterable[str]] = None, chunksize: int = DEFAULT_CHUNKSIZE,
               max_rows: Optional[int] = None, schema: Optional[Schema] = None) -> tuple[pd.DataFrame, Schema]:
    """Avazu CSV with header (see the module docstring)."""
    path = _check_file(path)
    header = _header(path)
    missing = [c for c in ("click", "hour") if c not in header]
    if missing:
        raise ValueError(f"schema does not match {str(path)!r}: missing column(s) {missing} "
                         f"(an Avazu file needs 'click' and 'hour'); the file has {header}")
    check_field_counts(path, ",", expected=len(header), skip_lines=1)
    full = avazu_schema(header)
    full = _override(full, schema)
    schema = _select(full, columns)
    derived = {"hour_of_day", "weekday", "weekend"}
    usecols = ["click", "hour"] + [n for n in schema.names if n not in derived]
    chunks, offset = [], 0
    for chunk in _read_chunks(path, chunksize, max_rows, usecols=usecols, dtype=str, keep_default_na=False,
                              na_values=[""]):
        lines = offset + 2 + np.arange(len(chunk))
        chunk["click"] = binary_labels(chunk["click"], path, lines, "click")
        when = pd.to_datetime(chunk["hour"], format="%y%m%d%H", errors="coerce")
        bad = when.isna().to_numpy()
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(f"malformed 'hour' {chunk['hour'].iloc[i]!r} in {str(path)!r} at line {int(lines[i])}: "
                             "expected YYMMDDHH")
        chunk["hour"] = chunk["hour"].astype(np.int64)
        chunk["hour_of_day"] = when.dt.hour.astype(str)
        chunk["weekday"] = when.dt.dayofweek.astype(str)
        chunk["weekend"] = (when.dt.dayofweek >= 5).astype(int).astype(str)
        chunks.append(_convert_fields(chunk, schema, path, lines))
        offset += len(chunk)
    return _finish(_concat(chunks, path), schema, path)


def read_adult(path: Optional[PathLike] = None, columns: Optional[Iterable[str]] = None,
               chunksize: int = DEFAULT_CHUNKSIZE, max_rows: Optional[int] = None,
               schema: Optional[Schema] = None) -> tuple[pd.DataFrame, Schema]:
    """UCI Adult CSV with header; ``path=None`` reads the copy packaged with lightfmp."""
    if path is None:
        path = adult_path()
    path = _check_file(path)
    raw_header = _header(path)
    header = [c.strip() for c in raw_header]
    missing = [c for c in ADULT_COLUMNS if c not in header]
    if missing:
        raise ValueError(f"schema does not match {str(path)!r}: missing column(s) {missing}; the file has {header}")
    check_field_counts(path, ",", expected=len(header), skip_lines=1)
    full = adult_schema()
    full = _override(full, schema)
    schema = _select(full, columns)

    def collect(dense_dtype: Any) -> list[pd.DataFrame]:
        dtypes = {raw: (dense_dtype if raw.strip() in dense else str) for raw in raw_header}
        chunks, offset = [], 0
        for chunk in _read_chunks(path, chunksize, max_rows, usecols=lambda c: c.strip() in schema.columns,
                                  dtype=dtypes, keep_default_na=False, na_values=["", "?"], skipinitialspace=True):
            chunk.columns = [c.strip() for c in chunk.columns]
            lines = offset + 2 + np.arange(len(chunk))
            raw = chunk["income"].str.strip().str.rstrip(".")
            known = raw.isin([">50K", "<=50K"]).to_numpy()
            if not known.all():
                i = int(np.flatnonzero(~known)[0])
                raise ValueError(f"non-binary label {chunk['income'].iloc[i]!r} in column 'income' of {str(path)!r} "
                                 f"at line {int(lines[i])}: expected '>50K' or '<=50K' (optionally with a final '.')")
            chunk["income"] = (raw == ">50K").astype(np.int8)
            for f in schema.fields:
                if f.kind != "dense":
                    chunk[f.name] = chunk[f.name].str.strip()
            chunks.append(_convert_fields(chunk, schema, path, lines))
            offset += len(chunk)
        return chunks

    dense = {f.name for f in schema.fields if f.kind == "dense"}
    return _finish(_concat(_fast_then_exact(collect), path), schema, path)


def adult_path() -> Path:
    """Path of the packaged UCI Adult file (CC BY 4.0; see ``lightfmp/data/resources/ATTRIBUTION.md``)."""
    return Path(str(resources.files("lightfmp.data") / "resources" / "adult.csv.gz"))


def _ml_table(path: Path, sep: str, names: Sequence[str], encoding: str) -> pd.DataFrame:
    _check_file(path)
    check_field_counts(path, sep, expected=len(names))
    kwargs: dict[str, Any] = dict(sep=sep, header=None, names=list(names), dtype=str, keep_default_na=False,
                                  na_values=[""], encoding=encoding, quoting=3)
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
        raise ValueError(f"malformed {name} {col.iloc[i]!r} in {str(path)!r} at line {i + line_offset}: expected an integer")
    return num.astype(np.int64)


def read_movielens(path: PathLike, columns: Optional[Iterable[str]] = None, chunksize: int = DEFAULT_CHUNKSIZE,
                   max_rows: Optional[int] = None, schema: Optional[Schema] = None) -> tuple[pd.DataFrame, Schema]:
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
        raise ValueError(f"{str(root)!r} is not a MovieLens directory: expected u.data, u.user, u.item (ml-100k) "
                         "or ratings.dat, users.dat, movies.dat (ml-1m)")
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
            raise ValueError(f"rating at line {i + 1} of {str(ratings_path)!r} refers to {key} {ratings[key].iloc[i]!r} "
                             f"that the {what} table does not list")
    users["zip_prefix"] = users["zip"].str[:3]
    frame = ratings.merge(users[["user_id", "age", "gender", "occupation", "zip_prefix"]], on="user_id", how="left")
    frame = frame.merge(items[["item_id", "genres", "release_year"]], on="item_id", how="left")
    frame["rating"] = (rating.to_numpy() >= 4).astype(np.int8)
    full = movielens_schema()
    full = _override(full, schema)
    return _finish(frame, _select(full, columns), root)


def read_table(path: PathLike, schema: Union[Schema, PathLike, None], columns: Optional[Iterable[str]] = None,
               chunksize: int = DEFAULT_CHUNKSIZE, max_rows: Optional[int] = None,
               file_format: str = "csv") -> tuple[pd.DataFrame, Schema]:
    """Any CSV (with header) or Parquet file described by a schema (a :class:`Schema` or a YAML path)."""
    if schema is None:
        raise ValueError(f"format {file_format!r} needs a schema (a YAML file naming label and fields)")
    if not isinstance(schema, Schema):
        schema = Schema.from_yaml(schema)
    path = _check_file(path)
    schema = _select(schema, columns)
    wanted = list(schema.columns)
    if file_format == "parquet":
        import pyarrow.parquet as pq

        try:
            pfile = pq.ParquetFile(path)
        except Exception as e:  # pyarrow raises several types for a file that is not Parquet
            raise ValueError(f"{str(path)!r} is not a readable Parquet file: {e}") from None
        available = pfile.schema_arrow.names
    else:
        available = _header(path)
        check_field_counts(path, ",", expected=len(available), skip_lines=1, quote='"')
    missing = [c for c in wanted if c not in available]
    if missing:
        raise ValueError(f"schema does not match {str(path)!r}: missing column(s) {missing}; the file has {available}")
    row_base = 0 if file_format == "parquet" else 1  # Parquet rows are reported as "line" row + 1

    def collect(dense_dtype: Any) -> list[pd.DataFrame]:
        remaining = max_rows if file_format == "parquet" else None  # read_csv applies max_rows itself
        chunks, offset = [], 0
        if file_format == "parquet":
            it: Iterable[pd.DataFrame] = (b.to_pandas() for b in pfile.iter_batches(batch_size=chunksize, columns=wanted))
        else:
            dtypes = {f.name: (dense_dtype if f.kind == "dense" else str) for f in schema.fields}
            dtypes[schema.label] = str
            it = _read_chunks(path, chunksize, max_rows, usecols=wanted, dtype=dtypes, keep_default_na=False,
                              na_values=["", "NA", "NaN", "nan", "null"])
        for chunk in it:
            if remaining is not None:
                chunk = chunk.iloc[:remaining]
                remaining -= len(chunk)
            lines = offset + row_base + 1 + np.arange(len(chunk))
            chunk[schema.label] = binary_labels(chunk[schema.label], path, lines, schema.label, schema.positive)
            chunks.append(_convert_fields(chunk, schema, path, lines))
            offset += len(chunk)
            if remaining is not None and remaining <= 0:
                break
        return chunks

    return _finish(_concat(_fast_then_exact(collect), path), schema, path)


_READERS: dict[str, Callable[..., tuple[pd.DataFrame, Schema]]] = {
    "criteo": read_criteo,
    "avazu": read_avazu,
    "movielens": read_movielens,
    "adult": read_adult,
}


def read_frame(format: str, path: Optional[PathLike] = None, schema: Union[Schema, PathLike, None] = None,
               columns: Optional[Iterable[str]] = None, chunksize: int = DEFAULT_CHUNKSIZE,
               max_rows: Optional[int] = None) -> tuple[pd.DataFrame, Schema]:
    """Read a data set into ``(frame, schema)``; see the module docstring for formats and frame layout.

    Args:
        format: one of ``criteo``, ``avazu``, ``movielens``, ``adult``, ``csv``, ``parquet``.
        path: the file (a directory for MovieLens); optional for ``adult`` (the packaged copy).
        schema: required for csv/parquet; for the built-in formats an optional override (same field names,
            e.g. other transforms or min counts).
        columns: read only these fields (plus label and time column); unknown names raise ``KeyError``.
        chunksize: rows per pandas chunk.
        max_rows: read at most this many rows (the first ones).
    """
    if format not in FORMATS:
        raise ValueError(f"unknown data format {format!r}; expected one of {list(FORMATS)}")
    if max_rows is not None and max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows}")
    if chunksize < 1:
        raise ValueError(f"chunksize must be >= 1, got {chunksize}")
    columns = None if columns is None else list(columns)
    if format in ("csv", "parquet"):
        if path is None:
            raise ValueError(f"format {format!r} needs a path")
        return read_table(path, schema, columns, chunksize, max_rows, file_format=format)
    if schema is not None and not isinstance(schema, Schema):
        schema = Schema.from_yaml(schema)
    if path is None and format != "adult":
        raise ValueError(f"format {format!r} needs a path")
    return _READERS[format](path, columns=columns, chunksize=chunksize, max_rows=max_rows, schema=schema)
