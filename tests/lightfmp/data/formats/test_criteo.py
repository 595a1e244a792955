"""The Criteo reader."""

from __future__ import annotations

import numpy as np
import pytest

from lightfmp.data import FieldSpec, Preprocessor, Schema, read_frame
from tests.lightfmp.data.files import criteo_line, write


def test_criteo_reader(criteo_file):
    frame, schema = read_frame("criteo", criteo_file)
    assert (
        sorted(frame.columns)
        == sorted(schema.columns)
        == sorted([f"I{i}" for i in range(1, 14)] + [f"C{i}" for i in range(1, 27)] + ["label"])
    )
    assert list(schema.names) == [f"I{i}" for i in range(1, 14)] + [f"C{i}" for i in range(1, 27)]
    assert frame["label"].tolist() == [1, 0, 0]
    assert frame["I2"].tolist() == [-1.0, 5.0, 0.0]
    assert np.isnan(frame["I3"].iloc[0]) and np.isnan(frame["I1"].iloc[1])
    assert frame["C1"].tolist() == ["68fd1e64", "68fd1e64", "05db9164"]
    assert frame["C2"].isna().tolist() == [True, False, False]
    sub, sub_schema = read_frame("criteo", criteo_file, columns=["C2", "I4"])
    assert sorted(sub.columns) == ["C2", "I4", "label"] and sub_schema.names == ("I4", "C2")
    assert sub["C2"].equals(frame["C2"])
    with pytest.raises(KeyError, match="C99"):
        read_frame("criteo", criteo_file, columns=["C99"])
    assert len(read_frame("criteo", criteo_file, max_rows=2)[0]) == 2


@pytest.mark.parametrize(
    "bad_line, message",
    [
        (criteo_line(1, [0] * 13, ["a"] * 25), r"line 2: it has 39 fields, expected 40"),
        (criteo_line(1, [0] * 12 + ["abc"], ["a"] * 26), r"'abc' in numeric field 'I13' .* line 2"),
        (criteo_line(2, [0] * 13, ["a"] * 26), r"non-binary label '2' .* line 2"),
        ("", r"line 2: it is blank"),
    ],
)
def test_criteo_malformed_rows_name_file_and_line(tmp_path, bad_line, message):
    good = criteo_line(0, [0] * 13, ["a"] * 26)
    path = write(tmp_path / "bad.tsv", "\n".join([good, bad_line, good]) + "\n")
    with pytest.raises(ValueError, match=message) as info:
        read_frame("criteo", path)
    assert "bad.tsv" in str(info.value)


def test_builtin_format_schema_override(criteo_file):
    schema = Schema(
        "label", (FieldSpec("I2", kind="dense", transform="bucket", num_buckets=2), FieldSpec("C1", min_count=2))
    )
    frame, got = read_frame("criteo", criteo_file, schema=schema)
    assert got == schema and sorted(frame.columns) == ["C1", "I2", "label"]
    prep = Preprocessor(got).fit(frame)
    assert prep.feature_spec.dense == () and prep.feature_spec.sparse_names == ("I2", "C1")
    assert prep.states["C1"]["vocab"] == ["68fd1e64"]  # seen twice; "05db9164" once
    with pytest.raises(ValueError, match="must keep label 'label'"):
        read_frame("criteo", criteo_file, schema=Schema("y", (FieldSpec("C1"),)))
    with pytest.raises(KeyError, match="C77"):
        read_frame("criteo", criteo_file, schema=Schema("label", (FieldSpec("C77"),)))
