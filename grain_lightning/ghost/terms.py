r"""Gradient terms: one parameter's (or a slice's) contribution to the group Gram and combined gradient.

A rule turns a layer's recorded calls into terms; the engine adds up every term's Gram and combined
gradient. For ``n`` samples in ``k`` groups (``onehot``: ``(n, k)``):

``VectorTerm``     per-sample vectors ``v`` (``n x m``: biases, norm weights): ``G = (S^T v)(S^T v)^T``,
                   cost ``n k m + k^2 m``.
``MatrixTerm``     ``g_i = B_i^T A_i`` with ``A``: ``(n, T, d)``, ``B``: ``(n, T, p)`` (Linear, unfolded Conv,
                   attention projections). Gram in the cheaper of the ghost form, ``(nT)^2 (d + p)`` flops,
                   and the materialised group gradients ``G_j = sum_{i in j} B_i^T A_i``, ``n T p d + k^2 p d``;
                   a materialised term keeps ``G`` (``k p d``) or ``A, B`` (``n T (d + p)``), whichever is smaller,
                   and when it keeps ``A, B`` forms ``G_j`` in cache-sized slices of output rows.
``EmbeddingTerm``  ids ``(n, T)`` and ``B`` ``(n, T, D)``: ghost form
                   ``<g_i, g_j> = sum_{t,s} [id_i(t) = id_j(s)] <B_i(t), B_j(s)>`` (``(nT)^2 D``) or the group
                   gradients over the ``U`` rows the batch touches (``n T D + k^2 U D``).

A parameter used by several modules (tied weights, e.g. GPT-2's ``wte``/``lm_head``) gets one term per use;
its per-sample gradient is the sum of the uses, so its Gram adds the cross terms ``<G^u_j, G^v_l>`` of every
pair of uses (:meth:`Term.cross`): an embedding use against any other use costs the other use's group
gradients over the ``U`` rows the batch touches (``n T U d`` for a Linear); other pairs materialise both
uses' group gradients (``k x numel`` each).

Products run in float32 (float64 for float64 models); each term's Gram is returned in float64.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Optional

import torch
from torch import nn

from grain_lightning.ghost.tensors import gram64, group_sum

__all__ = ["EmbeddingTerm", "MatrixTerm", "Term", "VectorTerm"]


class Term(ABC):
    """The gradient contribution of one parameter (or a slice of it) in the current batch."""

    def __init__(self, param: nn.Parameter, where: Optional[slice]) -> None:
        self.param, self.where = param, where

    @abstractmethod
    def gram(self, onehot: torch.Tensor) -> torch.Tensor:
        """``(k, k)`` Gram of the group gradients of this term (``onehot``: ``(n, k)`` groups)."""

    @abstractmethod
    def combine(self, ws: torch.Tensor, wk: torch.Tensor) -> torch.Tensor:
        """``sum_j w_j g_j`` (``ws``: ``(n,)`` per-sample weights, ``wk``: ``(k,)`` group weights)."""

    @abstractmethod
    def group_grads(self, onehot: torch.Tensor) -> torch.Tensor:
        """``(k, *slice shape)`` materialised group gradients."""

    def slot(self, grad: torch.Tensor) -> torch.Tensor:
        """The part of a full ``param``-shaped tensor this term writes."""
        return grad if self.where is None else grad.view(-1)[self.where]

    def overlaps(self, other: Term) -> bool:
        """Whether the two terms write common entries of the same parameter (then their Grams have cross terms)."""
        if other.param is not self.param:
            return False
        if self.where is None or other.where is None or type(self).slot is not type(other).slot:
            return True
        return self.where.start < other.where.stop and other.where.start < self.where.stop

    def dense(self, onehot: torch.Tensor) -> torch.Tensor:
        """``(k, *param.shape)`` group gradients of the whole parameter (zeros outside this term's slot)."""
        g = self.group_grads(onehot)
        k = onehot.shape[1]
        if self.where is None:
            return g.reshape(k, *self.param.shape)
        out = g.new_zeros(k, *self.param.shape)
        for j in range(k):
            self.slot(out[j]).copy_(g[j].reshape(self.slot(out[j]).shape))
        return out

    def group_rows(self, onehot: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """``(k, U, ...)`` group gradients restricted to rows ``rows`` (sorted) of the parameter."""
        return self.dense(onehot)[:, rows]

    def cross(self, other: Term, onehot: torch.Tensor) -> torch.Tensor:
        """``(k, k)`` float64 cross Gram ``C_jl = <G^self_j, G^other_l>`` of two uses of one parameter."""
        if isinstance(other, EmbeddingTerm):
            return other.cross(self, onehot).T
        k = onehot.shape[1]
        return self.dense(onehot).reshape(k, -1).double() @ other.dense(onehot).reshape(k, -1).double().T


class VectorTerm(Term):
    """Per-sample gradient vectors ``v`` (``(n, m)``): biases, norm weights."""

    def __init__(self, param: nn.Parameter, where: Optional[slice], v: torch.Tensor) -> None:
        super().__init__(param, where)
        self.v = v

    def gram(self, onehot: torch.Tensor) -> torch.Tensor:
        return gram64(group_sum(onehot, self.v)).cpu()

    def group_grads(self, onehot: torch.Tensor) -> torch.Tensor:
        return group_sum(onehot, self.v)

    def combine(self, ws: torch.Tensor, wk: torch.Tensor) -> torch.Tensor:
        return ws.to(self.v.dtype) @ self.v


class MatrixTerm(Term):
    """``g_i = B_i^T A_i`` with ``A``: ``(n, T, d)``, ``B``: ``(n, T, p)`` (Linear, unfolded Conv, attention).

    ``transposed=True``: the parameter is stored ``(d, p)`` (``y = x @ W``, as ``transformers``' ``Conv1D``);
    the Gram is the same, the gradients are transposed.
    """

    def __init__(
        self,
        param: nn.Parameter,
        where: Optional[slice],
        a: torch.Tensor,
        b: torch.Tensor,
        mode: str,
        k: int,
        transposed: bool = False,
    ) -> None:
        super().__init__(param, where)
        self.a, self.b, self.mode, self.k, self.transposed = a, b, mode, k, transposed
        self.g: Optional[torch.Tensor] = None  # (k, p, d) group gradients once materialised and kept
        self.store = True  # keep G or (A, B) for the combined gradient

    def slot(self, grad: torch.Tensor) -> torch.Tensor:
        """Rows ``where`` of the weight (e.g. the q/k/v block of a packed attention projection)."""
        return grad if self.where is None else grad.view(grad.shape[0], -1)[self.where]

    def _use_ghost(self) -> bool:
        n, t, d = self.a.shape
        p = self.b.shape[2]
        if self.mode != "auto":
            return self.mode == "ghost"
        return (n * t) ** 2 * (d + p) <= n * t * p * d + self.k**2 * p * d

    def gram(self, onehot: torch.Tensor) -> torch.Tensor:
        if self._use_ghost():
            n = self.a.shape[0]
            a, b = self.a.reshape(n, -1, self.a.shape[2]), self.b
            if a.shape[1] == 1:
                kern = (a[:, 0] @ a[:, 0].T) * (b[:, 0] @ b[:, 0].T)
            else:
                kern = (torch.einsum("itd,jsd->ijts", a, a) * torch.einsum("itp,jsp->ijts", b, b)).sum((2, 3))
            o = onehot.to(kern.dtype)
            return (o.T @ kern @ o).double()
        n, t, d = self.a.shape
        p = self.b.shape[2]
        if self.store and self.k * p * d <= n * t * (
            d + p
        ):  # keep the smaller of G and (A, B) for the combined gradient
            g = self._grads(onehot)
            self.g = g
            self.a = self.b = g.new_empty(0)  # let go of A and B
            return gram64(g.reshape(g.shape[0], -1))
        # G_j in slices of output rows that stay in cache (about 2 MiB each): never the whole k x p x d
        rows = max(1, 2**19 // (self.k * d))
        gram = torch.zeros(self.k, self.k, dtype=torch.float64, device=self.a.device)
        for start in range(0, p, rows):
            gram64(self._grads(onehot, b=self.b[:, :, start : start + rows]).reshape(self.k, -1), out=gram)
        return gram

    def group_grads(self, onehot: torch.Tensor) -> torch.Tensor:
        """``(k, *param slot shape)`` group gradients (``(k, p, d)``; ``(k, d, p)`` when transposed)."""
        g = self._grads(onehot)
        return g.transpose(1, 2) if self.transposed else g

    def group_rows(self, onehot: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        if self.where is not None:
            return super().group_rows(onehot, rows)
        if self.g is not None:
            return self.group_grads(onehot)[:, rows]
        if self.transposed:  # rows of the (d, p) parameter are input features
            return self._grads(onehot, a=self.a[:, :, rows]).transpose(1, 2)
        return self._grads(onehot, b=self.b[:, :, rows])

    def _grads(
        self, onehot: torch.Tensor, a: Optional[torch.Tensor] = None, b: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """``(k, p, d)`` group gradients (of the output columns in ``b`` / input columns in ``a``, default all)."""
        if self.g is not None and a is None and b is None:
            return self.g
        a, b = (self.a if a is None else a), (self.b if b is None else b)
        n, k = onehot.shape
        index = onehot.argmax(1)
        counts = torch.bincount(index, minlength=k)
        if bool((counts == counts[0]).all()):  # equal groups: one batched GEMM
            if not bool((index[1:] >= index[:-1]).all()):
                order = torch.argsort(index, stable=True)
                a, b = a[order], b[order]
            return torch.bmm(b.reshape(k, -1, b.shape[2]).transpose(1, 2), a.reshape(k, -1, a.shape[2]))
        out = a.new_empty(k, b.shape[2], a.shape[2])
        for j in range(k):
            idx = (index == j).nonzero().squeeze(1)
            out[j] = b[idx].reshape(-1, b.shape[2]).T @ a[idx].reshape(-1, a.shape[2])
        return out

    def combine(self, ws: torch.Tensor, wk: torch.Tensor) -> torch.Tensor:
        if self.g is not None:
            out = torch.tensordot(wk.to(self.g.dtype), self.g, dims=1)
        else:  # sum_i w_i B_i^T A_i: scale the narrower of A (n, T, d) and B (n, T, p)
            a, b = self.a, self.b
            if a.shape[2] < b.shape[2]:
                a = a * ws.to(a.dtype)[:, None, None]
            else:
                b = b * ws.to(b.dtype)[:, None, None]
            out = b.reshape(-1, b.shape[2]).T @ a.reshape(-1, a.shape[2])
        return out.T if self.transposed else out


class EmbeddingTerm(Term):
    """Embedding weight: ``ids`` ``(n, T)``, ``B`` ``(n, T, D)`` with padding rows already zeroed."""

    def __init__(self, param: nn.Parameter, ids: torch.Tensor, b: torch.Tensor, mode: str, k: int) -> None:
        super().__init__(param, None)
        self.ids, self.b, self.mode, self.k = ids, b, mode, k

    def gram(self, onehot: torch.Tensor) -> torch.Tensor:
        n, t = self.ids.shape
        uniq, inv = torch.unique(self.ids, return_inverse=True)
        ghost_cost = (n * t) ** 2 * self.b.shape[2]
        mat_cost = n * t * self.b.shape[2] + self.k**2 * uniq.numel() * self.b.shape[2]
        if (self.mode == "auto" and ghost_cost <= mat_cost) or self.mode == "ghost":
            same = (self.ids[:, :, None, None] == self.ids[None, None, :, :]).to(self.b.dtype)
            kern = (same * torch.einsum("itp,jsp->itjs", self.b, self.b)).sum((1, 3))
            o = onehot.to(kern.dtype)
            return (o.T @ kern @ o).double()
        return gram64(self._rows(onehot, uniq, inv).reshape(self.k, -1))

    def _rows(self, onehot: torch.Tensor, uniq: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
        """``(k, U, D)`` group gradients restricted to the ``U`` rows the batch touches."""
        n, t = self.ids.shape
        group = onehot.argmax(1)
        flat = (group[:, None] * uniq.numel() + inv).reshape(-1)
        out = self.b.new_zeros(self.k * uniq.numel(), self.b.shape[2])
        return out.index_add_(0, flat, self.b.reshape(n * t, -1)).view(self.k, uniq.numel(), -1)

    def group_grads(self, onehot: torch.Tensor) -> torch.Tensor:
        uniq, inv = torch.unique(self.ids, return_inverse=True)
        out = self.b.new_zeros(self.k, *self.param.shape)
        out[:, uniq] = self._rows(onehot, uniq, inv)
        return out

    def group_rows(self, onehot: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        n, t = self.ids.shape
        u = rows.numel()
        ids = self.ids.reshape(-1)
        pos = torch.searchsorted(rows, ids).clamp(max=u - 1)
        hit = rows[pos] == ids
        flat = (onehot.argmax(1).repeat_interleave(t) * u + pos)[hit]
        out = self.b.new_zeros(self.k * u, self.b.shape[2])
        return out.index_add_(0, flat, self.b.reshape(n * t, -1)[hit]).view(self.k, u, -1)

    def cross(self, other: Term, onehot: torch.Tensor) -> torch.Tensor:
        """Over the ``U`` rows this batch's ids touch (the only rows where this use's gradient is non-zero)."""
        uniq, inv = torch.unique(self.ids, return_inverse=True)
        mine = self._rows(onehot, uniq, inv).reshape(self.k, -1)
        theirs = other.group_rows(onehot, uniq).reshape(self.k, -1)
        return mine.double() @ theirs.double().T

    def combine(self, ws: torch.Tensor, wk: torch.Tensor) -> torch.Tensor:
        bw = (self.b * ws.to(self.b.dtype)[:, None, None]).reshape(-1, self.b.shape[2])
        return self.b.new_zeros(self.param.shape).index_add_(0, self.ids.reshape(-1), bw)
