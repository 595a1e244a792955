"""The Avazu reader."""

from __future__ import annotations

import pytest

from lightfmp.data import read_frame
from tests.lightfmp.data.files import write


def test_avazu_reader(tmp_path):
    path = write(
        tmp_path / "avazu.csv",
        """
        id,click,hour,C1,banner_pos,site_id,device_type
        1000009418151094273,0,14102100,1005,0,1fbe01fe,1
        10000169349117863715,1,14102513,1005,1,1fbe01fe,1
        10000371904215119486,0,14102623,1002,0,,0
        """,
    )
    frame, schema = read_frame("avazu", path)
    assert schema.label == "click" and schema.time_column == "hour"
    assert schema.names == ("hour_of_day", "weekday", "weekend", "C1", "banner_pos", "site_id", "device_type")
    assert frame["click"].tolist() == [0, 1, 0]
    # 2014-10-21 was a Tuesday (weekday 1), 2014-10-25 a Saturday, 2014-10-26 a Sunday
    assert frame["hour_of_day"].tolist() == ["0", "13", "23"]
    assert frame["weekday"].tolist() == ["1", "5", "6"] and frame["weekend"].tolist() == ["0", "1", "1"]
    assert frame["hour"].tolist() == [14102100, 14102513, 14102623]
    assert frame["site_id"].isna().tolist() == [False, False, True]
    sub, _ = read_frame("avazu", path, columns=["weekday", "site_id"])
    assert sorted(sub.columns) == ["click", "hour", "site_id", "weekday"]
    no_click = write(tmp_path / "test.csv", "id,hour,C1\n1,14102100,1005\n")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['click'\]"):
        read_frame("avazu", no_click)
