"""What every format reader builds on: file checks, chunked pandas reading, numeric and label conversion, and
finishing a frame to its schema's columns.

Bad input raises ``ValueError`` (or ``FileNotFoundError`` / ``KeyError``) naming the file and, for malformed
rows, the line number (1-based, header included); nothing is returned partially. A truncated or corrupt gzip
file raises ``ValueError`` naming the file and the line where its data breaks (the library's error as
``__cause__``).
"""

from __future__ import annotations

import csv
import gzip
import io
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, Optional, Union

import numpy as np
import pandas as pd

from lightfmp.data.schema import Schema

PathLike = Union[str, Path]
DEFAULT_CHUNKSIZE = 500_000


def check_file(path: PathLike) -> Path:
    """``path`` as a ``Path``; raises unless it is an existing, non-empty file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist")
    if path.is_dir():
        raise ValueError(f"{str(path)!r} is a directory; expected a file")
    if path.stat().st_size == 0:
        raise ValueError(f"data file {str(path)!r} is empty")
    return path


def open_binary(path: Path) -> io.BufferedIOBase:
    """``path`` opened for binary reading, decompressed when its name ends in ``.gz``."""
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


#: what the gzip module and pandas raise for a truncated, corrupt or non-gzip ``.gz`` file
GZIP_ERRORS: tuple[type[Exception], ...] = (EOFError, gzip.BadGzipFile, zlib.error)


def _gzip_break(path: Path) -> tuple[int, int]:
    """``(bytes, line)``: how many decompressed bytes of ``path`` can be read, and the line they end in."""
    good = newlines = 0
    try:
        with gzip.open(path, "rb") as fh:
            while piece := fh.read1(1 << 16):  # one raw read each: keeps the data decompressed before the break
                good += len(piece)
                newlines += piece.count(b"\n")
    except GZIP_ERRORS:
        pass
    return good, newlines + 1


@contextmanager
def gzip_errors(path: Path) -> Iterator[None]:
    """Turn the gzip errors of reading a ``.gz`` ``path`` into ``ValueError`` naming the file and where its data
    breaks."""
    try:
        yield
    except GZIP_ERRORS as e:
        if path.suffix != ".gz":
            raise
        good, line = _gzip_break(path)
        raise ValueError(
            f"{str(path)!r} is not a readable gzip file (truncated or corrupt): its data breaks after {good} "
            f"decompressed bytes, in line {line} ({type(e).__name__}: {e})"
        ) from e


def check_field_counts(
    path: PathLike,
    sep: str,
    expected: Optional[int] = None,
    skip_lines: int = 0,
    quote: Optional[str] = None,
    block_bytes: int = 1 << 24,
) -> int:
    """Check that every record of a delimited file has the same number of fields; vectorised with numpy.

    ``expected``: the field count every record must have (the first checked record's count when None).
    With ``quote`` (e.g. ``'"'``), separators and newlines inside quotes do not count (a doubled quote
    inside a quoted field keeps the parity right). Returns the field count. Raises ``ValueError`` naming
    the file and the first bad line (1-based, physical lines) when a record has another count or is blank.
    ``skip_lines`` leading records (headers) are not checked. A missing final newline is fine.
    """
    return scan_fields(path, sep, expected, skip_lines, quote, block_bytes)[0]


def scan_fields(
    path: PathLike,
    sep: str,
    expected: Optional[int] = None,
    skip_lines: int = 0,
    quote: Optional[str] = None,
    block_bytes: int = 1 << 24,
) -> tuple[int, int]:
    """:func:`check_field_counts`, returning ``(fields, data records)``: the count of records after the
    ``skip_lines`` header records comes free with the check (a streaming reader's progress total). Memory: one
    block of ``block_bytes``."""
    path = Path(path)
    sep_b = sep.encode()
    quote_b = quote.encode()[0] if quote else None
    records = 0  # records completed before the current block
    lines = 0  # physical newlines before the current block
    inside = 0  # quote parity at the start of the current block
    carry = b""
    with gzip_errors(path), open_binary(path) as fh:
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
    return expected, records - skip_lines


class NotNumeric(Exception):
    """The C parser met a non-number in a column typed float64: re-read it as text to name the line."""


def read_chunks(path: Path, chunksize: int, nrows: Optional[int], **kwargs: Any) -> Iterator[pd.DataFrame]:
    """``pd.read_csv`` in chunks; pandas' errors become ``ValueError`` naming the file (:class:`NotNumeric` for a
    non-number in a float64 column)."""
    try:
        with gzip_errors(path):
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
            raise NotNumeric(str(e)) from None
        raise


def read_header(path: Path) -> list[str]:
    """Column names of a CSV file with a header line; a name given twice raises (pandas would rename the second
    one ``name.1`` and a reader would silently use the first)."""
    try:
        with gzip_errors(path):
            names = list(pd.read_csv(path, nrows=0).columns)
            text = (
                gzip.open(path, "rt", encoding="utf-8-sig", newline="")
                if path.suffix == ".gz"
                else open(path, encoding="utf-8-sig", newline="")
            )
            with text:
                raw = next(csv.reader(text), [])
    except UnicodeDecodeError as e:
        raise ValueError(f"{str(path)!r} is not valid UTF-8 text: {e}") from None
    except pd.errors.EmptyDataError:
        raise ValueError(f"data file {str(path)!r} is empty") from None
    except pd.errors.ParserError as e:
        raise ValueError(f"malformed header in {str(path)!r}: {e}") from None
    check_unique_columns(raw, path)
    return names


def check_unique_columns(names: Sequence[str], path: PathLike) -> None:
    """Raise ``ValueError`` naming the file and the column names that occur more than once in ``names``."""
    dupes = sorted(n for n, count in Counter(names).items() if count > 1)
    if dupes:
        raise ValueError(
            f"duplicate column name(s) {dupes} in the header of {str(path)!r}: each column needs a "
            "unique name (rename one of them)"
        )


def fast_then_exact(collect: Callable[[Any], list[pd.DataFrame]]) -> list[pd.DataFrame]:
    """``collect(np.float64)`` (dense columns parsed by pandas' C parser); if a dense value is not a number,
    ``collect(str)``, whose text columns let :func:`to_numeric` name the bad value and its line."""
    try:
        return collect(np.float64)
    except NotNumeric:
        return collect(str)


def stream_fast_then_exact(frames: Callable[[Any], Iterator[pd.DataFrame]]) -> Iterator[pd.DataFrame]:
    """The chunks of ``frames(np.float64)``, as :func:`fast_then_exact` but streamed: when a dense value is not a
    number, ``frames(str)`` is read from the start, its first chunks (already yielded) skipped, so that
    :func:`to_numeric` names the bad value and its line."""
    done = 0
    try:
        for chunk in frames(np.float64):
            yield chunk
            done += 1
    except NotNumeric:
        for i, chunk in enumerate(frames(str)):
            if i >= done:
                yield chunk


Engine = Literal["pandas", "arrow"]


def check_engine(engine: str) -> None:
    if engine not in ("pandas", "arrow"):
        raise ValueError(f"engine must be 'pandas' or 'arrow', got {engine!r}")


#: the kinds of column :func:`arrow_chunks` reads: float64 numbers, pandas categoricals of text (labels, times:
#: a few values), or categorical fields kept as Arrow dictionary arrays (``pd.ArrowDtype``, no Python strings)
ArrowKind = Literal["number", "text", "category"]


def record_blocks(
    path: Path, block_bytes: int, skip_lines: int = 0, quote: Optional[bytes] = None
) -> Iterator[tuple[bytearray, int]]:
    """``(block, position)``: the file (decompressed when its name ends in ``.gz``, by Arrow's zlib) in blocks of
    whole records of about ``block_bytes`` bytes each, ending in a newline, after ``skip_lines`` header lines;
    ``position``: the bytes of the file (compressed) read so far. With ``quote``, a newline between quotes does
    not end a record (the quote parity of the block is counted with numpy when it holds a quote).
    Memory: one block (a ``bytearray`` read in place, not copied; the generator drops it once yielded). A
    truncated or corrupt gzip file raises ``ValueError`` as :func:`gzip_errors`."""
    import pyarrow as pa

    raw = pa.OSFile(str(path))
    stream = pa.CompressedInputStream(raw, "gzip") if path.suffix == ".gz" else raw
    carry, skip = b"", skip_lines
    with raw, gzip_errors(path):
        while True:
            # read into one buffer after the carried partial record: the block is yielded without a copy, and
            # nothing here holds it while the consumer parses it
            data = bytearray(len(carry) + block_bytes)
            data[: len(carry)] = carry
            try:
                got = stream.readinto(memoryview(data)[len(carry) :])
            except OSError as e:  # Arrow's zlib errors
                raise gzip.BadGzipFile(str(e)) from e
            del data[len(carry) + got :]
            carry = b""
            while skip and (newline := data.find(b"\n")) >= 0:
                del data[: newline + 1]
                skip -= 1
            if skip and got:  # the header goes on in the next piece
                carry = bytes(data)
                continue
            if not got:  # end of the file: the last record may lack its newline
                if data and not skip:
                    if not data.endswith(b"\n"):
                        data += b"\n"
                    yield data, raw.tell()
                return
            cut = _last_record_end(data, quote)
            if cut < 0:
                carry = bytes(data)
                continue
            carry = bytes(data[cut + 1 :])
            del data[cut + 1 :]
            yield data, raw.tell()
            del data


def _last_record_end(data: Union[bytes, bytearray], quote: Optional[bytes]) -> int:
    """Index of the last newline of ``data`` that ends a record (outside quotes), -1 when none does."""
    if quote is None or quote not in data:
        return data.rfind(b"\n")
    arr = np.frombuffer(data, dtype=np.uint8)
    outside = (np.cumsum(arr == quote[0]) % 2) == 0
    ends = np.flatnonzero((arr == 10) & outside)
    return int(ends[-1]) if len(ends) else -1


def arrow_chunks(
    path: Path,
    names: Sequence[str],
    columns: dict[str, ArrowKind],
    delimiter: str,
    chunksize: int,
    max_rows: Optional[int],
    skip_rows: int = 0,
    quote: bool = False,
    progress: Optional[Callable[[int], None]] = None,
) -> Iterator[pd.DataFrame]:
    """Raw chunks of a delimited file parsed by pyarrow's multithreaded CSV parser: ``columns`` maps each wanted
    column to an :data:`ArrowKind` (``"number"``: float64, NaN for an empty value; ``"text"``: a pandas
    categorical of the strings; ``"category"``: a ``pd.ArrowDtype`` column of Arrow dictionary arrays, one
    dictionary per parsed block, in order of first appearance; empty = missing in both).

    The file is cut into blocks of whole records here (:func:`record_blocks`, about ``chunksize`` times the
    mean line length of the first MiB) and each block is parsed by ``pyarrow.csv.read_csv`` on all cores; so
    memory holds one block (Arrow's own streaming reader reads the whole file ahead: memory grew with the file).
    A chunk is one block's rows. ``progress(bytes)`` is called with the file bytes read so far before each chunk.
    A value Arrow cannot convert, a record with another field count or a blank line raises
    ``pyarrow.ArrowInvalid`` (see :func:`arrow_then_pandas`, which lets the pandas reader name the line).
    """
    import pyarrow as pa
    import pyarrow.csv as pv

    with gzip_errors(path), open_binary(path) as fh:
        head = fh.read(1 << 20)
    line = max(1, len(head) // max(1, head.count(b"\n")))
    block_bytes = max(1 << 12, chunksize * line)
    text = pa.dictionary(pa.int32(), pa.string())
    types = {c: (pa.float64() if kind == "number" else text) for c, kind in columns.items()}
    parse = pv.ParseOptions(delimiter=delimiter, quote_char='"' if quote else False, ignore_empty_lines=False)
    convert = pv.ConvertOptions(
        column_types=types,
        include_columns=list(columns),
        null_values=[""],
        strings_can_be_null=True,
        quoted_strings_can_be_null=False,
    )
    threads = max(1, pa.cpu_count())
    left = max_rows
    for block, position in record_blocks(path, block_bytes, skip_rows, b'"' if quote else None):
        if block.startswith((b"\n", b"\r\n")) or b"\n\n" in block or b"\n\r\n" in block:
            raise pa.ArrowInvalid("a blank line")  # Arrow would read it as a row of nulls
        read = pv.ReadOptions(
            column_names=list(names), use_threads=True, block_size=max(1 << 20, len(block) // threads + 1)
        )
        table = pv.read_csv(pa.BufferReader(block), read_options=read, parse_options=parse, convert_options=convert)
        del block
        if left is not None:
            table = table.slice(0, left)
            left -= table.num_rows
        if progress is not None:
            progress(position)
        if table.num_rows:
            yield _arrow_frame(table, columns)
        del table  # not held while the next block is read and parsed
        if left is not None and left <= 0:
            return


def _arrow_frame(table: Any, columns: dict[str, ArrowKind]) -> pd.DataFrame:
    """The columns of an Arrow table as :func:`arrow_chunks` describes."""
    out: dict[str, Any] = {}
    for name, kind in columns.items():
        col = table.column(name)
        if kind == "number":
            out[name] = col.to_numpy()
        elif kind == "text":
            out[name] = col.to_pandas()
        else:
            out[name] = pd.arrays.ArrowExtensionArray(col)
    return pd.DataFrame(out)


def arrow_then_pandas(
    arrow: Callable[[], Iterator[pd.DataFrame]], pandas: Callable[[], Iterator[pd.DataFrame]]
) -> Iterator[pd.DataFrame]:
    """The chunks of ``arrow()``; when Arrow cannot parse or convert the file, the rest from ``pandas()`` (its
    first rows, already yielded, skipped), whose checks name the bad value or record and its line."""
    import pyarrow as pa

    done = 0
    try:
        for frame in arrow():
            yield frame
            done += len(frame)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        for frame in pandas():
            if done >= len(frame):
                done -= len(frame)
                continue
            yield frame.iloc[done:]
            done = 0


def first_record_fields(path: Path, sep: str) -> int:
    """The number of ``sep``-separated fields of the first line of ``path`` (gzip by its name); the streaming
    Arrow reader checks the others while parsing (:func:`arrow_chunks`)."""
    with gzip_errors(path), open_binary(path) as fh:
        first = fh.readline()
    if not first.strip(b"\r\n"):
        raise ValueError(
            f"data file {str(path)!r} has no data rows" if not first else f"line 1 of {str(path)!r} is blank"
        )
    return first.count(sep.encode()) + 1


def finish_chunks(
    raw: Iterator[pd.DataFrame],
    schema: Schema,
    path: Path,
    first_line: int,
    prepare: Callable[[pd.DataFrame, np.ndarray], pd.DataFrame],
) -> Iterator[pd.DataFrame]:
    """The chunk loop every streaming reader shares: each chunk of ``raw`` with its rows' line numbers
    (``first_line`` for the file's first data row) passed to ``prepare(chunk, lines)`` (the label and derived
    columns), then its dense fields converted (:func:`convert_fields`)."""
    offset = 0
    for chunk in raw:
        n = len(chunk)
        lines = offset + first_line + np.arange(n)
        yield convert_fields(prepare(chunk, lines), schema, path, lines)
        offset += n


def to_numeric(col: pd.Series, path: Path, first_line: np.ndarray, name: str) -> pd.Series:
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


def binary_labels(
    raw: pd.Series, path: Path, lines: np.ndarray, name: str, positive: Optional[Sequence[Any]] = None
) -> pd.Series:
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


def check_positive_labels(
    ones: int, rows: int, seen: Iterable[Any], positive: Sequence[Any], path: PathLike, name: str
) -> None:
    """With a schema's ``positive`` values: raise when they match none (or all) of the raw labels ``seen``, which
    would leave every row with label 0 (or 1); ``ones`` of the file's ``rows`` labels are 1."""
    if 0 < ones < rows:
        return
    values = sorted({str(v) for v in seen})
    shown = values[:20] + (["..."] if len(values) > 20 else [])
    what = "match none" if ones == 0 else "match every one"
    raise ValueError(
        f"the schema's positive label values {list(positive)} {what} of the values in label column {name!r} of "
        f"{str(path)!r} (values seen: {shown}): every row would have label {int(ones > 0)}; list the raw values "
        "that mean 1 in the schema's 'positive'"
    )


def override_schema(full: Schema, schema: Optional[Schema]) -> Schema:
    """A user schema for a built-in format: its fields must be the format's, with the same label."""
    if schema is None:
        return full
    full.check_names(schema.names)
    if schema.label != full.label or schema.time_column not in (None, full.time_column):
        raise ValueError(
            f"a schema for this format must keep label {full.label!r} and time column "
            f"{full.time_column!r}, got {schema.label!r} and {schema.time_column!r}"
        )
    return schema


def select_columns(schema: Schema, columns: Optional[Iterable[str]]) -> Schema:
    """``schema`` restricted to ``columns`` (all of it when None)."""
    return schema if columns is None else schema.select(columns)


def finish_frame(frame: pd.DataFrame, schema: Schema, path: PathLike) -> tuple[pd.DataFrame, Schema]:
    """``(frame, schema)`` with exactly the schema's columns and a fresh ``RangeIndex``; an empty frame raises."""
    if len(frame) == 0:
        raise ValueError(f"data file {str(path)!r} has no data rows")
    wanted = list(schema.columns)
    if set(frame.columns) != set(wanted):  # select without copying when the columns are already the right ones
        frame = frame[wanted]
    if not isinstance(frame.index, pd.RangeIndex) or frame.index.start != 0:
        frame = frame.reset_index(drop=True)
    return frame, schema


def concat_chunks(chunks: list[pd.DataFrame], path: PathLike) -> pd.DataFrame:
    """The chunks as one frame; no chunk at all raises."""
    if not chunks:
        raise ValueError(f"data file {str(path)!r} has no data rows")
    return pd.concat(chunks, ignore_index=True) if len(chunks) > 1 else chunks[0].reset_index(drop=True)


def convert_fields(chunk: pd.DataFrame, schema: Schema, path: Path, lines: np.ndarray) -> pd.DataFrame:
    """Dense fields of ``chunk`` converted in place with :func:`to_numeric` (``lines``: each row's line)."""
    for f in schema.fields:
        if f.kind == "dense":
            chunk[f.name] = to_numeric(chunk[f.name], path, lines, f.name)
    return chunk
