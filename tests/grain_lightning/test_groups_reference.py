"""Groupings, the reference engine against closed-form per-sample gradients, and the diagnostics."""

from __future__ import annotations

import math

import pytest
import torch

from grain_lightning import (
    ByKey,
    Chunks,
    GroupAssignment,
    PerSample,
    as_grouping,
    combine_gradients,
    grain_backward,
    grain_diagnostics,
    group_gradients,
)
from tests.grain_lightning.brute_force import brute_force_min_norm

pytestmark = pytest.mark.usefixtures("float64_default")


def test_per_sample_and_chunks():
    a = PerSample().assign(5)
    assert a.index.tolist() == [0, 1, 2, 3, 4] and a.num_groups == 5
    c = Chunks(3).assign(7)  # torch.chunk sizes 3, 3, 1
    assert c.index.tolist() == [0, 0, 0, 1, 1, 1, 2] and c.counts.tolist() == [3, 3, 1]
    assert Chunks(4).assign(2).num_groups == 2  # never an empty chunk
    losses = torch.arange(7.0)
    assert torch.allclose(c.group_means(losses), torch.tensor([1.0, 4.0, 6.0]))
    assert torch.allclose(c.fractions @ c.group_means(losses), losses.mean())


def test_by_key_drops_absent_groups_and_reads_batches():
    labels = torch.tensor([7, 2, 7, 9, 2, 7])  # labels 0, 1, 3.. absent: not groups
    for batch, key in [({"y": labels}, "y"), ((None, labels), 1), (labels, lambda b: b)]:
        a = ByKey(key).assign(6, batch)
        assert a.keys.tolist() == [2, 7, 9] and a.counts.tolist() == [2, 3, 1]
        assert a.index.tolist() == [1, 0, 1, 2, 0, 1]
    with pytest.raises(KeyError, match="no key 'label'"):
        ByKey("label").assign(6, {"y": labels})
    with pytest.raises(ValueError, match=r"expected a \(5,\) key tensor"):
        ByKey("y").assign(5, {"y": labels})
    with pytest.raises(ValueError, match=r"integers .*whole-valued floats\), got 0\.5 in a torch.float"):
        GroupAssignment.from_index(torch.tensor([1.0, 0.5, 2.0]))
    with pytest.raises(ValueError, match="got nan"):
        GroupAssignment.from_index(torch.tensor([1.0, float("nan")]))
    ratings = GroupAssignment.from_index(torch.tensor([5.0, 3.0, 5.0, 1.0]))  # a regression target's 1-5 ratings
    assert ratings.keys.tolist() == [1, 3, 5] and ratings.index.tolist() == [2, 1, 2, 0]


def test_as_grouping_specs():
    assert isinstance(as_grouping("sample"), PerSample)
    assert as_grouping(4).num_chunks == 4
    assert as_grouping("key:label").key == "label" and as_grouping("key:1").key == 1
    for bad in ("samples", 0, -2, True, 1.5):
        with pytest.raises(ValueError):
            as_grouping(bad)


def _linear_setup(seed=0, n=12, d=4):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, d, generator=g), torch.randn(n, generator=g)
    model = torch.nn.Linear(d, 1)
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, d, generator=g))
        model.bias.copy_(torch.randn(1, generator=g))
    return model, x, y


def test_group_gradients_match_closed_form():
    """Per-sample squared error on a linear model: grad_i = 2 r_i [x_i, 1], r_i = w.x_i + b - y_i."""
    model, x, y = _linear_setup()
    a = Chunks(4).assign(12)
    losses = (model(x).squeeze(1) - y) ** 2
    gg = group_gradients(a.group_means(losses), list(model.parameters()))
    with torch.no_grad():
        r = model(x).squeeze(1) - y
        per_sample = 2 * r[:, None] * torch.cat([x, torch.ones(12, 1)], 1)  # (n, d+1)
        expected = torch.stack([per_sample[a.index == j].mean(0) for j in range(4)])
    got = torch.cat([gg.grads[0].reshape(4, -1), gg.grads[1].reshape(4, -1)], 1)
    assert torch.allclose(got, expected, atol=1e-12)
    assert torch.allclose(gg.gram(), expected @ expected.T, atol=1e-12)
    batched = group_gradients(a.group_means((model(x).squeeze(1) - y) ** 2), list(model.parameters()), batched=True)
    for u, v in zip(batched.grads, gg.grads):
        assert torch.allclose(u, v, atol=1e-12)


def test_grain_backward_writes_min_norm_direction_and_keeps_frozen_and_unused():
    model, x, y = _linear_setup(seed=1)
    unused = torch.nn.Parameter(torch.zeros(3))
    model.bias.requires_grad_(False)
    model.weight.grad = torch.ones_like(model.weight)  # autograd semantics: accumulate
    a = ByKey(0).assign(12, [torch.tensor([0, 1, 2] * 4)])
    losses = (model(x).squeeze(1) - y) ** 2
    res = grain_backward(a.group_means(losses), [*model.parameters(), unused], mean_weights=a.fractions)
    with torch.no_grad():
        r = model(x).squeeze(1) - y
        per_sample = 2 * r[:, None] * x
        gk = torch.stack([per_sample[a.index == j].mean(0) for j in range(3)])
    w_ref, f_ref = brute_force_min_norm((gk @ gk.T).numpy())
    d_ref = torch.from_numpy(w_ref) @ gk
    assert torch.allclose(model.weight.grad.squeeze(0), 1.0 + d_ref, atol=1e-10)
    assert model.bias.grad is None and unused.grad is None
    assert abs(res.solve.objective - f_ref) <= 1e-9 * float(torch.trace(gk @ gk.T))
    assert (gk @ d_ref >= -1e-12).all()
    assert res.diagnostics["grain/num_groups"] == 3.0


def test_combine_gradients_is_weighted_sum():
    model, x, y = _linear_setup(seed=2)
    losses = ((model(x).squeeze(1) - y) ** 2).view(3, 4).mean(1)
    gg = group_gradients(losses, list(model.parameters()))
    w = torch.tensor([0.2, 0.3, 0.5])
    out = combine_gradients(gg, w)
    assert torch.allclose(out[0], (w[:, None, None] * gg.grads[0]).sum(0))
    with pytest.raises(ValueError, match=r"\(3,\) weights"):
        combine_gradients(gg, torch.ones(2))


def test_diagnostics_hand_example():
    g = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
    gram = g @ g.T
    w = torch.tensor([0.6, 0.4])  # the min-norm weights: d = (0.2, 0.4)
    pi = torch.tensor([0.5, 0.5])  # mean m = (0, 0.5)
    diag = grain_diagnostics(gram, w, pi)
    assert diag["grain/num_groups"] == 2.0 and diag["grain/max_weight"] == pytest.approx(0.6)
    assert diag["grain/weight_entropy"] == pytest.approx(-(0.6 * math.log(0.6) + 0.4 * math.log(0.4)))
    assert diag["grain/norm_ratio"] == pytest.approx(math.sqrt(0.2 / 0.25))
    assert diag["grain/worst_alignment"] == pytest.approx(0.2 / math.sqrt(2))
    assert diag["grain/conflict_fraction"] == 0.0  # <m, g1> = 0 is not a conflict
    diag = grain_diagnostics(gram, w, torch.tensor([0.9, 0.1]))  # m = (0.8, 0.1): <m, g2> < 0
    assert diag["grain/conflict_fraction"] == 0.5
