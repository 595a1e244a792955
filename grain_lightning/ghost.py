r"""One-backward engine (first part of the ghost/book-keeping engine): exact group Gram and combined
gradient from layer activations, for Linear, Embedding and LayerNorm layers.

For a Linear layer with input ``A_i`` (``T x d``) and output gradient ``B_i`` (``T x p``) of sample ``i``,
the per-sample weight gradient is ``B_i^T A_i`` and

    <g_i, g_j> = sum_{t,s} (A_i A_j^T)_{ts} (B_i B_j^T)_{ts}          ("ghost" inner product)

The group Gram is ``S^T K S`` (``S``: ``n x k`` group assignment). One backward of
``sum_i l_i / n_{group(i)}`` gives every ``B_i`` already divided by its group size, taken with
``torch.autograd.grad`` with respect to the layer *outputs* only, so autograd's own weight-gradient
GEMMs are skipped. The combined gradient ``sum_j w_j g_j = sum_i w_{group(i)} B_i^T A_i`` comes from the
same stored ``A`` and ``B`` ("book-keeping"). Per layer, the Gram term is computed in the ghost form or by
materialising the ``k`` group gradients, whichever costs fewer flops:
ghost ``(nT)^2 (d + p)`` vs materialised ``nT p d + k^2 p d``.

Embedding: ``<g_i, g_j> = sum_{t,s} [id_i(t) = id_j(s)] <B_i(t), B_j(s)>`` (``padding_idx`` rows masked).
LayerNorm and biases: their per-sample gradients are small vectors, materialised per group.

Samples must not interact (no BatchNorm): the per-sample output gradients are then exact.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from grain_lightning.groups import GroupAssignment

__all__ = ["GhostEngine", "UnsupportedModuleError"]

_SUPPORTED = (nn.Linear, nn.Embedding, nn.LayerNorm)


class UnsupportedModuleError(TypeError):
    """A module with trainable parameters that the one-backward engine cannot handle exactly."""


def _trainable(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters(recurse=False) if p.requires_grad]


class GhostEngine:
    """Exact group Gram and combined gradient in one forward and one backward pass.

    Usage::

        engine = GhostEngine(model)                 # checks every module with trainable parameters
        with engine.capture():
            losses = loss_fn(model(x), y, reduction="none")      # (n,)
        gram = engine.backward(losses, assignment)  # (k, k) float64
        engine.write_gradients(weights)             # .grad = sum_j w_j g_j

    Args:
        module: the model. Every submodule that owns trainable parameters must be a Linear, Embedding
            or LayerNorm; otherwise :class:`UnsupportedModuleError` names it. Shared (tied) parameters
            are rejected too.
        linear_gram: ``"auto"`` (cheaper of the two per layer), ``"ghost"`` or ``"materialize"``.
    """

    def __init__(self, module: nn.Module, *, linear_gram: str = "auto") -> None:
        if linear_gram not in ("auto", "ghost", "materialize"):
            raise ValueError(f"linear_gram must be 'auto', 'ghost' or 'materialize', got {linear_gram!r}")
        self.linear_gram = linear_gram
        self.layers: list[nn.Module] = []
        seen: dict[int, str] = {}
        for name, sub in module.named_modules():
            params = _trainable(sub)
            if not params:
                continue
            if not isinstance(sub, _SUPPORTED):
                raise UnsupportedModuleError(
                    f"module {name or type(module).__name__!r} ({type(sub).__name__}) has trainable parameters but "
                    f"the one-backward engine supports only {[c.__name__ for c in _SUPPORTED]}; use the reference engine"
                )
            if isinstance(sub, nn.Embedding) and (sub.max_norm is not None or sub.sparse):
                raise UnsupportedModuleError(f"embedding {name!r}: max_norm and sparse=True are not supported")
            for p in params:
                if id(p) in seen:
                    raise UnsupportedModuleError(f"parameter shared by {seen[id(p)]!r} and {name!r} (tied weights)")
                seen[id(p)] = name
            self.layers.append(sub)
        self._inputs: dict[nn.Module, torch.Tensor] = {}
        self._outputs: dict[nn.Module, torch.Tensor] = {}
        self._grads: dict[nn.Module, torch.Tensor] = {}
        self._weights_per_sample: Optional[torch.Tensor] = None
        self._assignment: Optional[GroupAssignment] = None

    # ------------------------------------------------------------------ capture
    def capture(self) -> "_Capture":
        """Context manager recording each layer's input and output during the forward pass."""
        return _Capture(self)

    def _hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if module in self._outputs:
            raise UnsupportedModuleError(f"{type(module).__name__} called twice in one forward (weight sharing)")
        self._inputs[module] = args[0].detach()
        self._outputs[module] = output

    # ------------------------------------------------------------------ backward
    def backward(self, losses: torch.Tensor, assignment: GroupAssignment) -> torch.Tensor:
        """One backward of ``sum_i l_i / n_{group(i)}``; returns the ``(k, k)`` float64 group Gram."""
        if losses.ndim != 1:
            raise ValueError(f"expected (n,) per-sample losses, got shape {tuple(losses.shape)}")
        missing = [type(m).__name__ for m in self.layers if m not in self._outputs]
        if missing:
            raise RuntimeError(f"layers not called in the captured forward: {missing}")
        index = assignment.index.to(losses.device)
        scale = 1.0 / assignment.counts.to(device=losses.device, dtype=losses.dtype)[index]
        outs = [self._outputs[m] for m in self.layers]
        grads = torch.autograd.grad((losses * scale).sum(), outs, allow_unused=True)
        self._grads = {m: (torch.zeros_like(o) if g is None else g.detach()) for m, o, g in zip(self.layers, outs, grads)}
        self._outputs.clear()
        self._assignment = assignment
        k, n = assignment.num_groups, losses.shape[0]
        onehot = torch.zeros(n, k, dtype=torch.float64, device=losses.device)
        onehot[torch.arange(n, device=losses.device), index] = 1.0
        gram = torch.zeros(k, k, dtype=torch.float64)
        for m in self.layers:
            gram += self._layer_gram(m, onehot).cpu()
        return gram

    def _seq(self, t: torch.Tensor, n: int) -> torch.Tensor:
        """View as (n, T, features), in at least float32."""
        t = t.reshape(n, -1, t.shape[-1]) if t.ndim >= 2 else t.reshape(n, 1, 1)
        return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t

    def _layer_gram(self, m: nn.Module, onehot: torch.Tensor) -> torch.Tensor:
        n, k = onehot.shape
        b = self._grads[m]
        if isinstance(m, nn.Embedding):
            ids = self._inputs[m].reshape(n, -1)
            bb = self._seq(b, n)
            if m.padding_idx is not None:
                bb = bb * (ids != m.padding_idx).unsqueeze(-1)
            same = (ids[:, :, None, None] == ids[None, None, :, :]).to(bb.dtype)  # (n, T, n, T)
            inner = torch.einsum("itp,jsp->itjs", bb, bb)
            kern = (same * inner).sum((1, 3)).double()
            return onehot.T @ kern @ onehot
        a = self._seq(self._inputs[m], n)
        bb = self._seq(b, n)
        total = torch.zeros(k, k, dtype=torch.float64, device=onehot.device)
        if isinstance(m, nn.LayerNorm):
            xhat = F.layer_norm(self._inputs[m].float() if self._inputs[m].dtype != torch.float64 else self._inputs[m],
                                m.normalized_shape, eps=m.eps)
            parts = []
            if m.weight is not None and m.weight.requires_grad:
                parts.append((b.to(xhat.dtype) * xhat).reshape(n, -1, *m.normalized_shape).sum(1).reshape(n, -1))
            if m.bias is not None and m.bias.requires_grad:
                parts.append(b.to(xhat.dtype).reshape(n, -1, *m.normalized_shape).sum(1).reshape(n, -1))
            for per_sample in parts:
                group = onehot.T.to(per_sample.dtype) @ per_sample
                total += (group @ group.T).double()
            return total
        # Linear
        t, d, p = a.shape[1], a.shape[2], bb.shape[2]
        if m.weight.requires_grad:
            ghost_cost = (n * t) ** 2 * (d + p)
            mat_cost = n * t * p * d + k * k * p * d
            use_ghost = ghost_cost <= mat_cost if self.linear_gram == "auto" else self.linear_gram == "ghost"
            if use_ghost:
                aa = torch.einsum("itd,jsd->ijts", a, a)
                gg = torch.einsum("itp,jsp->ijts", bb, bb)
                kern = (aa * gg).sum((2, 3)).double()
                total += onehot.T @ kern @ onehot
            else:
                flat = self._group_weight_grads(a, bb, onehot).reshape(k, -1)
                total += (flat @ flat.T).double()
        if m.bias is not None and m.bias.requires_grad:
            group = onehot.T.to(bb.dtype) @ bb.sum(1)
            total += (group @ group.T).double()
        return total

    @staticmethod
    def _group_weight_grads(a: torch.Tensor, b: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
        """``(k, p, d)``: ``sum_{i in j} B_i^T A_i`` for every group ``j``."""
        k = onehot.shape[1]
        out = []
        for j in range(k):
            idx = onehot[:, j].nonzero().squeeze(1)
            out.append(b[idx].reshape(-1, b.shape[-1]).T @ a[idx].reshape(-1, a.shape[-1]))
        return torch.stack(out)

    # ------------------------------------------------------------------ combined gradient
    def write_gradients(self, weights: torch.Tensor) -> None:
        """Set ``p.grad = sum_j w_j g_j`` for every trainable parameter, from the stored activations."""
        if self._assignment is None:
            raise RuntimeError("call backward() before write_gradients()")
        assignment = self._assignment
        if weights.shape != (assignment.num_groups,):
            raise ValueError(f"expected ({assignment.num_groups},) weights, got shape {tuple(weights.shape)}")
        for m in self.layers:
            b = self._grads[m]
            n = assignment.index.shape[0]
            ws = weights.to(device=b.device, dtype=torch.float64)[assignment.index.to(b.device)]  # (n,)
            bw = (self._seq(b, n).double() * ws[:, None, None])
            if isinstance(m, nn.Embedding):
                ids = self._inputs[m].reshape(-1)
                flat = bw.reshape(-1, bw.shape[-1])
                if m.padding_idx is not None:
                    flat = flat * (ids != m.padding_idx).unsqueeze(1)
                grad = torch.zeros(m.weight.shape, dtype=torch.float64, device=b.device).index_add_(0, ids, flat)
                m.weight.grad = grad.to(m.weight.dtype)
                continue
            if isinstance(m, nn.LayerNorm):
                x = self._inputs[m]
                xhat = F.layer_norm(x.double(), m.normalized_shape, eps=m.eps)
                bfull = bw.reshape(b.shape)
                lead = tuple(range(b.ndim - len(m.normalized_shape)))
                if m.weight is not None and m.weight.requires_grad:
                    m.weight.grad = (bfull * xhat).sum(lead).to(m.weight.dtype)
                if m.bias is not None and m.bias.requires_grad:
                    m.bias.grad = bfull.sum(lead).to(m.bias.dtype)
                continue
            a = self._seq(self._inputs[m], n).double()
            if m.weight.requires_grad:
                m.weight.grad = (bw.reshape(-1, bw.shape[-1]).T @ a.reshape(-1, a.shape[-1])).to(m.weight.dtype)
            if m.bias is not None and m.bias.requires_grad:
                m.bias.grad = bw.sum((0, 1)).to(m.bias.dtype)
        self._inputs.clear()
        self._grads.clear()
        self._assignment = None


class _Capture:
    def __init__(self, engine: GhostEngine) -> None:
        self.engine = engine
        self.handles: list = []

    def __enter__(self) -> GhostEngine:
        self.engine._inputs.clear()
        self.engine._outputs.clear()
        self.handles = [m.register_forward_hook(self.engine._hook) for m in self.engine.layers]
        return self.engine

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

