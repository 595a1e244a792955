"""One-backward engine: exact against the reference engine (Gram and combined gradient)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from grain_lightning import ByKey, Chunks, PerSample, combine_gradients, group_gradients, min_norm_weights
from grain_lightning.ghost import GhostEngine, UnsupportedModuleError


class SeqModel(nn.Module):
    """Embedding (padding_idx) -> LayerNorm -> Linear on sequences -> mean pool -> Linear head."""

    def __init__(self, vocab=11, dim=6, classes=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=0)
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, 5)
        self.head = nn.Linear(5, classes)

    def forward(self, ids):
        h = torch.tanh(self.proj(self.norm(self.emb(ids))))  # (n, T, 5)
        return self.head(h.mean(1))


def mlp():
    return nn.Sequential(nn.Linear(7, 9), nn.Tanh(), nn.Linear(9, 9), nn.ReLU(), nn.Linear(9, 3))


def per_sample_losses(model, x, y):
    return nn.functional.cross_entropy(model(x), y, reduction="none")


def data(kind, dtype, n=12):
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (n,), generator=g)
    if kind == "seq":
        x = torch.randint(0, 11, (n, 5), generator=g)
        x[:, -1] = 0  # padding
        x[0, :] = 0  # a sample made only of padding
        return x, y
    return torch.randn(n, 7, generator=g, dtype=dtype), y


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-6), (torch.float32, 1e-4)])
@pytest.mark.parametrize("kind", ["mlp", "seq"])
@pytest.mark.parametrize("grouping", [PerSample(), Chunks(3), "label"])
@pytest.mark.parametrize("path", ["ghost", "materialize"])
def test_ghost_matches_reference(kind, dtype, rtol, grouping, path):
    torch.manual_seed(1)
    model = (mlp() if kind == "mlp" else SeqModel()).to(dtype)
    x, y = data(kind, dtype)
    assignment = ByKey(1).assign(len(y), (x, y)) if grouping == "label" else grouping.assign(len(y))
    params = [p for p in model.parameters()]
    ref = group_gradients(assignment.group_means(per_sample_losses(model, x, y)), params)
    gram_ref = ref.gram()
    engine = GhostEngine(model, linear_gram=path)
    with engine.capture():
        losses = per_sample_losses(model, x, y)
    gram = engine.backward(losses, assignment)
    scale = float(gram_ref.abs().max())
    assert (gram - gram_ref).abs().max() <= rtol * scale
    w = min_norm_weights(gram_ref)
    expected = combine_gradients(ref, w)
    for p in params:
        p.grad = None
    engine.write_gradients(w)
    for p, e in zip(params, expected):
        err = (p.grad - e).abs().max() / max(float(e.abs().max()), 1e-30)
        assert err <= rtol, (p.shape, float(err))


def test_frozen_parameters_ignored():
    model = mlp()
    model[0].weight.requires_grad_(False)
    x, y = data("mlp", torch.float64)
    model = model.double()
    a = Chunks(4).assign(len(y))
    params = [p for p in model.parameters() if p.requires_grad]
    gram_ref = group_gradients(a.group_means(per_sample_losses(model, x, y)), params).gram()
    engine = GhostEngine(model)
    with engine.capture():
        losses = per_sample_losses(model, x, y)
    assert torch.allclose(engine.backward(losses, a), gram_ref, rtol=1e-9, atol=1e-12)
    engine.write_gradients(torch.full((4,), 0.25, dtype=torch.float64))
    assert model[0].weight.grad is None and model[0].bias.grad is not None


def test_unsupported_modules_are_named():
    with pytest.raises(UnsupportedModuleError, match=r"'1' \(BatchNorm1d\)"):
        GhostEngine(nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)))
    tied = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    tied[1].weight = tied[0].weight
    with pytest.raises(UnsupportedModuleError, match="tied"):
        GhostEngine(tied)
