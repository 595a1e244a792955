"""``grain_fsdp``: two and three gloo processes on the CPU against single-process references.

One launch of ``fsdp_worker.py`` runs every two-rank scenario; a second launch (three ranks) checks the padded
shards of three ranks and loads the two-rank sharded checkpoint. References are computed here from the
recorded full parameters before each step (independent autograd pass, brute-force min-norm solver).
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from torch.nn.utils import vector_to_parameters

from tests.grain_lightning.distributed import fsdp_worker as FW
from tests.grain_lightning.distributed.test_strategy import (
    TOL,
    W,
    applied_direction,
    blockwise_min_norm_point,
    chunk_grads,
    grad_at,
    launch_worker,
    mean_length,
    min_norm_point,
    rank_batch,
    rank_grads,
)

WORKER = Path(FW.__file__)
TWO_RANKS = [*FW.SCENARIOS, "resume"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("grain_fsdp")
    proc = launch_worker(out, TWO_RANKS, timeout=420, worker=WORKER)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


@pytest.fixture(scope="module")
def records(run_dir):
    return {name: [torch.load(run_dir / f"{name}_rank{r}.pt") for r in range(2)] for name in TWO_RANKS}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sharded", "blockwise", "root_only", "configure_model"])
def test_update_equals_single_process_grain_over_the_ranks_batches(records, name):
    rec = records[name][0]
    combine = blockwise_min_norm_point if name == "blockwise" else min_norm_point
    assert len(rec["params"]) == 4  # before training, then three steps
    away_from_mean = 0.0
    for step in range(3):
        g = rank_grads(rec["params"][step], step)
        d = applied_direction(rec["params"], step, step + 1)
        assert torch.allclose(d, combine(g), atol=TOL, rtol=0), (d - combine(g)).abs().max()
        assert (g @ d >= (d @ d) - 1e-9).all()  # <d, g_r> >= ||d||^2 for both ranks
        away_from_mean = max(away_from_mean, float((d - g.mean(0)).abs().max()))
    assert away_from_mean > 1e-3  # FSDP's mean would fail the comparison
    assert rec["num_combines"] == 3 and rec["skipped_steps"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sharded", "blockwise", "accum_clip", "nonfinite_skip", "gpt2", "resume"])
def test_gathered_shards_give_identical_full_parameters_on_every_rank(records, name):
    a, b = records[name]
    assert len(a["params"]) == len(b["params"]) > 1
    assert all(torch.equal(x, y) for x, y in zip(a["params"], b["params"]))


@pytest.mark.slow
def test_grain_fsdp_equals_grain_ddp(records):
    for fsdp_name, ddp_name in (("sharded", "ddp"), ("root_only", "ddp"), ("gpt2", "gpt2_ddp")):
        fsdp, ddp = records[fsdp_name][0]["params"], records[ddp_name][0]["params"]
        assert len(fsdp) == len(ddp) == 4
        for x, y in zip(fsdp, ddp):
            assert torch.allclose(x, y, atol=TOL, rtol=0), (fsdp_name, (x - y).abs().max())


@pytest.mark.slow
def test_bytes_are_a_reduce_scatter_plus_the_gram(records):
    rec = records["sharded"][0]
    # two FSDP units, Linear(6, 8) and Linear(8, 3): dim 0 padded to 2: 8*6 + 8 and 4*8 + 4 float64 numbers
    reduce_scatter = (2 - 1) / 2 * (56 + 36) * 8
    per_step = rec["bytes_sent"] / 3
    assert rec["calls"] == {"all_to_all": 6, "all_reduce": 3}
    assert reduce_scatter < per_step <= reduce_scatter + 2 * 1 / 2 * 4 * 8  # + the 2 x 2 float64 Gram
    assert "all_gather" not in records["blockwise"][0]["calls"]


@pytest.mark.slow
def test_step_norm_mean_and_diagnostics(records):
    params = records["step_norm"][0]["params"]
    for step in range(3):
        g = rank_grads(params[step], step)
        d = applied_direction(params, step, step + 1)
        assert torch.allclose(d, mean_length(min_norm_point(g), g), atol=TOL, rtol=0)
    metrics = records["sharded"][0]["metrics"]
    assert metrics["grain_fsdp/weight_rank0"] + metrics["grain_fsdp/weight_rank1"] == pytest.approx(1.0)
    assert metrics["grain_fsdp/worst_alignment"] >= 0 and 0 < metrics["grain_fsdp/norm_ratio"] <= 1 + 1e-9
    assert records["blockwise"][0]["metrics"]["grain_fsdp/num_blocks"] == 4


@pytest.mark.slow
def test_accumulation_exchanges_once_per_step_and_clips_the_combined_gradient_from_shards(records):
    rec = records["accum_clip"][0]
    params = rec["params"]  # before, then after each of 6 micro-batches of 4: steps after micro-batches 2, 4, 6
    assert rec["num_combines"] == 3 and rec["calls"]["all_to_all"] == 6  # two FSDP units per step
    for step in range(3):
        assert torch.equal(params[2 * step], params[2 * step + 1])
        d = min_norm_point(rank_grads(params[2 * step], step))
        clipped = d * min(1.0, 0.05 / (float(d.norm()) + 1e-6))
        assert float(d.norm()) > 0.05  # clipping is active
        assert torch.allclose(applied_direction(params, 2 * step, 2 * step + 2), clipped, atol=TOL, rtol=0)


@pytest.mark.slow
def test_nonfinite_gradient_skips_or_raises_on_every_rank(records):
    for rec in records["nonfinite_skip"]:
        params = rec["params"]
        assert rec["skipped_steps"] == 1
        assert torch.equal(params[1], params[2]) and not torch.equal(params[2], params[3])
        assert torch.isfinite(params[3]).all()
    for rec in records["nonfinite_raise"]:
        assert rec["error"] is not None and rec["error"].startswith("FloatingPointError")
        assert "rank(s) [1]" in rec["error"] and "every rank raises" in rec["error"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mixin", "mixin_root"])
def test_grain_mixin_is_min_norm_of_the_ranks_grain_directions_and_equals_grain_ddp(records, name):
    """Hierarchical: each rank's GRAIN direction over its two chunks, then the min-norm over the ranks; the same
    parameters as grain_ddp's hierarchical mixin (each Linear an FSDP unit, or the whole net one unit)."""
    a, b = records[name]
    params, ddp = a["params"], records["mixin_ddp"][0]["params"]
    assert a["error"] is None and len(params) == len(ddp) == 4
    assert all(torch.equal(x, y) for x, y in zip(params, b["params"]))
    for step in range(3):
        local = torch.stack([min_norm_point(chunk_grads(params[step], r, step)) for r in range(2)])
        d = applied_direction(params, step, step + 1)
        assert torch.allclose(d, min_norm_point(local), atol=TOL, rtol=0), (d - min_norm_point(local)).abs().max()
        assert (local @ d >= (d @ d) - 1e-9).all()
        assert torch.allclose(params[step + 1], ddp[step + 1], atol=TOL, rtol=0)
    assert a["num_combines"] == 3 and a["calls"]["all_reduce"] == 3  # one exchange per step, no gathering


