"""Shared fixtures of the Light-FMP tests."""

from __future__ import annotations

import pytest

from tests.lightfmp.data.files import criteo_line, write


@pytest.fixture
def criteo_file(tmp_path):
    rows = [
        criteo_line(1, [1, -1, "", 3] + [0] * 9, ["68fd1e64", "", "a"] + ["x"] * 23),
        criteo_line(0, ["", 5, 2, 0] + [7] * 9, ["68fd1e64", "80e26c9b", "b"] + ["y"] * 23),
        criteo_line(0, [0] * 13, ["05db9164", "80e26c9b", ""] + ["x"] * 23),
    ]
    return write(tmp_path / "train.txt", "\n".join(rows) + "\n")
