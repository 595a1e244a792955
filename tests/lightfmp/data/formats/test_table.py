"""The csv and parquet readers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from lightfmp.data import FieldSpec, Schema, read_frame
from tests.lightfmp.data.files import write


def test_csv_and_parquet_with_schema(tmp_path):
    schema_path = write(
        tmp_path / "schema.yaml",
        """
        label: y
        time_column: t
        positive: ["yes"]
        fields:
          - {name: x, kind: dense, transform: none}
          - {name: cat, kind: sparse}
          - {name: tags, kind: multi, separator: ";"}
        """,
    )
    csv = write(
        tmp_path / "data.csv",
        """
        t,x,cat,tags,y,unused
        3,1.5,a,p;q,yes,0
        1,,b,,no,0
        2,-2,a,q,yes,0
        """,
    )
    frame, schema = read_frame("csv", csv, schema=schema_path)
    assert sorted(frame.columns) == ["cat", "t", "tags", "x", "y"]
    assert frame["y"].tolist() == [1, 0, 1] and np.isnan(frame["x"].iloc[1])
    pq = tmp_path / "data.parquet"
    frame.assign(y=frame["y"].map({1: "yes", 0: "no"})).to_parquet(pq)
    pframe, _ = read_frame("parquet", pq, schema=schema_path, chunksize=2)
    pd.testing.assert_frame_equal(pframe.where(pframe.notna(), np.nan)[frame.columns], frame, check_dtype=False)
    with pytest.raises(ValueError, match="needs a schema"):
        read_frame("csv", csv)
    missing = write(tmp_path / "m.csv", "t,x,y\n1,2,yes\n")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['cat', 'tags'\]"):
        read_frame("csv", missing, schema=schema_path)
    binary = Schema("y", (FieldSpec("x", kind="dense"),))
    nonbinary = write(tmp_path / "nb.csv", "x,y\n1,0\n2,1\n3,0.5\n")
    with pytest.raises(ValueError, match=r"non-binary label '0.5' .* line 4"):
        read_frame("csv", nonbinary, schema=binary)
    too_many = write(tmp_path / "tm.csv", "x,y\n1,0\n2,1,7\n")
    with pytest.raises(ValueError, match=r"tm.csv.*line 3"):
        read_frame("csv", too_many, schema=binary)
