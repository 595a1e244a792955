"""Faults a user can make, and how Light-FMP answers them: refused up front naming the value, or recorded as
undefined (``null``), never as a made-up number; errors name the file they come from."""

from __future__ import annotations

import gzip
import json
import math
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
import pytest

from lightfmp import staging
from lightfmp.cli import run_cli
from lightfmp.data import read_frame
from lightfmp.outputs import STAGE_FILES
from lightfmp.staging import staging_directories

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


# ----------------------------------------------------------------------------- 5. nothing lost
def snapshot(out: Path) -> dict[str, bytes]:
    """Every visible file of an output directory and its bytes."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file() and not p.name.startswith(".")}


@pytest.fixture
def finished_run(tmp_path) -> tuple[Path, Path, dict[str, bytes]]:
    """A complete pipeline run: (data directory, output directory, snapshot of its files)."""
    data = table(tmp_path / "data", rows=400)
    out = tmp_path / "out"
    run_cli(["pipeline", *args(data, out), "--top_k", "2"])
    files = snapshot(out)
    assert {"pretrain.ckpt", "preprocessor.json", "pruned.ckpt", "feature_report.csv", "finetune.ckpt"} <= set(files)
    assert list(strict_json(files["metrics.json"].decode())) == ["pretrain", "prune", "finetune"]
    return data, out, files


def test_failed_reruns_leave_the_previous_run_complete(finished_run, tmp_path):
    """Bad input, or a failure in the middle of training, never removes or changes the previous run's files."""
    data, out, before = finished_run
    typo = [a if not a.endswith("data.csv") else str(data / "dta.csv") for a in args(data, out)]
    with pytest.raises(FileNotFoundError, match="dta.csv"):
        run_cli(["pretrain", *typo])
    assert snapshot(out) == before
    with pytest.raises(ValueError, match="top_k"):
        run_cli(["prune", *args(data, out), "--top_k", "0", "--selection", "random"])
    assert snapshot(out) == before
    for stage in ("pretrain", "finetune"):
        with pytest.raises(RuntimeError, match="injected failure"):
            run_cli([stage, *args(data, out), "--trainer.callbacks+=tests.lightfmp.killer.RaiseAtBatch"])
        assert snapshot(out) == before, stage
    assert [p.name for p in out.iterdir() if p.name.startswith(".staging")] == []  # cleaned up on the way out


def _run_killed(argv: list[str]) -> subprocess.CompletedProcess:
    code = f"from lightfmp.cli import main; main({argv!r})"
    repo = Path(__file__).resolve().parents[2]
    return subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_sigkill_mid_stage_leaves_the_previous_run_complete(finished_run, stage):
    """SIGKILL in the middle of a fit: no clean-up runs, and still the previous outputs are complete and usable."""
    data, out, before = finished_run
    done = _run_killed([stage, *args(data, out), "--trainer.callbacks+=tests.lightfmp.killer.SigkillAtBatch"])
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
    assert snapshot(out) == before
    assert staging_directories(out) == []  # a stage stages its files only after its fit
    from lightfmp.lightning_module import LightFMPModule

    LightFMPModule.load_from_checkpoint(out / "finetune.ckpt")  # usable
    run_cli(["prune", *args(data, out), "--top_k", "2"])  # the next run works as usual
    assert list(strict_json((out / "metrics.json").read_text())) == ["pretrain", "prune"]


def test_a_commit_cut_short_is_finished_by_the_next_run(finished_run, monkeypatch):
    """Killed between the renames of a commit: metrics.json lists no stage whose files are not all in place, and
    the next run completes the commit from the staging directory."""
    data, out, before = finished_run
    real_replace = Path.replace
    moved: list[str] = []

    def replace_once(self: Path, target: Path) -> Path:
        if moved:
            raise KeyboardInterrupt("killed during the commit")
        moved.append(self.name)
        return real_replace(self, target)

    monkeypatch.setattr(staging.Path, "replace", replace_once)
    with pytest.raises(KeyboardInterrupt):
        run_cli(["prune", *args(data, out), "--top_k", "3"])
    monkeypatch.undo()
    metrics = strict_json((out / "metrics.json").read_text())
    assert list(metrics) == ["pretrain"]  # prune and finetune are out: their files are being replaced
    for stage in metrics:
        assert all((out / name).exists() for name in STAGE_FILES[stage])
    assert not (out / "finetune.ckpt").exists()  # made from the pruned model being replaced
    with staging.locked(out):
        assert staging.recover(out) == ["prune"]
    metrics = strict_json((out / "metrics.json").read_text())
    assert list(metrics) == ["pretrain", "prune"] and len(metrics["prune"]["kept_fields"]) == 3
    assert all((out / name).exists() for name in STAGE_FILES["prune"])
    assert pd.read_csv(out / "feature_report.csv").kept.sum() == 3