@pytest.mark.slow
def test_grain_mixin_blockwise_across_ranks_without_resharding_after_forward(records):
    """``mode="blockwise"`` over the ranks' GRAIN directions, FSDP's parameters kept unsharded after the forward."""
    params = records["mixin_blockwise"][0]["params"]
    for step in range(3):
        local = torch.stack([min_norm_point(chunk_grads(params[step], r, step)) for r in range(2)])
        d = applied_direction(params, step, step + 1)
        assert torch.allclose(d, blockwise_min_norm_point(local), atol=TOL, rtol=0)


@pytest.mark.slow
def test_grain_mixin_mean_aggregation_and_nonfinite_loss_on_one_rank(records):
    params = records["mixin_mean"][0]["params"]
    for step in range(3):
        d = applied_direction(params, step, step + 1)
        assert torch.allclose(d, min_norm_point(rank_grads(params[step], step)), atol=TOL, rtol=0)
    a, b = records["mixin_nonfinite_skip"]
    assert all(torch.equal(x, y) for x, y in zip(a["params"], b["params"]))
    params = a["params"]
    assert a["skipped_steps"] == 1 and torch.equal(params[1], params[2])  # rank 1's NaN at batch 1: nobody steps
    assert not torch.equal(params[2], params[3]) and torch.isfinite(params[3]).all()


