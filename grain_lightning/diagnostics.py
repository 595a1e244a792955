r"""Diagnostics of a GRAIN step, computed from the ``k x k`` Gram alone (no extra pass over the model).

With ``G_ij = <g_i, g_j>``, min-norm weights ``w``, and plain-mean weights ``pi`` (``n_j / n``)::

    d = J^T w,  m = J^T pi,  ||d||^2 = w^T G w,  ||m||^2 = pi^T G pi,  <d, g_j> = (G w)_j,  <m, g_j> = (G pi)_j

With one weight vector per block ``b`` (block-wise GRAIN, Grams ``G_b``), ``d = concat_b J_b^T w_b``:
``||d||^2 = sum_b w_b^T G_b w_b`` and ``<d, g_j> = sum_b (G_b w_b)_j`` (:func:`blockwise_diagnostics`).

Keys (prefix ``grain/``):
    num_groups        k
    max_weight        max_j w_j
    weight_entropy    -sum_j w_j log w_j  (log k for uniform weights, 0 for one group)
    norm_ratio        ||d|| / ||m||  (1 for one group; 0 when d collapses)
    worst_alignment   min_j <d, g_j> / ||g_j||  over groups with g_j != 0 (>= 0 by construction)
    conflict_fraction fraction of groups with <m, g_j> < 0: groups the plain mean would push up
    kkt_gap           (w^T G w - min_j (G w)_j) / trace(G), solver accuracy

:func:`log_diagnostics` records them on GRAIN's own schedule (the caller's ``log_every_n_steps``): in the
trainer's ``callback_metrics`` and, at once, in every attached logger, whatever the Trainer's
``log_every_n_steps`` (which would otherwise hold step metrics back, 50 steps by default).
"""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["blockwise_diagnostics", "grain_diagnostics", "log_diagnostics"]


def grain_diagnostics(gram: torch.Tensor, weights: torch.Tensor, mean_weights: torch.Tensor) -> dict[str, float]:
    """Diagnostics dict (see module docstring) from ``(k, k)`` Gram, ``(k,)`` weights and mean weights."""
    g = gram.detach().double().cpu()
    w = weights.detach().double().cpu()
    pi = mean_weights.detach().double().cpu()
    k = g.shape[0]
    gw, gpi = g @ w, g @ pi
    d2, m2 = float(w @ gw), float(pi @ gpi)
    norms = torch.sqrt(torch.clamp(torch.diagonal(g), min=0.0))
    nz = norms > 0
    pos = w[w > 0]
    trace = float(torch.trace(g))
    return {
        "grain/num_groups": float(k),
        "grain/max_weight": float(w.max()),
        "grain/weight_entropy": float(-(pos * pos.log()).sum()),
        "grain/norm_ratio": math.sqrt(max(d2, 0.0) / m2) if m2 > 0 else 0.0,
        "grain/worst_alignment": float((gw[nz] / norms[nz]).min()) if nz.any() else 0.0,
        "grain/conflict_fraction": float((gpi < 0).double().mean()),
        "grain/kkt_gap": max(d2 - float(gw.min()), 0.0) / trace if trace > 0 else 0.0,
    }


def blockwise_diagnostics(gram: torch.Tensor, weights: torch.Tensor, mean_weights: torch.Tensor) -> dict[str, float]:
    r"""Diagnostics of a combination with one weight vector per block, from ``(B, K, K)`` Grams.

    ``d = concat_b J_b^T w_b``: ``||d||^2 = sum_b w_b^T G_b w_b``, ``<d, g_i> = sum_b (G_b w_b)_i``; the mean
    ``m = J^T pi`` uses the same ``pi`` in every block. Keys as :func:`grain_lightning.grain_diagnostics`
    (``max_weight`` and ``weight_entropy`` of the block-averaged weights, weighted by block trace).
    """
    g = gram.double().cpu()
    w = weights.double().cpu()
    pi = mean_weights.double().cpu()
    gw = torch.einsum("bij,bj->bi", g, w).sum(0)
    d2 = float(torch.einsum("bi,bij,bj->", w, g, w))
    total = g.sum(0)
    gpi = total @ pi
    m2 = float(pi @ gpi)
    norms = torch.sqrt(torch.clamp(torch.diagonal(total), min=0.0))
    nz = norms > 0
    traces = torch.diagonal(g, dim1=1, dim2=2).sum(1)
    avg = (traces[:, None] * w).sum(0) / traces.sum() if float(traces.sum()) > 0 else w.mean(0)
    pos = avg[avg > 0]
    return {
        "grain/num_groups": float(g.shape[1]),
        "grain/num_blocks": float(g.shape[0]),
        "grain/max_weight": float(avg.max()),
        "grain/weight_entropy": float(-(pos * pos.log()).sum()),
        "grain/norm_ratio": math.sqrt(max(d2, 0.0) / m2) if m2 > 0 else 0.0,
        "grain/worst_alignment": float((gw[nz] / norms[nz]).min()) if nz.any() else 0.0,
        "grain/conflict_fraction": float((gpi < 0).double().mean()),
    }


def log_diagnostics(module: Any, metrics: dict[str, float]) -> None:
    """Record ``metrics`` of the current training step now: GRAIN decides when (its ``log_every_n_steps``).

    ``module`` is the LightningModule. The values go into ``trainer.callback_metrics`` (``module.log_dict``
    with ``logger=False``: Lightning itself never writes them, so no metric is written twice at a step) and
    straight to every logger in ``module.loggers`` at the step Lightning logs the batch's other step metrics
    (the fit loop's count of batches that stepped, ``trainer.global_step`` if that is unknown); they are
    also added to ``trainer.logged_metrics``. Call it at most once per key and training batch.
    """
    if not metrics:
        return
    module.log_dict(metrics, on_step=True, on_epoch=False, logger=False, batch_size=1)
    loggers = list(module.loggers)
    if not loggers:
        return
    trainer = module.trainer
    step = getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", trainer.global_step)
    for logger in loggers:
        logger.log_metrics(dict(metrics), step=step)
    trainer.logged_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})
