"""Faults a user can make, and how Light-FMP answers them: refused up front naming the value, or recorded as
undefined (``null``), never as a made-up number; errors name the file they come from."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
import pytest

from lightfmp.cli import run_cli
from lightfmp.data import read_frame

SCHEMA = """\
label: y
fields:
  - {name: age, kind: dense, transform: none}
  - {name: hours, kind: dense}
  - job
  - city
"""


def table(root: Path, labels: Optional[list[int]] = None, rows: int = 200, extra_schema: str = "") -> Path:
    """``root/data.csv`` (numeric age and hours, categorical job and city, binary label y) and ``root/schema.yaml``;
    returns ``root``."""
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(
        {
            "age": rng.normal(40, 10, rows).round(1),
            "hours": rng.integers(10, 60, rows),
            "job": rng.choice(["a", "b", "c"], rows),
            "city": rng.choice(["x", "y"], rows),
            "y": (rng.random(rows) < 0.4).astype(int) if labels is None else labels,
        }
    )
    root.mkdir(parents=True, exist_ok=True)
    frame.to_csv(root / "data.csv", index=False)
    (root / "schema.yaml").write_text(SCHEMA + extra_schema)
    return root


def args(data: Path, output_dir: Path, *extra: str) -> list[str]:
    return [
        "--data.format", "csv", "--data.path", str(data / "data.csv"), "--data.schema", str(data / "schema.yaml"),
        "--data.batch_size", "32", "--model.backbone", "mlp", "--model.hidden", "[8]", "--model.embedding_dim", "4",
        "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false", "--output_dir", str(output_dir), *extra,
    ]  # fmt: skip


def strict_json(text: str) -> dict:
    """``json.loads`` that refuses the NaN / Infinity tokens Python's json writes by default."""

    def refuse(token: str) -> None:
        raise ValueError(f"metrics.json holds {token}")

    return json.loads(text, parse_constant=refuse)


# ----------------------------------------------------------------------------- 1. undefined metrics
def test_single_class_training_labels_are_refused_before_outputs(tmp_path):
    data = table(tmp_path / "data", labels=[1] * 200)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"label column 'y' has values \[1\]"):
        run_cli(["pretrain", *args(data, out)])
    assert not out.exists()


def test_positive_value_matching_no_label_is_refused(tmp_path):
    data = table(tmp_path / "data", extra_schema="positive: ['yes']\n")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"\['yes'\] match none .* column 'y' .*values seen: \['0', '1'\]"):
        run_cli(["pretrain", *args(data, out)])
    assert not out.exists()
    every = table(tmp_path / "every", extra_schema="positive: ['0', '1']\n")
    with pytest.raises(ValueError, match=r"match every one .* every row would have label 1"):
        read_frame("csv", every / "data.csv", schema=every / "schema.yaml")


def test_single_class_test_split_records_null_auc(tmp_path):
    # sequential split: the last 20 rows are the test split (and the 20 before them the validation split)
    labels = [0, 1] * 80 + [0] * 40
    data = table(tmp_path / "data", labels=labels)
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match=r"test split's 20 rows all have label 0 in label column 'y'"):
        run_cli(["pretrain", *args(data, out, "--data.split", "sequential")])
    entry = strict_json((out / "metrics.json").read_text())["pretrain"]
    assert entry["auc"] is None
    assert math.isfinite(entry["logloss"]) and entry["test_samples"] == 20


# ----------------------------------------------------------------------------- 2. no training
@pytest.mark.parametrize(
    "option",
    ["--trainer.max_epochs", "--trainer.max_steps", "--finetune_epochs"],
    ids=lambda o: o.split(".")[-1].lstrip("-"),
)
def test_zero_training_length_is_refused_before_outputs(tmp_path, option):
    data = table(tmp_path / "data")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=f"{option} 0: stage '(pretrain|finetune)' would not train"):
        run_cli(["pipeline", *args(data, out, option, "0")])
    assert not out.exists()


# ----------------------------------------------------------------------------- 3. duplicate columns
@pytest.mark.parametrize("file_format", ["csv", "parquet"])
def test_duplicate_column_names_are_refused(tmp_path, file_format):
    data = table(tmp_path / "data")
    frame = pd.read_csv(data / "data.csv")
    frame.insert(len(frame.columns), "age_again", 99.0)
    if file_format == "csv":
        path = data / "dup.csv"
        lines = frame.to_csv(index=False).splitlines()
        path.write_text("\n".join([lines[0].replace("age_again", "age"), *lines[1:]]) + "\n")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = data / "dup.parquet"
        names = [("age" if c == "age_again" else c) for c in frame.columns]
        pq.write_table(pa.Table.from_arrays([pa.array(frame[c]) for c in frame.columns], names=names), path)
    with pytest.raises(
        ValueError, match=rf"duplicate column name\(s\) \['age'\] in the header of '.*dup.{file_format}'"
    ):
        read_frame(file_format, path, schema=data / "schema.yaml")


# ----------------------------------------------------------------------------- 4. errors naming the file
@pytest.mark.parametrize("damage", ["truncated", "not_gzip"])
def test_broken_gzip_names_the_file_and_line(tmp_path, damage):
    data = table(tmp_path / "data")
    raw = (data / "data.csv").read_bytes()
    path = data / "data.csv.gz"
    packed = gzip.compress(raw)
    path.write_bytes(packed[: len(packed) // 2] if damage == "truncated" else raw)
    with pytest.raises(ValueError, match=r"'.*data\.csv\.gz' is not a readable gzip file .* in line \d+") as error:
        read_frame("csv", path, schema=data / "schema.yaml")
    assert isinstance(error.value.__cause__, (EOFError, gzip.BadGzipFile))


@pytest.mark.parametrize("stage", ["prune", "finetune", "prune-default"])
def test_file_that_is_not_a_checkpoint_is_named(tmp_path, stage):
    data = table(tmp_path / "data")
    out = tmp_path / "out"
    out.mkdir()
    bogus = out / "pretrain.ckpt" if stage == "prune-default" else tmp_path / "notes.ckpt"
    bogus.write_text("not a checkpoint\n")
    extra = [] if stage == "prune-default" else ["--checkpoint", str(bogus)]
    with pytest.raises(ValueError, match=rf"'{bogus}' is not a readable checkpoint") as error:
        run_cli([stage.split("-")[0], *args(data, out, *extra)])
    assert error.value.__cause__ is not None


def test_output_dir_that_is_a_file_is_refused_before_reading(tmp_path):
    taken = tmp_path / "taken"
    taken.write_text("keep me\n")
    missing_data = tmp_path / "nowhere"  # never read: the output directory is checked first
    for command in ("pretrain", "pipeline"):
        with pytest.raises(NotADirectoryError, match=rf"output_dir '{taken}' is an existing file"):
            run_cli([command, *args(missing_data, taken)])
    assert taken.read_text() == "keep me\n"