def module_blocks_min_norm_point(rows: torch.Tensor) -> torch.Tensor:
    """Single-process block-wise GRAIN (``GrainConfig(blockwise=True)``): one min-norm problem per module of the
    net, i.e. per Linear layer (its weight and bias together)."""
    sizes = [sum(p.numel() for p in m.parameters()) for m in W.make_net() if any(True for _ in m.parameters())]
    return torch.cat([min_norm_point(block) for block in rows.split(sizes, dim=1)])


@pytest.mark.slow
@pytest.mark.parametrize(
    "name", ["mixin_module_blocks", "mixin_module_blocks_by_parameter", "mixin_module_blocks_global"]
)
def test_grain_mixin_blockwise_equals_single_process_blockwise_and_grain_ddp(records, name):
    """``GrainConfig(blockwise=True)``, every group exchanged as shards, one min-norm problem per module:
    hierarchical (each rank's block-wise GRAIN over its two chunks, then the min-norm over the ranks' directions,
    as a whole or, ``mode="blockwise"`` with the net one FSDP unit, per parameter: grain_ddp's steps for the
    former) and global (single-process block-wise GRAIN over the 4 chunks of both ranks)."""
    a, b = records[name]
    params = a["params"]
    assert a["error"] is None and len(params) == 4 and a["num_combines"] == 3
    assert all(torch.equal(x, y) for x, y in zip(params, b["params"]))
    ddp = records["mixin_module_blocks_ddp"][0]["params"]
    for step in range(3):
        chunks = [chunk_grads(params[step], r, step) for r in range(2)]
        if name == "mixin_module_blocks_global":
            groups = torch.cat(chunks)
            expected = module_blocks_min_norm_point(groups)
            assert (groups @ expected >= (expected @ expected) - 1e-9).all()
            assert not torch.allclose(expected, min_norm_point(groups), atol=1e-3)  # not the one-block solve
        else:
            local = torch.stack([module_blocks_min_norm_point(c) for c in chunks])
            combine = blockwise_min_norm_point if name.endswith("by_parameter") else min_norm_point
            expected = combine(local)
        d = applied_direction(params, step, step + 1)
        assert torch.allclose(d, expected, atol=TOL, rtol=0), (d - expected).abs().max()
        if name == "mixin_module_blocks":
            assert torch.allclose(params[step + 1], ddp[step + 1], atol=TOL, rtol=0)
    assert a["metrics"].get("grain/blocks", 2.0) == 2.0  # the two Linear layers
    refused = records["mixin_module_blocks_global_ddp_refused"]
    assert all("mixin_groups='hierarchical'" in rec["error"] and "grain_fsdp" in rec["error"] for rec in refused)


