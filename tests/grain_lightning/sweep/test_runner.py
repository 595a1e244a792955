from __future__ import annotations

import json
import sys

import pytest

from grain_lightning.sweep.methods import parse_methods
from grain_lightning.sweep.runner import (
    SweepFailed,
    command,
    execute,
    plan_runs,
    run_env,
    threads_per_run,
)

METHODS = parse_methods("mean,grain-sample,grain-chunks4")


def test_plan_size_order_and_run_ids():
    runs = plan_runs(3, METHODS, [1e-5, 3e-5])
    assert len(runs) == 3 * 3 * 2
    assert len({r.run_id for r in runs}) == len(runs)
    assert runs[0].run_id == "mean/lr=1e-05/seed=0"
    assert [r.seed for r in runs[:6]] == [0] * 6  # seed-major: every method on the first seeds first
    assert {r.seed for r in plan_runs([4, 7], METHODS, [0.1])} == {4, 7}
    for bad in (dict(seeds=0), dict(lrs=[0.0]), dict(lrs=[]), dict(methods=[]), dict(seeds=[1, 1])):
        with pytest.raises(ValueError):
            plan_runs(**{"seeds": 2, "methods": METHODS, "lrs": [1e-3], **bad})


def test_command_and_environment(tmp_path):
    run = plan_runs([3], METHODS[1:2], [1e-5])[0]
    cmd = command(run, "cfg.yaml", tmp_path / "r", extra_args=["--trainer.max_epochs", "1"])
    assert cmd[:4] == [sys.executable, "-m", "grain_lightning.cli", "fit"]
    assert cmd[4:] == [
        "--config", "cfg.yaml", "--seed_everything", "3", "--model.lr", "1e-05",
        "--model.grain.grouping", "sample",
        "--trainer.default_root_dir", str(tmp_path / "r"), "--result_json", str(tmp_path / "r" / "result.json"),
        "--trainer.max_epochs", "1",
    ]  # fmt: skip
    assert command(run, "c", tmp_path, worker_cmd=["w"])[0] == "w"
    assert threads_per_run(2, cores=8) == 4 and threads_per_run(16, cores=8) == 1
    env = run_env(3, base={"PATH": "/bin"})
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "3"
    assert env["PATH"] == "/bin"


def test_execute_is_resumable(tmp_path, fake_worker, config, capsys):
    out = tmp_path / "out"
    runs = plan_runs(2, METHODS[:2], [1e-3, 1e-2])
    first = execute(runs, out, config_path=config, jobs=2, worker_cmd=fake_worker, quiet=True)
    assert len(first.done) == len(runs) and not first.skipped and not first.failed
    assert (runs[0].directory(out) / "log.txt").read_text().startswith("$ ")
    result = json.loads((runs[0].directory(out) / "result.json").read_text())
    assert result["threads"] == [str(threads_per_run(2))] * 2
    assert capsys.readouterr().err == ""  # quiet

    second = execute(runs, out, config_path=config, jobs=2, worker_cmd=fake_worker, quiet=True)
    assert not second.done and len(second.skipped) == len(runs)

    (runs[1].directory(out) / "result.json").unlink()
    (runs[2].directory(out) / "result.json").write_text('{"seed": 0, "lr": 0.001, "monit')  # partial file
    third = execute(runs, out, config_path=config, jobs=2, worker_cmd=fake_worker, quiet=True)
    assert third.done == [runs[1], runs[2]] and len(third.skipped) == len(runs) - 2
    assert json.loads((runs[2].directory(out) / "result.json").read_text())["seed"] == runs[2].seed


def test_a_failed_run_is_reported_and_the_others_complete(tmp_path, fake_worker, config, capsys):
    out = tmp_path / "out"
    runs = plan_runs(3, METHODS, [1e-3])
    with pytest.raises(SweepFailed, match=r"1 of 9 run\(s\) failed:\n  grain-chunks4/lr=0.001/seed=1: exit status 3"):
        execute(runs, out, config_path=config, jobs=2, worker_cmd=fake_worker, extra_args=["--fail", "4:1"])
    err = capsys.readouterr().err
    assert "FAILED grain-chunks4/lr=0.001/seed=1" in err and "simulated failure: loss is nan" in err  # log tail
    assert "done mean/lr=0.001/seed=0" in err  # one line per finished run when stderr is not a terminal
    failed = [r for r in runs if r.method.name == "grain-chunks4" and r.seed == 1][0]
    assert "simulated failure" in (failed.directory(out) / "log.txt").read_text()
    assert not (failed.directory(out) / "result.json").exists()
    again = execute(
        runs, out, config_path=config, jobs=2, worker_cmd=fake_worker, extra_args=["--fail", "4:1"], check=False
    )
    assert len(again.skipped) == 8 and [f.run for f in again.failed] == [failed]


def test_exit_zero_without_a_result_is_a_failure(tmp_path, config):
    runs = plan_runs(1, METHODS[:1], [1e-3])
    outcome = execute(runs, tmp_path, config_path=config, worker_cmd=[sys.executable, "-c", "pass"], check=False)
    assert outcome.failed[0].reason == "exit status 0 but no valid result.json"


def test_a_worker_that_cannot_start_is_a_failure(tmp_path, config):
    runs = plan_runs(1, METHODS[:1], [1e-3])
    outcome = execute(runs, tmp_path, config_path=config, worker_cmd=[str(tmp_path / "no-such-worker")], check=False)
    assert outcome.failed[0].reason.startswith("could not start")
    with pytest.raises(ValueError, match="more than once"):
        execute(runs * 2, tmp_path, config_path=config)


def test_a_rerun_starts_from_an_empty_run_directory(tmp_path, fake_worker, config):
    runs = plan_runs(1, METHODS[:1], [1e-3])
    run_dir = runs[0].directory(tmp_path)
    (run_dir / "lightning_logs" / "version_0").mkdir(parents=True)  # an interrupted earlier attempt
    (run_dir / "failed.txt").write_text("exit status 1\n")
    execute(runs, tmp_path, config_path=config, worker_cmd=fake_worker, quiet=True)
    assert sorted(p.name for p in run_dir.iterdir()) == ["log.txt", "result.json"]
