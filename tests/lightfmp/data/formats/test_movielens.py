"""The MovieLens reader (ml-100k and ml-1m layouts)."""

from __future__ import annotations

import pytest

from lightfmp.data import read_frame
from tests.lightfmp.data.files import ml1m_dir, ml100k_dir


@pytest.mark.parametrize("layout", ["ml-100k", "ml-1m"])
def test_movielens_readers(tmp_path, layout):
    root = (ml100k_dir if layout == "ml-100k" else ml1m_dir)(tmp_path / layout)
    frame, schema = read_frame("movielens", root)
    assert schema.time_column == "timestamp" and schema["genres"].kind == "multi"
    assert frame["rating"].tolist() == [1, 0, 1, 0]  # ratings 5, 3, 4, 1: label = rating >= 4
    assert frame["timestamp"].tolist() == [100, 300, 200, 50]
    assert frame["genres"].tolist() == ["Action|Comedy", "Action|Comedy", "Drama", "Drama"]
    assert frame["release_year"].tolist() == ["1995", "1995", "1987", "1987"]
    assert frame["zip_prefix"].tolist() == ["857", "940", "857", "012" if layout == "ml-1m" else "123"]
    assert frame["age"].tolist() == ["18", "50", "18", "1"]  # ml-100k ages 24, 53, 17 -> groups 18, 50, 1
    assert frame["gender"].tolist() == ["M", "F", "M", "M"]
    assert frame["user_id"].tolist() == ["1", "2", "1", "3"] and frame["item_id"].tolist() == ["10", "10", "20", "20"]


def test_movielens_errors(tmp_path):
    root = ml100k_dir(tmp_path / "ml")
    with open(root / "u.data", "a") as fh:
        fh.write("9\t10\t4\t10\n")
    with pytest.raises(ValueError, match=r"line 5 .* user_id '9'"):
        read_frame("movielens", root)
    (tmp_path / "other").mkdir()
    with pytest.raises(ValueError, match="not a MovieLens directory"):
        read_frame("movielens", tmp_path / "other")
