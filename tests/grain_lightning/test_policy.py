"""The one step policy: options shared by GrainConfig and GrainDDPStrategy, solve, warm start, collapse,
non-finite handling, block-wise Grams, checkpoint state."""

from __future__ import annotations

import pytest
import torch

import grain_lightning.policy as policy_module
from grain_lightning import GrainConfig, GrainDDPStrategy, PolicyOptions, StepPolicy

BAD_OPTIONS = [
    ("on_collapse", "average", "on_collapse must be one of ('mean', 'skip', 'mix'), got 'average'"),
    ("on_nonfinite", "ignore", "on_nonfinite must be one of ('raise', 'skip'), got 'ignore'"),
    ("collapse_eps", -1.0, "collapse_eps must be >= 0, got -1.0"),
    ("collapse_mix", 1.5, "collapse_mix must be in [0, 1], got 1.5"),
    ("solver_tol", 0.0, "solver_tol must be in (0, 1), got 0.0"),
    ("log_every_n_steps", -2, "log_every_n_steps must be an int >= 0, got -2"),
]


@pytest.mark.parametrize("name, value, message", BAD_OPTIONS)
def test_mixin_and_strategy_reject_a_bad_option_with_the_same_message(name, value, message):
    for owner, build in (("GrainConfig", GrainConfig), ("GrainDDPStrategy", GrainDDPStrategy)):
        with pytest.raises(ValueError) as err:
            build(**{name: value})
        assert str(err.value) == f"{owner}: {message}"


def test_every_policy_option_is_accepted_by_both_entry_points():
    values = dict(
        on_collapse="mix",
        collapse_mix=0.25,
        collapse_eps=1e-2,
        on_nonfinite="skip",
        solver_tol=1e-10,
        warm_start=False,
        log_every_n_steps=3,
    )
    assert GrainConfig(**values).policy_options == PolicyOptions(**values)
    assert GrainDDPStrategy(**values).policy.options == PolicyOptions(**values)


def opposed_gram() -> torch.Tensor:
    """Two groups with opposite gradients: 0 is in the hull, the min-norm direction collapses."""
    g = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=torch.float64)
    return g @ g.T


@pytest.mark.parametrize("action", ["mean", "skip", "mix"])
def test_collapse_actions(action):
    policy = StepPolicy(PolicyOptions(on_collapse=action, collapse_mix=0.5))
    pi = torch.tensor([0.75, 0.25], dtype=torch.float64)
    decision = policy.decide(opposed_gram(), pi)
    assert decision.collapsed and policy.collapsed == 1
    assert torch.allclose(decision.solved, torch.tensor([0.5, 0.5], dtype=torch.float64))
    expected = {"mean": pi, "skip": None, "mix": 0.5 * torch.tensor([0.5, 0.5], dtype=torch.float64) + 0.5 * pi}[action]
    if expected is None:
        assert decision.skip and decision.weights is None
    else:
        assert torch.allclose(decision.weights, expected)


def test_no_collapse_applies_the_min_norm_weights_and_guarantee():
    g = torch.randn(5, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    gram = g @ g.T
    decision = StepPolicy().decide(gram, torch.full((5,), 0.2, dtype=torch.float64))
    assert not decision.collapsed and torch.equal(decision.weights, decision.solved)
    w = decision.weights
    assert float((gram @ w).min()) >= float(w @ gram @ w) - 1e-9 * float(torch.trace(gram))


def test_blockwise_grams_give_one_weight_vector_per_block_and_the_guarantee():
    gen = torch.Generator().manual_seed(1)
    blocks = [torch.randn(4, 6, dtype=torch.float64, generator=gen) for _ in range(3)]
    gram = torch.stack([b @ b.T for b in blocks])
    decision = StepPolicy().decide(gram, torch.full((4,), 0.25, dtype=torch.float64))
    assert decision.weights.shape == (3, 4)
    gw = torch.einsum("bij,bj->i", gram, decision.weights)  # <d, g_i>
    d2 = float(torch.einsum("bi,bij,bj->", decision.weights, gram, decision.weights))
    assert float(gw.min()) >= d2 - 1e-9 * float(gram.diagonal(dim1=1, dim2=2).sum())


def test_warm_start_only_when_the_group_keys_repeat(monkeypatch):
    seen = []
    real = policy_module.solve_min_norm

    def spy(gram, *, init=None, tol):
        seen.append(init)
        return real(gram, init=init, tol=tol)

    monkeypatch.setattr(policy_module, "solve_min_norm", spy)
    g = torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    pi = torch.full((3,), 1 / 3, dtype=torch.float64)
    keys = torch.tensor([0, 1, 2])
    policy = StepPolicy()
    first = policy.decide(g @ g.T, pi, keys=keys)
    policy.decide(g @ g.T, pi, keys=keys)
    policy.decide(g @ g.T, pi, keys=torch.tensor([0, 1, 3]))
    policy.decide(g @ g.T, pi, keys=torch.tensor([-1, -1, -1]))
    assert seen[0] is None and torch.equal(seen[1], first.solved) and seen[2] is None and seen[3] is None
    cold = StepPolicy(PolicyOptions(warm_start=False))
    cold.decide(g @ g.T, pi, keys=keys)
    cold.decide(g @ g.T, pi, keys=keys)
    assert seen[4] is None and seen[5] is None


def test_nonfinite_raises_with_the_owner_and_hint_or_warns():
    with pytest.raises(FloatingPointError, match=r"^grain_ddp: NaN loss at global step 7 \(try this\)$"):
        StepPolicy(owner="grain_ddp", nonfinite_hint="try this").nonfinite("NaN loss", 7)
    with pytest.warns(RuntimeWarning, match="GRAIN: NaN loss at global step 3: skipping this optimizer step"):
        StepPolicy(PolicyOptions(on_nonfinite="skip")).nonfinite("NaN loss", 3)


def test_state_dict_round_trip_and_logging_frequency():
    policy = StepPolicy(PolicyOptions(log_every_n_steps=2))
    g = torch.eye(3, dtype=torch.float64)
    policy.decide(g, torch.full((3,), 1 / 3, dtype=torch.float64), keys=torch.arange(3))
    assert policy.log_now  # step 0
    policy.record_step()
    assert not policy.log_now
    policy.record_skip()
    other = StepPolicy()
    other.load_state_dict(policy.state_dict())
    assert (other.steps, other.skipped, other.collapsed) == (1, 1, 0)
    assert torch.equal(other.prev_weights, policy.prev_weights) and torch.equal(other.prev_keys, torch.arange(3))