@pytest.mark.slow
def test_grain_mixin_global_groups_equal_single_process_grain_and_grain_ddp(records):
    """``mixin_groups="global"``: one backward per group, each group's gradient exchanged as shards; the min-norm
    over the 4 chunk gradients of both ranks (exact), and grain_ddp's global groups."""
    a, b = records["mixin_global"]
    params, ddp = a["params"], records["mixin_global_ddp"][0]["params"]
    assert a["error"] is None and len(params) == len(ddp) == 4
    assert all(torch.equal(x, y) for x, y in zip(params, b["params"]))
    for step in range(3):
        groups = torch.cat([chunk_grads(params[step], r, step) for r in range(2)])
        d = applied_direction(params, step, step + 1)
        assert torch.allclose(d, min_norm_point(groups), atol=TOL, rtol=0), (d - min_norm_point(groups)).abs().max()
        assert (groups @ d >= (d @ d) - 1e-9).all()
        assert torch.allclose(params[step + 1], ddp[step + 1], atol=TOL, rtol=0)
    # per step: one count all-gather, two backwards x two FSDP units of all-to-all, one Gram all-reduce
    assert a["calls"] == {"all_gather": 3, "all_to_all": 12, "all_reduce": 3}


def micro_batch_groups(theta: torch.Tensor, rank: int, step: int) -> torch.Tensor:
    """The 4 groups of one accumulated step of a rank: two micro-batches of 4, two chunks of 2 each."""
    rows = []
    for micro in range(2):
        x, y = rank_batch(rank, 2 * step + micro, batch=4)
        rows += [grad_at(theta, x[:2], y[:2]), grad_at(theta, x[2:], y[2:])]
    return torch.stack(rows)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mixin_global_accumulate", "mixin_accumulate", "mixin_mean_accumulate"])
def test_grain_mixin_accumulation_uses_every_group_of_every_micro_batch(records, name):
    """GrainConfig(accumulate_grad_batches=2): global (min-norm over the 8 groups of both ranks), hierarchical
    (each rank's GRAIN over its 4 groups, then the min-norm over the ranks), mean (the ranks' mean gradients)."""
    a, b = records[name]
    params = a["params"]  # before, then after each of 6 micro-batches: steps after micro-batches 2, 4, 6
    assert a["error"] is None and a["num_combines"] == 3
    assert all(torch.equal(x, y) for x, y in zip(params, b["params"]))
    for step in range(3):
        theta = params[2 * step]
        groups = [micro_batch_groups(theta, r, step) for r in range(2)]
        if name == "mixin_global_accumulate":
            expected = min_norm_point(torch.cat(groups))
        elif name == "mixin_accumulate":
            expected = min_norm_point(torch.stack([min_norm_point(g) for g in groups]))
        else:
            expected = min_norm_point(torch.stack([g.mean(0) for g in groups]))
        assert torch.equal(params[2 * step], params[2 * step + 1])
        d = applied_direction(params, 2 * step, 2 * step + 2)
        assert torch.allclose(d, expected, atol=TOL, rtol=0), (d - expected).abs().max()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mixin_reference", "mixin_self_check"])
def test_grain_mixin_reference_engine_and_self_check_equal_grain_ddp(records, name):
    """``engine="reference"`` (one backward per group) and ``self_check="first"`` (step 0 by groups, its Gram
    compared with the one-backward engine's; steps 1-2 one weighted backward): grain_ddp's hierarchical steps."""
    a, b = records[name]
    params, ddp = a["params"], records["mixin_ddp"][0]["params"]
    assert a["error"] is None and len(params) == len(ddp) == 4
    assert all(torch.equal(x, y) for x, y in zip(params, b["params"]))
    for step in range(3):
        local = torch.stack([min_norm_point(chunk_grads(params[step], r, step)) for r in range(2)])
        assert torch.allclose(applied_direction(params, step, step + 1), min_norm_point(local), atol=TOL, rtol=0)
        assert torch.allclose(params[step + 1], ddp[step + 1], atol=TOL, rtol=0)
    if name == "mixin_self_check":  # the group exchange on the checked step only: 2 groups + 2 single steps
        assert 0 <= a["metrics"]["grain/self_check_error"] < 1e-12
        assert a["calls"]["all_to_all"] == 2 * 2 + 2 * 2 and a["calls"]["all_gather"] == 1


