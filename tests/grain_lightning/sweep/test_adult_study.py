"""``benchmarks/grain_study/adult_groups.py`` on a tiny Adult-layout CSV made here (no ``../shared``)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pandas as pd
import pytest

from grain_lightning.config import GrainConfig
from grain_lightning.groups import ByKey, Chunks
from grain_lightning.sweep.methods import BUILTIN_METHODS, Method

SCRIPT = Path(__file__).resolve().parents[3] / "benchmarks" / "grain_study" / "adult_groups.py"


@pytest.fixture(scope="module")
def study() -> ModuleType:
    spec = importlib.util.spec_from_file_location("adult_groups", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


def adult_csv(path: Path, rows: int = 400) -> Path:
    rng = np.random.default_rng(0)
    gender = rng.choice(["Male", "Female"], rows)
    age = rng.integers(18, 80, rows)
    frame = pd.DataFrame(
        {
            "age": age,
            "workclass": rng.choice(["Private", "State-gov", "?"], rows),
            "fnlwgt": rng.integers(10_000, 500_000, rows),
            "education": rng.choice(["HS-grad", "Bachelors", "Masters"], rows),
            "educational-num": rng.integers(1, 16, rows),
            "gender": gender,
            "capital-gain": rng.choice([0, 0, 0, 5000], rows),
            "capital-loss": rng.choice([0, 0, 1500], rows),
            "hours-per-week": rng.integers(10, 70, rows),
            "income": np.where(age + rng.normal(0, 10, rows) > 50, ">50K", "<=50K"),
        }
    )
    frame.to_csv(path, index=False)
    return path


def test_every_builtin_method_maps_to_its_grain_config(study: ModuleType) -> None:
    configs = {name: study.grain_config(m) for name, m in BUILTIN_METHODS.items()}
    assert configs["mean"].aggregation == "mean"
    assert repr(configs["grain-chunks4"].grouping) == repr(Chunks(4))
    assert repr(configs["grain-label"].grouping) == repr(ByKey("labels"))
    assert configs["grain-rescaled"].step_norm == "mean"
    assert configs["grain-blockwise"].blockwise is True
    assert isinstance(configs["grain-sample"], GrainConfig) and configs["grain-sample"].aggregation == "grain"
    with pytest.raises(ValueError, match="--model.lr"):
        study.grain_config(Method("odd", ("--model.lr", "1e-3")))


def test_runs_write_the_sweep_report_and_resume(study: ModuleType, tmp_path: Path) -> None:
    data = adult_csv(tmp_path / "adult.csv")
    out = tmp_path / "out"
    argv = [
        "--data", str(data), "--output_dir", str(out), "--sizes", "16", "--seeds", "2",
        "--methods", "mean,grain-sample", "--lrs", "1e-3", "--epochs", "2",
        "--val_size", "40", "--test_size", "60", "--pretrain_epochs", "1",
    ]  # fmt: skip
    study.main(argv)
    results = sorted((out / "n16").glob("*/lr=0.001/seed=*/result.json"))
    assert len(results) == 4
    first = json.loads(results[0].read_text())
    assert first["monitor"] == "val_auc" and 0.0 <= first["test"]["test_auc"] <= 1.0 and first["steps"] == 2
    summary = pd.read_csv(out / "n16" / "summary.csv")
    assert set(summary["method"]) == {"mean", "grain-sample"}
    mean = {p.parent.parent.parent.name: json.loads(p.read_text())["test"]["test_auc"] for p in results[::2]}
    assert mean["mean"] != mean["grain-sample"]  # the methods really differ on the same seed
    stamps = [p.stat().st_mtime_ns for p in results]
    study.main(argv)  # resumes: nothing is run again
    assert [p.stat().st_mtime_ns for p in results] == stamps


def test_a_group_value_that_is_absent_is_named(study: ModuleType, tmp_path: Path) -> None:
    data = adult_csv(tmp_path / "adult.csv")
    with pytest.raises(ValueError, match="'Women'"):
        study.main(["--data", str(data), "--output_dir", str(tmp_path / "o"), "--finetune_group", "Women"])
