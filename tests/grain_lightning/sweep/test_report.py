from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from grain_lightning.sweep.methods import parse_methods
from grain_lightning.sweep.report import (
    bootstrap_ci,
    choose_lrs,
    load_results,
    lr_table,
    paired_difference,
    summarize,
    write_report,
)
from grain_lightning.sweep.runner import plan_runs
from tests.grain_lightning.sweep.conftest import write_result

METHODS = parse_methods("mean,grain-sample")


def test_lr_is_chosen_on_validation_even_when_test_prefers_another(tmp_path):
    runs = plan_runs(3, METHODS, [1e-3, 1e-2])
    for run in runs:
        good_val = run.lr == 1e-3
        write_result(tmp_path, run, val=0.8 if good_val else 0.7, test=0.6 if good_val else 0.9)
    results = load_results(tmp_path, runs)
    assert choose_lrs(results) == {"mean": 1e-3, "grain-sample": 1e-3}
    summary = summarize(results, "mean")
    assert summary["mean"].tolist() == pytest.approx([0.6, 0.6])  # test reported at the val-chosen lr
    table = lr_table(results)
    assert table.loc[table["chosen"], "lr"].tolist() == [1e-3, 1e-3]


def test_min_mode_chooses_the_lowest_and_counts_a_diverged_run_as_worst(tmp_path):
    runs = plan_runs(2, METHODS[:1], [1e-3, 1e-2])
    for run in runs:
        val = {1e-3: 0.2, 1e-2: 0.1}[run.lr]
        write_result(tmp_path, run, val=math.nan if (run.lr, run.seed) == (1e-2, 1) else val, test=0.3, mode="min")
    results = load_results(tmp_path, runs)
    assert choose_lrs(results) == {"mean": 1e-3}  # 1e-2 has the lower mean on its finite seed, but one diverged
    summary = summarize(results, "mean")
    assert summary.loc[0, "worst"] == pytest.approx(0.3)


def test_bootstrap_ci_contains_the_mean_and_is_reproducible():
    x = np.random.default_rng(1).normal(0.8, 0.05, size=12)
    low, high = bootstrap_ci(x)
    assert low < x.mean() < high
    assert (low, high) == bootstrap_ci(x)
    assert high - low < 4 * x.std(ddof=1) / math.sqrt(len(x)) * 1.96
    assert all(math.isnan(v) for v in bootstrap_ci([0.5]))


def test_paired_difference_uses_common_seeds_only():
    method = pd.Series({0: 0.8, 1: 0.7, 2: 0.9, 5: 0.1})
    baseline = pd.Series({0: 0.7, 1: 0.7, 2: 0.95, 3: 0.5})
    d = paired_difference(method, baseline, "max")
    assert (d.n, d.wins, d.ties, d.losses) == (3, 1, 1, 1)
    assert d.mean == pytest.approx((0.1 + 0.0 - 0.05) / 3)
    assert d.ci_low <= d.mean <= d.ci_high
    lower_is_better = paired_difference(method, baseline, "min")
    assert (lower_is_better.wins, lower_is_better.losses) == (1, 1)


def test_a_method_with_fewer_seeds_is_paired_on_common_seeds(tmp_path):
    runs = plan_runs(4, METHODS, [1e-3])
    for run in runs:
        if run.method.name == "grain-sample" and run.seed >= 2:
            continue  # as if those runs had failed
        bonus = 0.05 if run.method.name == "grain-sample" else 0.0
        write_result(tmp_path, run, val=0.7, test=0.7 + 0.01 * run.seed + bonus)
    summary = summarize(load_results(tmp_path, runs), "mean").set_index("method")
    row = summary.loc["grain-sample"]
    assert row["n"] == 2 and row["n_paired"] == 2 and row["wins"] == 2
    assert row["diff_mean"] == pytest.approx(0.05)
    assert "2 of 4 seeds failed" in row["note"]
    assert summary.loc["mean", "note"] == "baseline" and summary.loc["mean", "n"] == 4


