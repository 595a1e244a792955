from __future__ import annotations

import json
import re

import pandas as pd
import pytest

from grain_lightning.sweep import main


def test_main_end_to_end_with_two_jobs_then_report_only(tmp_path, fake_worker, config, capsys):
    out = tmp_path / "out"
    argv = [
        "--config", str(config), "--seeds", "3", "--methods", "mean,grain-sample,grain-chunks4",
        "--lrs", "1e-3,1e-2", "--jobs", "2", "--output_dir", str(out), "--quiet",
    ]  # fmt: skip
    worker = " ".join(fake_worker)
    assert main([*argv, "--worker_cmd", worker]) == 0
    captured = capsys.readouterr()
    stdout = captured.out
    assert captured.err == ""  # --quiet
    assert "# GRAIN sweep: test_acc (higher is better)" in stdout and str(out / "summary.png") in stdout
    summary = pd.read_csv(out / "summary.csv").set_index("method")
    assert summary["lr"].tolist() == [1e-3] * 3  # validation prefers 1e-3, test would prefer 1e-2
    assert summary.loc["grain-sample", "mean"] == pytest.approx(0.75 + 0.01)  # seeds 0,1,2 -> +0.01 on average
    assert summary.loc["grain-sample", "diff_mean"] == pytest.approx(0.05)
    assert summary.loc["grain-sample", "wins"] == 3
    recorded = json.loads((out / "sweep.json").read_text())
    assert [m["name"] for m in recorded["methods"]] == ["mean", "grain-sample", "grain-chunks4"]
    assert recorded["lrs"] == [1e-3, 1e-2] and recorded["seeds"] == [0, 1, 2]

    (out / "summary.md").unlink()
    assert main(["--report_only", "--output_dir", str(out)]) == 0
    assert (out / "summary.md").read_text() in capsys.readouterr().out

    # resuming with different methods into the same directory is refused, naming the change
    assert main([*argv[:5], "mean,grain-label", *argv[6:], "--worker_cmd", worker]) == 2
    assert "methods (added grain-label; removed grain-chunks4, grain-sample)" in capsys.readouterr().err


def test_main_reports_a_failed_run_and_extra_args_reach_every_run(tmp_path, fake_worker, config, capsys):
    out = tmp_path / "out"
    argv = ["--config", str(config), "--seeds", "0,1", "--methods", "mean,grain-chunks4", "--lrs", "1e-3"]
    argv += ["--jobs", "2", "--output_dir", str(out), "--", "--fail", "4:1"]
    assert main(argv, worker_cmd=fake_worker) == 1
    captured = capsys.readouterr()
    assert "1 of 4 run(s) failed" in captured.err and "grain-chunks4/lr=0.001/seed=1: exit status 3" in captured.err
    assert "seeds failed at this lr" in captured.out
    assert json.loads((out / "sweep.json").read_text())["extra_args"] == ["--fail", "4:1"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--config", "{tmp}/missing.yaml"], "config file .*missing.yaml not found"),
        (["--seeds", "0"], "at least 1"),
        (["--methods", ""], "--methods is required"),
        (["--methods", "mean,nope"], "unknown method 'nope'"),
        (["--lrs", "1e-3,-1"], "positive and finite"),
        (["--lrs", "abc"], "comma-separated numbers"),
        (["--baseline", "grain-label"], "baseline 'grain-label' is not among"),
        (["--report_only"], "drop --config"),
    ],
)
def test_main_rejects_invalid_arguments(tmp_path, config, capsys, args, message):
    base = {"--config": str(config), "--seeds": "2", "--methods": "mean", "--lrs": "1e-3"}
    argv = [a.replace("{tmp}", str(tmp_path)) for a in args]
    for key, value in base.items():
        if key not in argv:
            argv += [key, value]
    assert main([*argv, "--output_dir", str(tmp_path / "out")]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_main_rejects_an_output_dir_that_is_a_file(tmp_path, config, capsys):
    (tmp_path / "f").write_text("")
    with pytest.raises(SystemExit):
        main(["--config", str(config), "--methods", "mean", "--lrs", "1e-3", "--output_dir", str(tmp_path / "f")])
    assert "is a file" in capsys.readouterr().err
    assert main(["--report_only", "--output_dir", str(tmp_path / "nowhere")]) == 2


def test_force_with_another_config_discards_the_earlier_runs(tmp_path, fake_worker, config, capsys):
    out = tmp_path / "out"
    argv = ["--config", str(config), "--seeds", "1", "--methods", "mean", "--lrs", "1e-3", "--output_dir", str(out)]
    assert main([*argv, "--quiet"], worker_cmd=fake_worker) == 0
    result = out / "mean" / "lr=0.001" / "seed=0" / "result.json"
    before = result.stat().st_mtime_ns
    config.write_text("model:\n  lr: 0.002\n")  # another configuration: its results are not the old ones
    assert main([*argv, "--quiet"], worker_cmd=fake_worker) == 2
    assert main([*argv, "--quiet", "--force"], worker_cmd=fake_worker) == 0
    assert "1 earlier run(s) discarded" in capsys.readouterr().err
    assert result.stat().st_mtime_ns != before  # re-run, not reused
