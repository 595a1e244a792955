"""The one-backward engine against the reference engine on one captured forward (shared by the ghost tests)."""

from __future__ import annotations

import torch

from grain_lightning import group_gradients, min_norm_weights
from grain_lightning.ghost import GhostEngine

RTOL = {torch.float64: 1e-6, torch.float32: 1e-4}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / max(float(b.double().abs().max()), 1e-30))


def compare(model, forward, assignment, rtol, engine=None, params=None):
    """Gram, combined gradient and group gradients of the engine vs the reference on one forward."""
    engine = engine or GhostEngine(model)
    params = params if params is not None else [p for p in model.parameters() if p.requires_grad]
    with engine.capture():
        losses = forward()
    ref = group_gradients(assignment.group_means(losses), params, retain_graph=True)
    gram_ref = ref.gram()
    gram = engine.backward(losses, assignment).gram()
    assert rel_err(gram, gram_ref) <= rtol, rel_err(gram, gram_ref)
    w = min_norm_weights(gram_ref)
    expected = ref.combine(w)
    for p in params:
        p.grad = None
    engine.write_gradients(w)
    for p, e, reached in zip(params, expected, ref.reached):
        if not reached:
            assert p.grad is None
            continue
        assert rel_err(p.grad, e) <= rtol, (tuple(p.shape), rel_err(p.grad, e))
    with engine.capture():
        losses = forward()
    ref = group_gradients(assignment.group_means(losses), params, retain_graph=True)
    mat = engine.group_gradients(losses, assignment)
    for g, e in zip(mat.grads, ref.grads):
        assert rel_err(g, e) <= rtol
    assert mat.reached == ref.reached
    return gram
