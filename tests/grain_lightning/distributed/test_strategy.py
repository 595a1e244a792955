"""``grain_ddp``: two gloo processes on the CPU against single-process references.

One launch of ``ddp_worker.py`` (Lightning's popen ``ddp`` launcher re-runs it as rank 1) runs every
scenario; the tests below check its records. The data of rank ``r`` are samples ``r, r + 2, ...``, so the
references are computed here from the recorded parameters before each step with an independent autograd
pass and a brute-force min-norm solver.
"""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils import vector_to_parameters

from tests.conftest import free_port
from tests.grain_lightning.brute_force import brute_force_min_norm
from tests.grain_lightning.distributed import ddp_worker as W

ROOT = Path(__file__).resolve().parents[3]  # the repository root
SCENARIOS = [*W.SCENARIOS, "resume"]
TOL = 1e-9  # float64 model: the references agree to rounding


def launch_worker(
    out: Path, scenarios: list[str], timeout: float = 240, devices: int = 2, worker: Path | None = None
) -> subprocess.CompletedProcess:
    """Run the worker (default ``ddp_worker.py``) with a fresh free port; retry if the port was taken."""
    worker = worker or Path(__file__).with_name("ddp_worker.py")
    for _ in range(3):
        env = dict(
            os.environ,
            PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(free_port()),
            PYTHONWARNINGS="ignore",
            GRAIN_TEST_DEVICES=str(devices),
        )
        for key in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "GLOBAL_RANK"):
            env.pop(key, None)
        proc = subprocess.run(
            [sys.executable, str(worker), str(out), *scenarios],
            env=env,
            cwd=str(ROOT),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if "address already in use" not in (proc.stderr + proc.stdout).lower():
            return proc
    return proc


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    out = tmp_path_factory.mktemp("grain_ddp")
    proc = launch_worker(out, SCENARIOS)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {name: [torch.load(out / f"{name}_rank{r}.pt") for r in range(2)] for name in SCENARIOS}


# ---------------------------------------------------------------------- single-process references
def rank_batch(rank: int, step: int, batch: int = W.BATCH, world: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = W.make_data().tensors
    x, y = x[rank::world], y[rank::world]
    return x[step * batch : (step + 1) * batch], y[step * batch : (step + 1) * batch]


def grad_at(theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    net = W.make_net()
    vector_to_parameters(theta.clone(), net.parameters())
    grads = torch.autograd.grad(F.cross_entropy(net(x), y), list(net.parameters()))
    return torch.cat([g.reshape(-1) for g in grads])


def min_norm_point(rows: torch.Tensor) -> torch.Tensor:
    w, _ = brute_force_min_norm((rows @ rows.T).numpy())
    return torch.from_numpy(w) @ rows


def blockwise_min_norm_point(rows: torch.Tensor) -> torch.Tensor:
    sizes = [p.numel() for p in W.make_net().parameters()]
    return torch.cat([min_norm_point(block) for block in rows.split(sizes, dim=1)])


def rank_grads(theta: torch.Tensor, step: int) -> torch.Tensor:
    return torch.stack([grad_at(theta, *rank_batch(r, step)) for r in range(2)])


def chunk_grads(theta: torch.Tensor, rank: int, step: int) -> torch.Tensor:
    x, y = rank_batch(rank, step)
    return torch.stack([grad_at(theta, x[:4], y[:4]), grad_at(theta, x[4:], y[4:])])


def applied_direction(params: list[torch.Tensor], before: int, after: int) -> torch.Tensor:
    return (params[before] - params[after]) / W.LR


# ---------------------------------------------------------------------- tests
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sharded", "allgather", "blockwise", "sharded_buckets", "blockwise_buckets"])
def test_update_equals_single_process_grain_over_the_two_ranks_batches(records, mode):
    rec = records[mode]
    combine = blockwise_min_norm_point if mode.startswith("blockwise") else min_norm_point
    assert len(rec[0]["params"]) == 4  # before training, then three steps
    for step in range(3):
        theta = rec[0]["params"][step]
        g = rank_grads(theta, step)
        d = applied_direction(rec[0]["params"], step, step + 1)
        assert torch.allclose(d, combine(g), atol=TOL, rtol=0), (d - combine(g)).abs().max()
        assert (g @ d >= (d @ d) - 1e-9).all()  # <d, g_r> >= ||d||^2 >= 0 for both ranks' gradients
    assert rec[0]["num_combines"] == 3 and rec[0]["skipped_steps"] == 0


@pytest.mark.slow
@pytest.mark.parametrize(
    "mode",
    [
        "sharded",
        "allgather",
        "blockwise",
        "sharded_buckets",
        "accum_clip",
        "mixin_hierarchical",
        "mixin_global",
        "mixin_global_buckets",
        "nonfinite_skip",
        "resume",
    ],
)
def test_parameters_are_bit_identical_across_ranks(records, mode):
    a, b = records[mode]
    assert len(a["params"]) == len(b["params"]) > 1
    assert all(torch.equal(x, y) for x, y in zip(a["params"], b["params"]))


@pytest.mark.slow
def test_sharded_equals_allgather_and_sends_ring_allreduce_bytes(records):
    sharded, allgather = records["sharded"][0], records["allgather"][0]
    for x, y in zip(sharded["params"], allgather["params"]):
        assert torch.allclose(x, y, atol=1e-12, rtol=0)
    p = sharded["params"][0].numel()
    padded = 2 * -(-p // 2)
    ring = 2 * (2 - 1) / 2 * padded * 8  # float64 gradient, R = 2
    per_step = sharded["bytes_sent"] / 3
    assert ring < per_step <= ring + 200  # plus the 2 x 2 Gram and a few flags, all float64
    assert sharded["calls"] == {"all_to_all": 3, "all_reduce": 3, "all_gather": 3}
    buckets = records["sharded_buckets"][0]
    assert buckets["calls"] == {"all_to_all": 9, "all_reduce": 3, "all_gather": 9}  # 3 buckets per step
    assert buckets["bytes_sent"] == sharded["bytes_sent"]  # buckets of 48, 32 and 4 (3 padded to 4): 84 in all


@pytest.mark.slow
def test_accumulation_communicates_once_per_step_and_clips_the_combined_gradient(records):
    rec = records["accum_clip"][0]
    params = rec["params"]  # before, then after each of 6 micro-batches of 4: steps after micro-batches 2, 4, 6
    assert rec["num_combines"] == 3 and rec["calls"]["all_to_all"] == 3
    for step in range(3):
        assert torch.equal(params[2 * step], params[2 * step + 1])  # first micro-batch: no step
        d = min_norm_point(rank_grads(params[2 * step], step))  # 2 micro-batches of 4 = the batch of 8
        clipped = d * min(1.0, 0.05 / (float(d.norm()) + 1e-6))
        applied = applied_direction(params, 2 * step, 2 * step + 2)
        assert float(d.norm()) > 0.05  # clipping is active
        assert torch.allclose(applied, clipped, atol=TOL, rtol=0)


@pytest.mark.slow
def test_mixin_global_equals_single_process_grain_over_all_groups(records):
    for name in ("mixin_global", "mixin_global_allgather", "mixin_global_buckets"):
        params = records[name][0]["params"]
        for step in range(3):
            groups = torch.cat([chunk_grads(params[step], r, step) for r in range(2)])  # 4 groups
            d = applied_direction(params, step, step + 1)
            assert torch.allclose(d, min_norm_point(groups), atol=TOL, rtol=0)
            assert (groups @ d >= (d @ d) - 1e-9).all()  # exact: no group of any rank is pushed up


def mean_length(direction: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``direction`` rescaled to the norm of the rows' plain mean (``step_norm="mean"``)."""
    return direction * rows.mean(0).norm() / direction.norm()


@pytest.mark.slow
def test_step_norm_mean_gives_the_min_norm_direction_the_mean_length(records):
    sizes = [p.numel() for p in W.make_net().parameters()]
    for name in ("sharded_step_norm", "blockwise_step_norm", "mixin_global_step_norm"):
        params = records[name][0]["params"]
        assert len(params) == 4 and all(torch.equal(a, b) for a, b in zip(params, records[name][1]["params"]))
        for step in range(3):
            d = applied_direction(params, step, step + 1)
            if name == "mixin_global_step_norm":  # the module's policy, over the 4 groups of both ranks
                groups = torch.cat([chunk_grads(params[step], r, step) for r in range(2)])
                expected = mean_length(min_norm_point(groups), groups)
            elif name == "sharded_step_norm":
                g = rank_grads(params[step], step)
                expected = mean_length(min_norm_point(g), g)
                assert float(min_norm_point(g).norm()) < 0.999 * float(g.mean(0).norm())  # the option acts
            else:  # per block: each block's part gets the length of the mean's part in that block
                g = rank_grads(params[step], step)
                expected = torch.cat([mean_length(min_norm_point(b), b) for b in g.split(sizes, dim=1)])
            assert torch.allclose(d, expected, atol=TOL, rtol=0), (name, (d - expected).abs().max())
    metrics = records["sharded_step_norm"][0]["metrics"]
    assert metrics["grain_ddp/step_scale"] == pytest.approx(1 / metrics["grain_ddp/norm_ratio"], rel=1e-5)
    assert records["mixin_global_step_norm"][0]["metrics"]["grain_ddp/step_scale"] >= 1.0


@pytest.mark.slow
def test_mixin_global_with_accumulation_uses_every_group_of_every_micro_batch_and_rank(records):
    rec = records["mixin_global_accumulate"][0]
    params = rec["params"]  # before, then after each of 6 micro-batches of 4 (2 groups of 2 each)
    assert rec["num_combines"] == 3
    for step in range(3):
        groups = []
        for rank in range(2):
            for micro in range(2):
                x, y = rank_batch(rank, 2 * step + micro, batch=4)
                groups += [grad_at(params[2 * step], x[:2], y[:2]), grad_at(params[2 * step], x[2:], y[2:])]
        groups = torch.stack(groups)  # 8 groups
        d = applied_direction(params, 2 * step, 2 * step + 2)
        assert torch.equal(params[2 * step], params[2 * step + 1])
        assert torch.allclose(d, min_norm_point(groups), atol=TOL, rtol=0)


@pytest.mark.slow
def test_mixin_mean_aggregation_combines_the_ranks_mean_gradients(records):
    params = records["mixin_mean"][0]["params"]
    for step in range(3):
        d = applied_direction(params, step, step + 1)
        assert torch.allclose(d, min_norm_point(rank_grads(params[step], step)), atol=TOL, rtol=0)


@pytest.mark.slow
def test_mixin_hierarchical_is_min_norm_of_the_ranks_grain_directions(records):
    params = records["mixin_hierarchical"][0]["params"]
    for step in range(3):
        local = torch.stack([min_norm_point(chunk_grads(params[step], r, step)) for r in range(2)])
        d = applied_direction(params, step, step + 1)
        assert torch.allclose(d, min_norm_point(local), atol=TOL, rtol=0)
        assert (local @ d >= (d @ d) - 1e-9).all()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["nonfinite_skip", "mixin_nonfinite_skip"])
def test_nonfinite_gradient_on_one_rank_skips_the_step_on_every_rank(records, name):
    a, b = records[name]
    assert all(torch.equal(x, y) for x, y in zip(a["params"], b["params"]))
    for rec in (a, b):
        params = rec["params"]
        assert rec["skipped_steps"] == 1
        assert not torch.equal(params[0], params[1])
        assert torch.equal(params[1], params[2])  # rank 1's NaN at batch 1: nobody steps
        assert not torch.equal(params[2], params[3])
        assert torch.isfinite(params[3]).all()


@pytest.mark.slow
def test_nonfinite_gradient_raises_on_every_rank(records):
    for rec in records["nonfinite_raise"]:
        assert rec["error"] is not None and rec["error"].startswith("FloatingPointError")
        assert "rank(s) [1]" in rec["error"] and "every rank raises" in rec["error"]


@pytest.mark.slow
def test_different_parameters_across_ranks_is_a_clear_error(records):
    for rec in records["mismatch"]:
        assert rec["error"] is not None and rec["error"].startswith("ValueError")
        assert "same parameters on every rank" in rec["error"] and "rank 1" in rec["error"]


@pytest.mark.slow
def test_plain_module_fit_checkpoint_resume_equals_uninterrupted_fit(records):
    rec = records["resume"][0]
    assert len(rec["straight"]) == 7 and len(rec["params"]) == 4  # resumed: before + 3 steps of epoch 2
    assert torch.equal(rec["params"][0], rec["straight"][3])
    for x, y in zip(rec["params"], rec["straight"][3:]):
        assert torch.allclose(x, y, atol=1e-12, rtol=0)


@pytest.mark.slow
def test_three_ranks_match_the_reference_with_padded_shards(tmp_path):
    names = ["sharded", "allgather", "sharded_buckets", "blockwise_buckets"]
    proc = launch_worker(tmp_path, names, devices=3)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for name in names:
        recs = [torch.load(tmp_path / f"{name}_rank{r}.pt") for r in range(3)]
        params = recs[0]["params"]
        assert len(params) == 3  # 16 samples per rank: two steps
        assert all(torch.equal(a, b) for rec in recs[1:] for a, b in zip(params, rec["params"]))
        combine = blockwise_min_norm_point if name.startswith("blockwise") else min_norm_point
        for step in range(2):
            g = torch.stack([grad_at(params[step], *rank_batch(r, step, world=3)) for r in range(3)])
            d = applied_direction(params, step, step + 1)
            assert torch.allclose(d, combine(g), atol=TOL, rtol=0)
            assert (g @ d >= (d @ d) - 1e-9).all()
    # 83 parameters padded to 84: ring all-reduce volume 2 (R-1)/R 84 float64 per step, plus the 3 x 3 Gram
    sharded = torch.load(tmp_path / "sharded_rank0.pt")["bytes_sent"] / 2
    assert 2 * 2 / 3 * 84 * 8 < sharded <= 2 * 2 / 3 * 84 * 8 + 300


@pytest.mark.slow
def test_buffers_are_broadcast_from_rank_0_before_each_training_step(records):
    a, b = records["batch_norm"]
    assert len(a["buffers"]) == 3 and all(torch.equal(x, y) for x, y in zip(a["buffers"], b["buffers"]))
    assert not torch.equal(a["buffers"][0], a["buffers"][1])  # the statistics do move
    assert all(torch.equal(x, y) for x, y in zip(a["params"], b["params"]))


@pytest.mark.slow
def test_diagnostics_are_logged(records):
    metrics = records["sharded"][0]["metrics"]
    assert metrics["grain_ddp/weight_rank0"] + metrics["grain_ddp/weight_rank1"] == pytest.approx(1.0)
    assert metrics["grain_ddp/worst_alignment"] >= 0 and 0 < metrics["grain_ddp/norm_ratio"] <= 1 + 1e-9
    assert records["blockwise"][0]["metrics"]["grain_ddp/num_blocks"] == 4


# ---------------------------------------------------------------------- in-process: registry, CLI, one device
def test_registry_names_and_lightning_names_untouched():
    from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry

    import grain_lightning
    from grain_lightning import GrainDDPStrategy
    from grain_lightning.distributed.strategy import register_grain_ddp

    register_grain_ddp()  # a second registration (re-import) is a no-op
    expected = {
        "grain_ddp": "popen",
        "grain_ddp_spawn": "spawn",
        "grain_ddp_fork": "fork",
        "grain_ddp_notebook": "fork",
    }
    for name, start in expected.items():
        assert StrategyRegistry[name]["strategy"] is GrainDDPStrategy
        assert StrategyRegistry[name]["init_params"] == {"start_method": start}
    assert (
        StrategyRegistry["ddp"]["strategy"] is DDPStrategy and StrategyRegistry["ddp_spawn"]["strategy"] is DDPStrategy
    )
    assert grain_lightning.GrainDDPStrategy.supports_grain_mixin


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(mode="mean"), "mode must be one of"),
        (dict(on_nonfinite="ignore"), "on_nonfinite must be one of"),
        (dict(mixin_groups="all"), "mixin_groups must be one of"),
        (dict(block_size_mb=0), "block_size_mb must be > 0"),
    ],
)
def test_constructor_rejects_bad_options(bad, match):
    from grain_lightning import GrainDDPStrategy

    with pytest.raises(ValueError, match=match):
        GrainDDPStrategy(**bad)


class TinyModule(W.Plain):
    """No-argument module for LightningCLI."""

    def __init__(self, lr: float = 0.5):
        super().__init__()


@pytest.mark.parametrize(
    "args, mode",
    [
        (["--trainer.strategy", "grain_ddp"], "sharded"),
        (
            [
                "--trainer.strategy",
                '{"class_path": "grain_lightning.GrainDDPStrategy", "init_args": {"mode": "allgather"}}',
            ],
            "allgather",
        ),
    ],
)
def test_lightning_cli_accepts_grain_ddp(args, mode):
    from lightning.pytorch.cli import LightningCLI

    from grain_lightning import GrainDDPStrategy

    cli = LightningCLI(
        TinyModule,
        run=False,
        save_config_callback=None,
        args=[*args, "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.logger", "false"],
    )
    assert isinstance(cli.trainer.strategy, GrainDDPStrategy) and cli.trainer.strategy.mode == mode


def test_one_device_is_plain_training(restore_environ):
    """``devices=1``: no communication and the same parameters as Lightning's default strategy, bit for bit."""

    from grain_lightning import GrainDDPStrategy

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    runs = {}
    for name, strat in (("auto", "auto"), ("grain_ddp", GrainDDPStrategy(timeout=timedelta(seconds=30)))):
        rec = W.Recorder()
        trainer = W.make_trainer(strat, [rec], devices=1)
        trainer.fit(W.Plain(momentum=0.9), W.make_loader())
        runs[name] = (rec.params, trainer.strategy)
    assert len(runs["auto"][0]) == 7  # one rank: all 48 samples, 6 batches
    assert all(torch.equal(a, b) for a, b in zip(runs["auto"][0], runs["grain_ddp"][0]))
    assert runs["grain_ddp"][1].bytes_sent == 0
