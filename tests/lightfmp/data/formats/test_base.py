"""Shared reader checks: empty or missing files, field counts."""

from __future__ import annotations

import pytest

from lightfmp.data import FieldSpec, Schema, read_frame
from lightfmp.data.formats.base import check_field_counts
from tests.lightfmp.data.files import write


def test_empty_and_missing_files(tmp_path):
    empty = tmp_path / "empty.tsv"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty"):
        read_frame("criteo", empty)
    header_only = write(tmp_path / "h.csv", "y,a\n")
    with pytest.raises(ValueError, match="no data rows"):
        read_frame("csv", header_only, schema=Schema("y", (FieldSpec("a"),)))
    with pytest.raises(FileNotFoundError, match="nothere"):
        read_frame("criteo", tmp_path / "nothere.tsv")
    with pytest.raises(ValueError, match="unknown data format 'libsvm'"):
        read_frame("libsvm", empty)


def test_field_count_check_across_blocks(tmp_path):
    lines = ["a,b,c"] * 50 + ["a,b"] + ["a,b,c"] * 10
    path = write(tmp_path / "x.csv", "\n".join(lines))  # no final newline
    with pytest.raises(ValueError, match="line 51: it has 2 fields"):
        check_field_counts(path, ",", block_bytes=7)
    ok = write(tmp_path / "ok.csv", "\n".join(["a::b::c"] * 5))
    assert check_field_counts(ok, "::", block_bytes=5) == 3


def test_field_count_check_with_quotes(tmp_path):
    path = write(tmp_path / "q.csv", 'a,b,y\n"x, with comma",1,0\n"multi\nline ""q""",2,1\nplain,3,0,extra\n')
    with pytest.raises(ValueError, match="line 5: it has 4 fields"):
        check_field_counts(path, ",", skip_lines=1, quote='"', block_bytes=4)
    ok = write(tmp_path / "ok.csv", 'a,b,y\n"x, with comma",1,0\n"multi\nline ""q""",2,1\n')
    frame, _ = read_frame("csv", ok, schema=Schema("y", (FieldSpec("a"), FieldSpec("b", kind="dense"))))
    assert frame["a"].tolist() == ["x, with comma", 'multi\nline "q"'] and frame["y"].tolist() == [0, 1]