@pytest.mark.slow
def test_tiny_gpt2_with_per_sample_groups_equals_grain_ddp(records):
    """Per-sample groups on a random-config GPT-2 (tied embeddings, FSDP units per block): the one-backward
    Gram with FSDP's unsharded parameters and the weighted backward reduced to shards give grain_ddp's steps."""
    fsdp, ddp = records["gpt2_mixin"], records["gpt2_mixin_ddp"][0]["params"]
    params = fsdp[0]["params"]
    assert fsdp[0]["error"] is None and len(params) == len(ddp) == 4
    assert all(torch.equal(x, y) for x, y in zip(params, fsdp[1]["params"]))
    for x, y in zip(params, ddp):
        assert torch.allclose(x, y, atol=TOL, rtol=0), (x - y).abs().max()
    assert not torch.allclose(params[0], params[1])


@pytest.mark.slow
def test_tiny_gpt2_first_step_equals_single_process_grain(records):
    params = records["gpt2"][0]["params"]
    model = FW.gpt2_model()
    data = FW.gpt2_data().tensors[0]
    rows = []
    for rank in range(2):
        vector_to_parameters(params[0].clone(), model.parameters())
        model.zero_grad()
        ids = data[rank::2][:4]
        model(input_ids=ids, labels=ids).loss.backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    g = torch.stack(rows)
    d = applied_direction(params, 0, 1)
    assert torch.allclose(d, min_norm_point(g), atol=TOL, rtol=0)
    assert records["gpt2"][0]["num_combines"] == 3


@pytest.mark.slow
def test_sharded_checkpoint_resume_equals_uninterrupted_fit(records):
    rec = records["resume"][0]
    assert len(rec["straight"]) == 7 and len(rec["params"]) == 4  # resumed: before + 3 steps of epoch 2
    assert torch.equal(rec["params"][0], rec["straight"][3])
    for x, y in zip(rec["params"], rec["straight"][3:]):
        assert torch.allclose(x, y, atol=1e-12, rtol=0)
    assert rec["num_combines"] == 3 and rec["policy_steps"] == 6  # the step policy's state came back too


@pytest.mark.slow
def test_three_ranks_match_the_reference_global_groups_and_load_the_two_rank_checkpoint(run_dir, tmp_path):
    os.environ["GRAIN_TEST_CKPT"] = str(run_dir / "final.ckpt")
    try:
        proc = launch_worker(
            tmp_path, ["sharded", "blockwise", "mixin_global", "load"], devices=3, timeout=300, worker=WORKER
        )
    finally:
        os.environ.pop("GRAIN_TEST_CKPT")
    assert proc.returncode == 0, proc.stderr[-4000:]
    for name in ("sharded", "blockwise"):
        recs = [torch.load(tmp_path / f"{name}_rank{r}.pt") for r in range(3)]
        params = recs[0]["params"]
        assert len(params) == 3  # 16 samples per rank: two steps
        assert all(torch.equal(a, b) for rec in recs[1:] for a, b in zip(params, rec["params"]))
        combine = blockwise_min_norm_point if name == "blockwise" else min_norm_point
        for step in range(2):
            g = torch.stack([grad_at(params[step], *rank_batch(r, step, world=3)) for r in range(3)])
            d = applied_direction(params, step, step + 1)
            assert torch.allclose(d, combine(g), atol=TOL, rtol=0)
            assert (g @ d >= (d @ d) - 1e-9).all()
    recs = [torch.load(tmp_path / f"mixin_global_rank{r}.pt") for r in range(3)]
    params = recs[0]["params"]
    assert recs[0]["error"] is None and len(params) == 3
    assert all(torch.equal(a, b) for rec in recs[1:] for a, b in zip(params, rec["params"]))
    for step in range(2):  # global groups: the min-norm over the 6 chunks of the 3 ranks
        chunks = []
        for r in range(3):
            x, y = rank_batch(r, step, world=3)
            chunks += [grad_at(params[step], x[:4], y[:4]), grad_at(params[step], x[4:], y[4:])]
        groups = torch.stack(chunks)
        d = applied_direction(params, step, step + 1)
        assert torch.allclose(d, min_norm_point(groups), atol=TOL, rtol=0)
        assert (groups @ d >= (d @ d) - 1e-9).all()
    saved = torch.load(run_dir / "resume_rank0.pt")["straight"][-1]  # 2 ranks, after two epochs
    loaded = [torch.load(tmp_path / f"load_rank{r}.pt")["params"] for r in range(3)]
    assert all(torch.equal(rec[0], saved) for rec in loaded)  # resharded 2 -> 3 ranks, bit for bit
    assert len(loaded[0]) == 3 and torch.isfinite(loaded[0][-1]).all()  # and it trains on (momentum loaded)


