"""``CrossRankMinNorm`` in one gloo process: plain min-norm weights by default, the step policy's decision with
``decide``; and the mixin/strategy interface types."""

from __future__ import annotations

import torch
import torch.distributed as dist

from grain_lightning import CrossRankMinNorm, GrainDDPStrategy, GrainMixin, GrainModule, GrainStrategy, StepPolicy
from grain_lightning.config import PolicyOptions
from tests.conftest import free_port


def one_rank_group() -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)


def test_default_is_the_plain_min_norm_point_even_when_zero_is_in_the_hull(restore_environ):
    """Rows g and -2g: the min-norm point of the segment is 0 (weights 2/3, 1/3), not the mean."""
    one_rank_group()
    g = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    rows = torch.stack([g, -2 * g])
    out = torch.empty(4, dtype=torch.float64)
    for mode in ("sharded", "allgather"):
        res = CrossRankMinNorm(mode).combine(rows, out)
        assert res.weights is not None and torch.allclose(
            res.weights[0], torch.tensor([2 / 3, 1 / 3], dtype=torch.float64)
        )
        assert float(out.abs().max()) < 1e-12
        assert res.decision is not None and not res.decision.collapsed and res.kkt_gap >= 0


def test_decide_gets_the_reduced_gram_and_its_decision_is_applied(restore_environ):
    one_rank_group()
    g = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    rows = torch.stack([g, -2 * g])
    out = torch.empty(4, dtype=torch.float64)
    policy = StepPolicy(PolicyOptions(on_collapse="mean"))
    pi = torch.tensor([0.5, 0.5], dtype=torch.float64)
    res = CrossRankMinNorm("sharded").combine(rows, out, decide=lambda gram, extras: policy.decide(gram, pi))
    assert res.decision.collapsed and policy.collapsed == 1
    assert torch.allclose(out, 0.5 * g + 0.5 * (-2 * g))  # the mean, as the policy decided
    skipped = CrossRankMinNorm("sharded").combine(rows, out, decide=lambda gram, extras: None)
    assert skipped.weights is None and skipped.decision is None


def test_the_mixin_and_the_strategy_satisfy_the_interface():
    class Module(GrainMixin, torch.nn.Module):
        pass

    assert isinstance(Module(), GrainModule) and not isinstance(torch.nn.Linear(2, 2), GrainModule)
    strategy = GrainDDPStrategy()
    assert isinstance(strategy, GrainStrategy)
    assert (strategy.on_collapse, strategy.solver_tol) == ("mean", 1e-12)
