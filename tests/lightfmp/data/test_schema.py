"""The data schema: YAML round trip and errors."""

from __future__ import annotations

import pytest

from lightfmp.data import FieldSpec, Schema
from tests.lightfmp.data.files import write


def test_schema_yaml_round_trip_and_errors(tmp_path):
    yaml_path = write(
        tmp_path / "s.yaml",
        """
        label: clicked
        time_column: ts
        positive: ["yes"]
        fields:
          - {name: price, kind: dense, transform: log}
          - {name: age, kind: dense, transform: bucket, num_buckets: 4}
          - {name: user, kind: sparse, min_count: 2}
          - {name: tags, kind: multi, separator: ";", pooling: mean}
          - city
        """,
    )
    s = Schema.from_yaml(yaml_path)
    assert s.names == ("price", "age", "user", "tags", "city")
    assert s["tags"].separator == ";" and s["city"].kind == "sparse" and s.positive == ("yes",)
    assert Schema.from_dict(s.to_dict()) == s
    assert s.select(["city", "price"]).names == ("price", "city")
    with pytest.raises(KeyError, match="nope"):
        s.select(["price", "nope"])
    bad = write(tmp_path / "bad.yaml", "label: y\nfields:\n  - {name: a, kind: dense, transfrom: log}\n")
    with pytest.raises(ValueError, match="transfrom"):
        Schema.from_yaml(bad)
    with pytest.raises(ValueError, match="kind must be one of"):
        FieldSpec("a", kind="categorical")
    with pytest.raises(ValueError, match="duplicated"):
        Schema("y", (FieldSpec("a"), FieldSpec("a")))
