r"""Reference engine: exact group gradients with torch.autograd, their Gram, and the combined gradient.

For ``k`` group losses ``L_1..L_k`` and trainable parameters ``theta`` (``P`` numbers in all)::

    J    = [grad L_1; ...; grad L_k]              (k x P, stored per parameter as (k, *p.shape))
    G    = J J^T                                  (k x k, accumulated in float64)
    d    = J^T w                                  (combine_gradients, for weights w from the step policy)

Cost: ``k`` backward passes through the graph (or one vmapped backward with ``batched=True``) and
``k x P`` stored gradient entries. It works for any module; faster engines are tested against it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Optional

import torch

__all__ = ["GroupGradients", "combine_gradients", "group_gradients", "trainable_parameters"]


@dataclass
class GroupGradients:
    """Per-group gradients of a list of parameters.

    Attributes:
        grads: one ``(k, *p.shape)`` tensor per parameter (zeros where a group does not reach ``p``).
        reached: per parameter, whether any group's loss depends on it (autograd leaves ``.grad`` of the
            others as ``None``, and so do we, so that optimizers skip them as in plain training).
    """

    grads: list[torch.Tensor]
    reached: list[bool]

    @property
    def num_groups(self) -> int:
        return int(self.grads[0].shape[0]) if self.grads else 0

    def gram(self) -> torch.Tensor:
        """``(k, k)`` float64 Gram matrix ``G_ij = <g_i, g_j>``, accumulated parameter by parameter."""
        k = self.num_groups
        gram = torch.zeros(k, k, dtype=torch.float64)
        for g in self.grads:
            flat = g.reshape(k, -1).double()
            gram += (flat @ flat.T).cpu()
        return gram

    def combine(self, weights: torch.Tensor) -> list[Optional[torch.Tensor]]:
        """``sum_j w_j g_j`` per parameter; see :func:`combine_gradients`."""
        return combine_gradients(self, weights)

    def cat(self, other: GroupGradients) -> GroupGradients:
        """Stack the groups of ``other`` after this one's (same parameters)."""
        if len(other.grads) != len(self.grads):
            raise ValueError(f"cannot stack gradients of {len(other.grads)} parameters onto {len(self.grads)}")
        return GroupGradients(
            [torch.cat([a, b], 0) for a, b in zip(self.grads, other.grads)],
            [a or b for a, b in zip(self.reached, other.reached)],
        )


def trainable_parameters(params: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """Unique parameters with ``requires_grad``, in first-seen order."""
    seen: set[int] = set()
    out = []
    for p in params:
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def group_gradients(
    group_losses: torch.Tensor,
    params: Sequence[torch.Tensor],
    *,
    retain_graph: bool = False,
    batched: bool = False,
) -> GroupGradients:
    """Exact gradient of each of the ``(k,)`` ``group_losses`` with respect to ``params``.

    Args:
        group_losses: ``(k,)`` scalar losses sharing one graph.
        params: parameters to differentiate (all must require grad).
        retain_graph: keep the graph after the last backward.
        batched: one vmapped backward (``is_grads_batched``) instead of ``k`` backward passes; not every
            operator supports it.
    """
    if group_losses.ndim != 1 or group_losses.numel() == 0:
        raise ValueError(f"group_losses must be a non-empty (k,) tensor, got shape {tuple(group_losses.shape)}")
    if not group_losses.requires_grad or group_losses.grad_fn is None:
        raise ValueError(
            f"the group losses of shape {tuple(group_losses.shape)} have no autograd graph (computed under "
            "torch.no_grad(), detached, or from parameters that do not require grad)"
        )
    params = list(params)
    if not params:
        raise ValueError("no trainable parameters to differentiate")
    k = group_losses.shape[0]
    if batched:
        eye = torch.eye(k, dtype=group_losses.dtype, device=group_losses.device)
        gs = torch.autograd.grad(
            group_losses, params, grad_outputs=eye, is_grads_batched=True, allow_unused=True, retain_graph=retain_graph
        )
        return GroupGradients(
            [
                torch.zeros((k, *p.shape), dtype=p.dtype, device=p.device) if g is None else g
                for g, p in zip(gs, params)
            ],
            [g is not None for g in gs],
        )
    out = [torch.zeros((k, *p.shape), dtype=p.dtype, device=p.device) for p in params]
    reached = [False] * len(params)
    for j in range(k):
        gs = torch.autograd.grad(group_losses[j], params, allow_unused=True, retain_graph=retain_graph or j < k - 1)
        for i, g in enumerate(gs):
            if g is not None:
                _check_dense(g, params[i])
                out[i][j] = g
                reached[i] = True
    return GroupGradients(out, reached)


def _check_dense(g: torch.Tensor, p: torch.Tensor) -> None:
    if g.layout != torch.strided:
        raise ValueError(
            f"the parameter of shape {tuple(p.shape)} got a {g.layout} gradient (e.g. nn.Embedding(sparse=True)); "
            "GRAIN combines dense gradients: use sparse=False"
        )


def combine_gradients(grads: GroupGradients, weights: torch.Tensor) -> list[Optional[torch.Tensor]]:
    """``sum_j w_j g_j`` per parameter in its dtype (summed in float64), ``None`` for unreached ones."""
    k = grads.num_groups
    if weights.shape != (k,):
        raise ValueError(f"expected ({k},) weights, got shape {tuple(weights.shape)}")
    out: list[Optional[torch.Tensor]] = []
    for g, reached in zip(grads.grads, grads.reached):
        w = weights.to(device=g.device, dtype=torch.float64)
        out.append(torch.tensordot(w, g.double(), dims=1).to(g.dtype) if reached else None)
    return out
