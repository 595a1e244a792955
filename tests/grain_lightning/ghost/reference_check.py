"""The one-backward engine against the reference engine on one captured forward (shared by the ghost tests)."""

from __future__ import annotations

import torch

from grain_lightning import group_gradients, min_norm_weights
from grain_lightning.ghost import GhostEngine

RTOL = {torch.float64: 1e-6, torch.float32: 1e-4}


def rel_err(a: torch.Tensor, b: torch.Tensor, floor: float = 1e-30) -> float:
    """Largest entry error relative to ``b``'s largest entry (at least ``floor``)."""
    return float((a.double() - b.double()).abs().max() / max(float(b.double().abs().max()), floor))


def scale(tensors) -> float:
    """A floor for per-parameter errors: 1e-6 of the largest entry of all of them (a parameter whose exact
    gradient is zero up to rounding, such as an attention key bias, is compared on the model's scale)."""
    return 1e-6 * max((float(t.double().abs().max()) for t in tensors if t is not None), default=1.0)


def compare(model, forward, assignment, rtol, engine=None, params=None, batch_size=None):
    """Gram, combined gradient and group gradients of the engine vs the reference on one forward."""
    engine = engine or GhostEngine(model)
    params = params if params is not None else [p for p in model.parameters() if p.requires_grad]
    with engine.capture(batch_size):
        losses = forward()
    ref = group_gradients(assignment.group_means(losses), params, retain_graph=True)
    gram_ref = ref.gram()
    gram = engine.backward(losses, assignment).gram()
    assert rel_err(gram, gram_ref) <= rtol, rel_err(gram, gram_ref)
    w = min_norm_weights(gram_ref)
    expected = ref.combine(w)
    floor = scale(expected)
    for p in params:
        p.grad = None
    engine.write_gradients(w)
    for p, e, reached in zip(params, expected, ref.reached):
        if not reached:
            assert p.grad is None
            continue
        assert rel_err(p.grad, e, floor) <= rtol, (tuple(p.shape), rel_err(p.grad, e, floor))
    with engine.capture(batch_size):
        losses = forward()
    ref = group_gradients(assignment.group_means(losses), params, retain_graph=True)
    mat = engine.group_gradients(losses, assignment)
    floor = scale(ref.grads)
    for g, e in zip(mat.grads, ref.grads):
        assert rel_err(g, e, floor) <= rtol
    assert mat.reached == ref.reached
    return gram
