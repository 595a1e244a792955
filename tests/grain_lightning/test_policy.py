"""The one step policy: options shared by GrainConfig and GrainDDPStrategy, solve, warm start, collapse,
non-finite handling, block-wise Grams, checkpoint state."""

from __future__ import annotations

import math

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
    ("step_norm", "short", "step_norm must be one of ('grain', 'mean'), got 'short'"),
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
        step_norm="mean",
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


# ---------------------------------------------------------------------- step_norm
def conflicting_gram(k: int = 5, p: int = 9, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Group gradients with a common part and conflicting parts: ||d*|| well below ||mean||."""
    gen = torch.Generator().manual_seed(seed)
    g = 0.3 * torch.randn(1, p, dtype=torch.float64, generator=gen) + torch.randn(
        k, p, dtype=torch.float64, generator=gen
    )
    pi = torch.rand(k, dtype=torch.float64, generator=gen) + 0.5
    return g, pi / pi.sum()


def test_step_norm_mean_gives_grain_direction_the_mean_length():
    g, pi = conflicting_gram()
    gram = g @ g.T
    plain = StepPolicy().decide(gram, pi)
    scaled = StepPolicy(PolicyOptions(step_norm="mean")).decide(gram, pi)
    d, d_scaled, mean = plain.weights @ g, scaled.weights @ g, pi @ g
    assert float(d.norm()) < 0.9 * float(mean.norm())  # a case where the lengths differ
    assert torch.allclose(d_scaled.norm(), mean.norm(), rtol=1e-12, atol=0)
    assert float(torch.nn.functional.cosine_similarity(d, d_scaled, dim=0)) == pytest.approx(1.0, abs=1e-12)
    assert torch.equal(scaled.solved, plain.solved)  # the solve (and the warm start) is unchanged
    assert scaled.step_scale == pytest.approx(float(mean.norm() / d.norm()), rel=1e-12)
    assert plain.step_scale is None
    assert "grain/step_scale" not in StepPolicy.diagnostics(gram, plain, pi)
    assert StepPolicy.diagnostics(gram, scaled, pi)["grain/step_scale"] == scaled.step_scale


def test_step_norm_mean_rescales_each_block():
    gen = torch.Generator().manual_seed(3)
    rows = [torch.randn(4, 6, dtype=torch.float64, generator=gen) for _ in range(3)]
    gram = torch.stack([r @ r.T for r in rows])
    pi = torch.full((4,), 0.25, dtype=torch.float64)
    decision = StepPolicy(PolicyOptions(step_norm="mean")).decide(gram, pi)
    plain = StepPolicy().decide(gram, pi)
    for b, r in enumerate(rows):
        d_b, m_b = decision.weights[b] @ r, pi @ r
        assert torch.allclose(d_b.norm(), m_b.norm(), rtol=1e-12, atol=0)
        assert float(torch.nn.functional.cosine_similarity(d_b, plain.weights[b] @ r, dim=0)) == pytest.approx(1.0)
    d2 = float(torch.einsum("bi,bij,bj->", decision.weights, gram, decision.weights))
    assert d2 == pytest.approx(float(torch.einsum("i,bij,j->", pi, gram, pi)), rel=1e-12)


@pytest.mark.parametrize("action, mix", [("mean", 0.5), ("skip", 0.5), ("mix", 0.5), ("mix", 0.0), ("mix", 1e-4)])
def test_step_norm_mean_after_a_collapse_is_finite(action, mix):
    """||d*|| = 0 (opposed groups): the collapse rule applies first; nothing is divided by zero."""
    g = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=torch.float64)
    pi = torch.tensor([0.75, 0.25], dtype=torch.float64)
    policy = StepPolicy(PolicyOptions(step_norm="mean", on_collapse=action, collapse_mix=mix))
    decision = policy.decide(g @ g.T, pi)
    assert decision.collapsed
    if action == "skip":
        assert decision.skip and decision.step_scale is None
        return
    assert torch.isfinite(decision.weights).all() and math.isfinite(decision.step_scale)
    d, mean = decision.weights @ g, pi @ g
    if action == "mean" or mix == 0.5:  # d = m, or d = m / 2 stretched to ||m||
        assert torch.allclose(d, mean, atol=1e-15) and decision.step_scale == pytest.approx(
            1.0 if action == "mean" else 2.0
        )
    else:  # d = 0 (mix 0), or ||d|| = 1e-4 ||m|| <= collapse_eps ||m||: left as it is, not stretched
        unscaled = (1 - mix) * decision.solved + mix * pi
        assert torch.equal(decision.weights, unscaled) and decision.step_scale == 1.0
    assert all(math.isfinite(v) for v in StepPolicy.diagnostics(g @ g.T, decision, pi).values())


def test_step_norm_mean_with_zero_gradients_is_finite():
    gram = torch.zeros(3, 3, dtype=torch.float64)
    decision = StepPolicy(PolicyOptions(step_norm="mean")).decide(gram, torch.full((3,), 1 / 3, dtype=torch.float64))
    assert torch.isfinite(decision.weights).all() and decision.step_scale == 1.0


def test_step_norm_mean_is_refused_with_blockwise_mixin_mode():
    with pytest.raises(ValueError, match="GrainConfig: step_norm='mean' needs blockwise=False"):
        GrainConfig(step_norm="mean", blockwise=True)