# ---------------------------------------------------------------------- in-process: registry, options
def test_registry_and_cli_name():
    from lightning.pytorch.cli import LightningCLI
    from lightning.pytorch.strategies import StrategyRegistry

    from grain_lightning import GrainFSDPStrategy
    from grain_lightning.distributed.fsdp import register_grain_fsdp

    register_grain_fsdp()  # a second registration is a no-op
    assert StrategyRegistry["grain_fsdp"]["strategy"] is GrainFSDPStrategy
    cli = LightningCLI(
        W.Plain,
        run=False,
        save_config_callback=None,
        args=["--trainer.strategy", "grain_fsdp", "--trainer.accelerator", "cpu", "--trainer.devices", "2"],
    )
    assert isinstance(cli.trainer.strategy, GrainFSDPStrategy) and cli.trainer.strategy.mode == "sharded"


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(mode="allgather"), "gathers every rank's full gradient"),
        (dict(mode="mean"), "mode must be one of"),
        (dict(on_nonfinite="ignore"), "on_nonfinite must be one of"),
        (dict(wrap=[3]), "wrap must name module classes"),
        (dict(mixin_groups="local"), "mixin_groups must be one of"),
    ],
)
def test_constructor_rejects_bad_options(bad, match):
    from grain_lightning import GrainFSDPStrategy

    with pytest.raises(ValueError, match=match):
        GrainFSDPStrategy(timeout=timedelta(seconds=5), **bad)


def test_one_device_is_plain_training(restore_environ):
    """``devices=1``: FSDP over one rank, no exchange, the same parameters as Lightning's default strategy."""
    from grain_lightning import GrainFSDPStrategy
    from tests.conftest import free_port

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    runs = {}
    for name, strat in (("auto", "auto"), ("grain_fsdp", GrainFSDPStrategy(timeout=timedelta(seconds=30)))):
        rec = FW.Recorder()
        trainer = W.make_trainer(strat, [rec], devices=1)
        trainer.fit(W.Plain(momentum=0.9), W.make_loader())
        runs[name] = (rec.params, trainer.strategy)
    assert len(runs["auto"][0]) == 7  # one rank: all 48 samples, 6 batches
    for a, b in zip(runs["auto"][0], runs["grain_fsdp"][0]):
        assert torch.allclose(a, b, atol=1e-12, rtol=0)
    assert runs["grain_fsdp"][1].bytes_sent == 0 and runs["grain_fsdp"][1].num_combines == 0


