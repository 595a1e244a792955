"""Streaming new rows (``feature_chunks``): the same field values as the training readers, chunk by chunk, with
or without the label column."""

from __future__ import annotations

import pandas as pd
import pytest

from lightfmp.data import read_frame
from lightfmp.data.formats import adult_path
from lightfmp.data.unlabeled import feature_chunks
from tests.lightfmp.data.files import write


def streamed(format, path, schema, chunksize, **kwargs) -> pd.DataFrame:
    chunks = list(feature_chunks(format, path, schema, chunksize=chunksize, **kwargs))
    assert all(len(frame) <= chunksize for frame, _ in chunks)
    return pd.concat([frame for frame, _ in chunks], ignore_index=True)


def same_fields(got: pd.DataFrame, expected: pd.DataFrame, names) -> None:
    for name in names:
        pd.testing.assert_series_equal(got[name], expected[name], check_dtype=False, check_names=False, obj=name)


def test_adult_streams_like_the_training_reader():
    """The packaged Adult file (gzip, spaces after commas, ``?`` missing) in chunks of 10,000 rows."""
    frame, schema = read_frame("adult")
    got = streamed("adult", adult_path(), schema, 10_000)
    assert len(got) == len(frame) == 48842
    same_fields(got, frame, schema.names)


def test_criteo_streams_with_or_without_its_label(criteo_file, tmp_path):
    frame, schema = read_frame("criteo", criteo_file)
    layout = schema.names
    unlabelled = write(tmp_path / "test.txt", "".join(line.split("\t", 1)[1] + "\n" for line in
                                                       criteo_file.read_text().splitlines()))  # fmt: skip
    for path in (criteo_file, unlabelled):
        same_fields(streamed("criteo", path, schema, 2, layout=layout), frame, schema.names)
    with pytest.raises(ValueError, match="has 5 tab-separated fields in its first line"):
        list(feature_chunks("criteo", write(tmp_path / "narrow.txt", "1\t2\t3\t4\t5\n"), schema, layout=layout))
    with pytest.raises(ValueError, match="no header, so it has no id column"):
        feature_chunks("criteo", criteo_file, schema, id_column="id", layout=layout)


def test_avazu_derives_the_hour_fields_without_a_click_column(tmp_path):
    text = """
        id,click,hour,C1,site_id
        1000009418151094273,0,14102100,1005,1fbe01fe
        10000169349117863715,1,14102513,1005,
        """
    labelled = write(tmp_path / "train.csv", text)
    frame, schema = read_frame("avazu", labelled)
    unlabelled = write(tmp_path / "test.csv", text.replace(",click", "").replace(",0,", ",").replace(",1,", ","))
    chunks = list(feature_chunks("avazu", unlabelled, schema, chunksize=1, id_column="id"))
    same_fields(pd.concat([f for f, _ in chunks], ignore_index=True), frame, schema.names)
    assert [ids.tolist() for _, ids in chunks] == [["1000009418151094273"], ["10000169349117863715"]]
