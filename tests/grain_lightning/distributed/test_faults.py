"""``grain_ddp`` faults (issue 17, item 7): two gloo processes with an injected fault, one launch per case.

Each case launches ``fault_worker.py`` (Lightning's popen launcher re-runs it as rank 1) and checks that the
run ends with every process non-zero, that BOTH ranks name the cause, and that the ranks stopped within
seconds of each other, far from the process-group timeout given to the worker (which is how long a rank
would otherwise wait). The README's "What happens when..." table for ``grain_ddp`` lists these cases.
"""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[3]
WORKER = Path(__file__).with_name("fault_worker.py")
TIMEOUT_S = 120.0  # the process-group timeout given to the worker: a rank left waiting would wait this long
PROMPT_S = 20.0  # both ranks stop within this of each other (loaded 2-core CI machine; usually < 1 s)


def launch(out: Path, scenario: str, timeout_s: float = TIMEOUT_S) -> tuple[subprocess.CompletedProcess, dict]:
    """Run one scenario; return the launcher's result and, per rank, ``(time stopped, error text)``."""
    for _ in range(3):
        env = dict(
            os.environ,
            PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(free_port()),
            PYTHONWARNINGS="ignore",
        )
        for key in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "GLOBAL_RANK", "GRAIN_TEST_DEVICES"):
            env.pop(key, None)
        proc = subprocess.run(
            [sys.executable, str(WORKER), str(out), scenario, str(timeout_s)],
            env=env,
            cwd=str(ROOT),
            capture_output=True,
            text=True,
            timeout=timeout_s + 240,  # the whole run, both processes (their pipes close when both have exited)
        )
        if "address already in use" not in (proc.stderr + proc.stdout).lower():
            break
    errors = {}
    for r in range(2):
        err = out / f"rank{r}.err"
        if err.exists():
            when, _, text = err.read_text().partition("\n")
            errors[r] = (float(when), text)
    return proc, errors


def assert_every_rank_failed(proc: subprocess.CompletedProcess, errors: dict, out: Path) -> None:
    assert proc.returncode != 0, proc.stderr[-3000:]
    assert not list(out.glob("*.ok")), f"a rank finished as if nothing happened: {list(out.glob('*.ok'))}"
    assert set(errors) == {0, 1}, (sorted(errors), proc.stderr[-3000:])
    stopped = [errors[r][0] for r in range(2)]
    assert abs(stopped[0] - stopped[1]) < PROMPT_S, stopped


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


@pytest.mark.slow
@pytest.mark.parametrize(
    "scenario, counts",
    [
        ("unequal_map", "rank 0: 3, rank 1: 2"),
        ("unequal_iterable", "rank 0: more than 2, rank 1: 2"),
        ("unequal_iterable_mixin", "rank 0: more than 2, rank 1: 2"),
    ],
)
def test_unequal_batch_counts_raise_on_every_rank_naming_the_counts(tmp_path, scenario, counts):
    """Rank 1 has 2 batches, rank 0 has 3 (a sampler with a length / an iterable dataset without one, also
    under ``GrainMixin`` with ``mixin_groups="global"``, whose combination exchanges counts instead of flags)."""
    proc, errors = launch(tmp_path, scenario)
    assert_every_rank_failed(proc, errors, tmp_path)
    for r in range(2):
        line = last_line(errors[r][1])
        assert line.startswith("grain_lightning.distributed.faults.UnequalBatchesError: grain_ddp: the ranks have")
        assert counts in line and "drop_last=True" in line and "use_distributed_sampler=True" in line


@pytest.mark.slow
@pytest.mark.parametrize("bad_rank", [1, 0])
def test_exception_on_one_rank_stops_every_rank_with_the_original_error(tmp_path, bad_rank):
    """``ValueError`` in ``training_step`` on one rank only (rank 0 hosts the store, rank 1 is the child)."""
    proc, errors = launch(tmp_path, f"raise_rank{bad_rank}")
    assert_every_rank_failed(proc, errors, tmp_path)
    original = f"ValueError: injected failure on rank {bad_rank} at batch 1"
    assert last_line(errors[bad_rank][1]) == original
    other = last_line(errors[1 - bad_rank][1])
    assert other.startswith(f"grain_lightning.distributed.faults.RankFailedError: grain_ddp: rank {bad_rank} failed: ")
    assert original in other
    assert f"rank {bad_rank} failed: {original}" in proc.stderr  # the watchdog's log line, as soon as seen


def test_the_mixin_marks_refusals_raised_on_every_rank_with_the_name_faults_reads():
    """``protocol.py`` (below ``distributed/``) and ``faults.py`` (which imports no grain module) share the name."""
    from grain_lightning.distributed import faults
    from grain_lightning.protocol import RAISED_ON_EVERY_RANK, raised_on_every_rank

    assert RAISED_ON_EVERY_RANK == faults._EVERY_RANK
    assert faults._is_every_rank(raised_on_every_rank(ValueError("refused")))