def test_a_second_run_on_the_same_output_dir_is_refused(finished_run):
    data, out, before = finished_run
    with staging.locked(out):
        with pytest.raises(RuntimeError, match=r"output_dir .*out' is in use by another lightfmp run"):
            run_cli(["prune", *args(data, out), "--top_k", "2"])
    assert snapshot(out) == before


# ----------------------------------------------------------------------------- 6. foreign checkpoints
def test_prune_and_finetune_refuse_data_other_than_stage_1s(finished_run, tmp_path):
    """Another file (or the same file changed) would be encoded with stage 1's vocabularies: refused, naming what
    differs; --allow_data_mismatch goes on with a warning. A copy of the same file elsewhere is the same data."""
    data, out, before = finished_run
    other = table(tmp_path / "other", rows=300)  # same schema and columns, other rows
    for stage, extra in (("prune", ["--top_k", "2"]), ("finetune", [])):
        with pytest.raises(ValueError, match=r"differs from the data the stage-1 checkpoint .*the data file's content"):
            run_cli([stage, *args(other, out), *extra])
        assert snapshot(out) == before
    with pytest.raises(ValueError, match=r"min_count=3 \(stage 1: 1\)"):
        run_cli(["finetune", *args(data, out), "--data.min_count", "3"])
    with pytest.warns(UserWarning, match="--allow_data_mismatch: going on with data other than stage 1's"):
        run_cli(["prune", *args(other, out), "--top_k", "2", "--allow_data_mismatch", "true"])
    copy = tmp_path / "copy"
    shutil.copytree(data, copy)
    run_cli(["finetune", *args(copy, out)])  # same content, another path: accepted
    with open(data / "data.csv", "a") as f:
        f.write("41.0,20,a,x,1\n")  # the stage-1 file itself changed
    with pytest.raises(ValueError, match="the data file's content"):
        run_cli(["finetune", *args(data, out)])


# ----------------------------------------------------------------------------- 7. small data
def test_too_few_training_steps_warn_naming_the_numbers(tmp_path):
    """200 rows: the pretrain subset (20 % of the 160 training rows) is 32 rows, one batch of 32; at batch 8 it is
    4 steps per epoch; the finetune subset (128 rows, batch 4) gives 32 steps and no warning."""
    data = table(tmp_path / "data")
    out = tmp_path / "out"
    with pytest.warns(
        UserWarning, match=r"stage 'pretrain' trains on 32 rows .*1 optimizer steps per epoch at batch 32"
    ):
        run_cli(["pretrain", *args(data, out)])
    with pytest.warns(UserWarning, match=r"trains on 32 rows .*fewer than one batch \(64\).*--data.batch_size \(to 1 "):
        run_cli(["pretrain", *args(data, out), "--data.batch_size", "64"])
    run_cli(["prune", *args(data, out), "--top_k", "2"])
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        run_cli(["finetune", *args(data, out), "--data.batch_size", "4"])
    assert not [w for w in seen if "optimizer steps per epoch" in str(w.message)]


def test_sigkill_while_staging_leaves_the_previous_run_complete(finished_run, monkeypatch):
    """Killed after the staging directory is made and while the stage's files are being written: the output
    directory is unchanged, and the next run removes the orphaned staging directory."""
    data, out, before = finished_run
    code = (
        "import os, signal\n"
        "from lightfmp import outputs, stages\n"
        "def killed(*args, **kwargs):\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "stages.write_preprocessor = killed\n"
        f"from lightfmp.cli import main; main({['pretrain', *args(data, out)]!r})\n"
    )
    repo = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
    assert snapshot(out) == before
    assert len(staging_directories(out)) == 1  # left by the killed run, never visible as outputs
    run_cli(["prune", *args(data, out), "--top_k", "2"])  # the next run recovers the directory
    assert staging_directories(out) == []
    assert list(strict_json((out / "metrics.json").read_text())) == ["pretrain", "prune"]