def test_one_seed_gives_empty_std_and_ci_not_a_crash(tmp_path):
    runs = plan_runs(1, METHODS, [1e-3])
    for run in runs:
        write_result(tmp_path, run, val=0.7, test=0.7, curve=False)
    report = write_report(tmp_path, runs, "mean")
    row = report.summary.set_index("method").loc["grain-sample"]
    assert row["n"] == 1 and math.isnan(row["std"]) and math.isnan(row["ci_low"]) and math.isnan(row["diff_ci_low"])
    assert row["ties"] == 1
    csv = pd.read_csv(report.summary_csv, keep_default_na=False)
    assert csv.loc[0, "std"] == "" and csv.loc[0, "ci_low"] == ""
    assert "n/a" in report.markdown
    assert report.summary_png is not None and report.summary_png.stat().st_size > 0  # no curves: still drawn


def test_all_runs_failed_for_a_method(tmp_path):
    runs = plan_runs(2, parse_methods("mean,grain-sample,grain-chunks4"), [1e-3])
    for run in runs:
        if run.method.name == "grain-chunks4":
            run.directory(tmp_path).mkdir(parents=True)
            (run.directory(tmp_path) / "log.txt").write_text("boom\n")
        else:
            write_result(tmp_path, run, val=0.7, test=0.7)
    report = write_report(tmp_path, runs, "mean")
    row = report.summary.set_index("method").loc["grain-chunks4"]
    assert row["n"] == 0 and row["note"] == "all runs failed" and math.isnan(row["mean"])
    assert "| grain-chunks4 | n/a | 0 |" in report.markdown


def test_no_result_at_all_still_writes_the_report(tmp_path):
    runs = plan_runs(1, METHODS, [1e-3])
    report = write_report(tmp_path, runs, "mean")
    assert all(p.exists() for p in report.paths)
    assert "no results" in report.markdown


def test_report_files_and_markdown(tmp_path):
    methods = parse_methods("mean,grain-sample,grain-chunks4")
    runs = plan_runs(3, methods, [1e-3, 1e-2])
    for run in runs:
        write_result(tmp_path, run, val=0.7 + 0.1 * (run.lr == 1e-3), test=0.6 + 0.01 * run.seed)
    report = write_report(tmp_path, runs, "mean")
    assert [p.name for p in report.paths] == ["runs.csv", "summary.csv", "summary.md", "summary.png"]
    assert all(p.stat().st_size > 0 for p in report.paths)
    table = pd.read_csv(report.runs_csv)
    assert len(table) == len(runs)
    assert list(table.columns) == [
        "seed", "method", "lr", "val_acc", "val_loss", "test_acc", "test_loss", "wall_s", "steps"
    ]  # fmt: skip
    md = report.summary_md.read_text()
    assert md.startswith("# GRAIN sweep: test_acc (higher is better)")
    for method in methods:
        assert f"| {method.name} | 0.001 |" in md  # summary row
        assert f"| {method.name} | **0.001** |" in md  # chosen lr marked in the lr table
        assert f"| {method.name} | 0.01 |" in md
    assert md == report.markdown


def test_results_that_disagree_on_the_metric_raise(tmp_path):
    runs = plan_runs(1, METHODS, [1e-3])
    write_result(tmp_path, runs[0], val=0.7, test=0.7)
    write_result(tmp_path, runs[1], val=0.7, test=0.7, mode="min")
    with pytest.raises(ValueError, match="disagree"):
        load_results(tmp_path, runs)


def test_a_failed_run_counts_as_worst_when_choosing_the_lr(tmp_path, fake_worker, config):
    from grain_lightning.sweep.runner import execute

    runs = plan_runs(2, METHODS[:1], [1e-3, 1e-2])  # validation prefers 1e-3 ...
    execute(runs, tmp_path, config_path=config, jobs=2, worker_cmd=fake_worker, extra_args=["--fail", "mean:1"],
            check=False, quiet=True)  # fmt: skip
    failed = [r for r in runs if r.seed == 1]
    assert all((r.directory(tmp_path) / "failed.txt").is_file() for r in failed)  # ... but seed 1 failed at both
    assert choose_lrs(load_results(tmp_path, runs)) == {"mean": 1e-3}  # every lr has a failure: best of the rest
    (failed[1].directory(tmp_path) / "failed.txt").unlink()  # only 1e-3 failed now: 1e-2 wins
    (failed[1].directory(tmp_path) / "log.txt").unlink()
    assert choose_lrs(load_results(tmp_path, runs)) == {"mean": 1e-2}