def test_one_device_self_check_catches_a_wrong_engine_gram(restore_environ, monkeypatch):
    """``devices=1``: a self-checked step exchanges its groups one backward each; an engine Gram off by 1% raises
    SelfCheckError naming the rank and the alternative; with the engine intact, the steps equal the single-process
    mixin's reference engine."""
    from grain_lightning import GrainFSDPStrategy
    from grain_lightning.ghost.engine import GhostGradients
    from grain_lightning.ghost.self_check import SelfCheckError
    from tests.conftest import free_port

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    runs = {}
    for name, strat, kw in (
        ("auto", "auto", dict(engine="reference")),
        ("grain_fsdp", GrainFSDPStrategy(timeout=timedelta(seconds=30)), dict(self_check=1)),
    ):
        rec = FW.Recorder()
        W.make_trainer(strat, [rec], devices=1, max_steps=2).fit(FW.Mixin(**kw), W.make_loader())
        runs[name] = rec.params
    for a, b in zip(runs["auto"], runs["grain_fsdp"]):
        assert torch.allclose(a, b, atol=1e-12, rtol=0)
    gram = GhostGradients.gram
    monkeypatch.setattr(GhostGradients, "gram", lambda self: gram(self) * 1.01)
    trainer = W.make_trainer(GrainFSDPStrategy(timeout=timedelta(seconds=30)), [], devices=1, max_steps=1)
    with pytest.raises(SelfCheckError, match=r"rank\(s\) \[0\].*engine='reference'"):
        trainer.fit(FW.Mixin(self_check="first"), W.make_loader())


def test_one_device_grain_mixin_equals_the_single_process_mixin(restore_environ):
    """``devices=1``: the mixin's weighted backward through FSDP gives the single-process GRAIN steps; a module
    that only the generic rule could handle is refused by name (FSDP shards what that rule needs whole)."""
    from grain_lightning import GrainFSDPStrategy
    from grain_lightning.ghost import GhostEngine, UnsupportedModuleError
    from tests.conftest import free_port

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    runs = {}
    for name, strat in (("auto", "auto"), ("grain_fsdp", GrainFSDPStrategy(timeout=timedelta(seconds=30)))):
        rec = FW.Recorder()
        trainer = W.make_trainer(strat, [rec], devices=1, max_steps=2)
        module = FW.Mixin()
        trainer.fit(module, W.make_loader())
        runs[name] = rec.params
    assert len(runs["auto"]) == 3
    for a, b in zip(runs["auto"], runs["grain_fsdp"]):
        assert torch.allclose(a, b, atol=1e-12, rtol=0)

    class Scale(torch.nn.Module):  # no registered rule: the generic torch.func rule would run it
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(3))

        def forward(self, x):
            return x * self.weight

    from torch.distributed.fsdp import fully_shard

    net = torch.nn.Sequential(torch.nn.Linear(3, 3), Scale())
    fully_shard(net[1], mesh=module.device_mesh)
    fully_shard(net[0], mesh=module.device_mesh)
    assert type(net[0]).__name__ == "FSDPLinear"
    with pytest.raises(UnsupportedModuleError, match=r"'1' \(FSDPScale\): FSDP shards its parameters"):
        GhostEngine(net)
    GhostEngine(torch.nn.Sequential(net[0]))  # FSDPLinear: the Linear rule, FSDP's own pre-hook ignored


def test_one_device_blockwise_mixin_equals_the_single_process_blockwise_engine(restore_environ):
    """``devices=1``, ``GrainConfig(blockwise=True)``: the groups exchanged one backward each and solved module by
    module from the shards give the single-process engine's block-wise steps (``GhostEngine.blockwise_backward``)."""
    from grain_lightning import GrainFSDPStrategy
    from tests.conftest import free_port

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    runs = {}
    for name, strat in (
        ("auto", "auto"),
        ("grain_fsdp", GrainFSDPStrategy(wrap="Linear", timeout=timedelta(seconds=30))),
    ):
        rec = FW.Recorder()
        W.make_trainer(strat, [rec], devices=1, max_steps=2).fit(FW.Mixin(blockwise=True), W.make_loader())
        runs[name] = rec.params
    assert len(runs["auto"]) == 3
    for a, b in zip(runs["auto"], runs["grain_fsdp"]):
        assert torch.allclose(a, b, atol=1e-12, rtol=0)
    single = FW.Recorder()  # not the one-block solve
    W.make_trainer("auto", [single], devices=1, max_steps=2).fit(FW.Mixin(), W.make_loader())
    assert not torch.allclose(single.params[1], runs["auto"][1], atol=1e-6)