@pytest.mark.slow
def test_grain_fsdp_exception_on_one_rank_stops_every_rank_with_the_original_error(tmp_path):
    """The same under ``grain_fsdp``: rank 1 raises in ``training_step``; rank 0, in FSDP's backward or the
    exchange, stops with ``RankFailedError`` quoting it."""
    proc, errors = launch(tmp_path, "fsdp_raise_rank1")
    assert_every_rank_failed(proc, errors, tmp_path)
    original = "ValueError: injected failure on rank 1 at batch 1"
    assert last_line(errors[1][1]) == original
    other = last_line(errors[0][1])
    assert other.startswith("grain_lightning.distributed.faults.RankFailedError: grain_fsdp: rank 1 failed: ")
    assert original in other


@pytest.mark.slow
def test_grain_fsdp_unequal_batch_counts_raise_on_every_rank(tmp_path):
    proc, errors = launch(tmp_path, "fsdp_unequal_map")
    assert_every_rank_failed(proc, errors, tmp_path)
    for r in range(2):
        line = last_line(errors[r][1])
        assert line.startswith("grain_lightning.distributed.faults.UnequalBatchesError: grain_fsdp: the ranks have")
        assert "rank 0: 3, rank 1: 2" in line and "drop_last=True" in line


@pytest.mark.slow
def test_a_failing_rank_that_stays_alive_stops_the_others_after_fault_timeout(tmp_path):
    """Rank 1 raises and its process lives on: rank 0 stops after the (short) timeout, quoting rank 1's error.

    (Not much shorter than 15 s: the process-group timeout also bounds the start-up rendezvous, and a loaded
    machine takes seconds to start rank 1.)
    """
    timeout_s = 15.0
    proc, errors = launch(tmp_path, "raise_rank1_linger", timeout_s=timeout_s)
    assert_every_rank_failed(proc, errors, tmp_path)
    assert last_line(errors[1][1]) == "ValueError: injected failure on rank 1 at batch 1"
    other = last_line(errors[0][1])
    assert other.startswith("grain_lightning.distributed.faults.RankFailedError: grain_ddp: rank 1 failed: ")
    assert "injected failure on rank 1 at batch 1" in other
    assert errors[0][0] - errors[1][0] < timeout_s + PROMPT_S


# ---------------------------------------------------------------------- in-process: the option, the checks
def test_fault_timeout_default_is_minutes_not_half_an_hour():
    from grain_lightning import GrainDDPStrategy
    from grain_lightning.distributed.faults import DEFAULT_FAULT_TIMEOUT

    strategy = GrainDDPStrategy()
    assert strategy.fault_timeout == DEFAULT_FAULT_TIMEOUT == 300.0
    assert strategy._timeout == timedelta(seconds=300)  # the process-group timeout Lightning initialises with
    assert GrainDDPStrategy(fault_timeout=7.5)._timeout == timedelta(seconds=7.5)
    assert GrainDDPStrategy(timeout=timedelta(seconds=9)).fault_timeout == 9.0


@pytest.mark.parametrize(
    "kwargs, shown",
    [
        (dict(fault_timeout=0), "got 0"),
        (dict(fault_timeout=-5.0), "got -5.0"),
        (dict(fault_timeout=float("nan")), "got nan"),
        (dict(timeout=timedelta(seconds=0)), "got 0.0"),
        (dict(fault_timeout=5, timeout=timedelta(seconds=5)), "not both"),
    ],
)
def test_non_positive_fault_timeout_is_refused_naming_the_value(kwargs, shown):
    from grain_lightning import GrainDDPStrategy

    with pytest.raises(ValueError, match="GrainDDPStrategy: .*") as info:
        GrainDDPStrategy(**kwargs)
    assert shown in str(info.value) and ("fault_timeout" in str(info.value))


def test_fault_timeout_from_the_cli():
    from lightning.pytorch.cli import LightningCLI

    from grain_lightning import GrainDDPStrategy
    from tests.grain_lightning.distributed.test_strategy import TinyModule

    strategy = '{"class_path": "grain_lightning.GrainDDPStrategy", "init_args": {"fault_timeout": 45}}'
    cli = LightningCLI(
        TinyModule,
        run=False,
        save_config_callback=None,
        args=["--trainer.strategy", strategy, "--trainer.accelerator", "cpu", "--trainer.devices", "2"],
    )
    assert isinstance(cli.trainer.strategy, GrainDDPStrategy)
    assert cli.trainer.strategy.fault_timeout == 45 and cli.trainer.strategy._timeout == timedelta(seconds=45)


def test_end_of_data_flags_raise_only_when_the_ranks_disagree():
    from grain_lightning.distributed.faults import UnequalBatchesError, check_end_of_data, end_of_data_slots

    def summed(*ranks: tuple[bool, int]) -> torch.Tensor:
        return sum(end_of_data_slots(len(ranks), r, last, n) for r, (last, n) in enumerate(ranks))

    check_end_of_data(summed((False, 1), (False, 1), (False, 1)), 3)
    check_end_of_data(summed((True, 4), (True, 4), (True, 4)), 3)  # the last batch of everyone
    with pytest.raises(
        UnequalBatchesError, match=r"rank\(s\) \[2\].*rank 0: more than 3, rank 1: more than 3, rank 2: 3"
    ):
        check_end_of_data(summed((False, 3), (False, 3), (True, 3)), 3)
