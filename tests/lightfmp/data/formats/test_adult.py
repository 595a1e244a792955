"""The UCI Adult reader."""

from __future__ import annotations

import pandas as pd
import pytest

from lightfmp.data import read_frame
from tests.lightfmp.data.files import write


def test_adult_packaged_and_fixture(tmp_path):
    frame, schema = read_frame("adult")
    assert frame.shape == (48842, 15) and schema.label == "income"
    assert frame["income"].sum() == 11687
    assert frame["workclass"].isna().sum() > 0 and "?" not in set(frame["workclass"].dropna())
    header = (
        "age,workclass,fnlwgt,education,educational-num,marital-status,occupation,relationship,race,gender,"
        "capital-gain,capital-loss,hours-per-week,native-country,income"
    )
    path = write(
        tmp_path / "adult.csv",
        header + """
        39, State-gov,77516,Bachelors,13,Never-married,Adm-clerical,Not-in-family,"""
        """White,Male,2174,0,40,United-States,<=50K.
        50,?,83311,Bachelors,13,Married-civ-spouse,Exec-managerial,Husband,White,Male,0,0,13,United-States,>50K.
        """,
    )
    frame, _ = read_frame("adult", path)
    assert frame["income"].tolist() == [0, 1]
    assert frame["workclass"].iloc[0] == "State-gov" and pd.isna(frame["workclass"].iloc[1])
    assert frame["capital-gain"].tolist() == [2174.0, 0.0]
    bad = write(tmp_path / "bad.csv", header + "\n39,x,1,B,13,N,A,N,W,M,0,0,40,US,maybe\n")
    with pytest.raises(ValueError, match=r"non-binary label 'maybe' .* line 2"):
        read_frame("adult", bad)
