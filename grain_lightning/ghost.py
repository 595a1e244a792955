r"""One-backward engine: exact group Gram and combined gradient from layer activations.

For a Linear layer with input ``A_i`` (``T x d``) and output gradient ``B_i`` (``T x p``) of sample ``i``,
the per-sample weight gradient is ``g_i = B_i^T A_i`` and

    <g_i, g_j> = sum_{t,s} (A_i A_j^T)_{ts} (B_i B_j^T)_{ts}          ("ghost" inner product)

The group Gram is ``S^T K S`` (``K``: ``n x n`` sample Gram, ``S``: ``n x k`` one-hot group assignment).
One backward of ``sum_i l_i / n_{group(i)}`` gives every ``B_i`` already divided by its group size. The
backward is taken with respect to the layer *outputs* only (through an identity "tap" on each output), so
autograd's own weight-gradient GEMMs are skipped and nothing flows below the first tapped layer. The
combined gradient ``sum_j w_j g_j = sum_i w_{group(i)} B_i^T A_i`` comes from the same ``A`` and ``B``
("book-keeping"): no second backward.

Per layer and parameter ("term"), the Gram is computed in whichever form costs fewer flops:

    ghost        (n T)^2 (d + p)                      keeps A, B for the combined gradient
    materialise  n T p d + k^2 p d                    the k group gradients G_j = sum_{i in j} B_i^T A_i

and a materialised term keeps ``G`` (``k p d`` numbers) or ``A, B`` (``n T (d + p)``), whichever is smaller;
when it keeps ``A, B``, the ``G_j`` are formed in cache-sized slices of output rows and never all at once.
With ``combine="backward"`` nothing is kept: the combined gradient comes from one weighted second backward.

Rules (all exact, samples independent):

* ``Linear`` (any leading dims), ``Conv1d``/``Conv2d`` (``groups=1``, zero padding; the input is unfolded so
  that ``T`` = output positions, ``d = C_in kh kw``), and the packed projections of
  ``MultiheadAttention`` (captured while the module runs, with the sequence-first layout it uses inside).
* ``Embedding``: ``<g_i, g_j> = sum_{t,s} [id_i(t) = id_j(s)] <B_i(t), B_j(s)>`` (``padding_idx`` masked);
  materialised over the rows the batch touches when that is cheaper.
* ``LayerNorm``/``RMSNorm`` weights and every bias: per-sample vectors, materialised.
* A module called several times: its calls are concatenated along ``T`` (still exact).

What it cannot do exactly is never computed silently: ``BatchNorm`` in training mode couples samples (the
per-sample output gradients are then not per-sample gradients), parameters shared by several modules
(tied weights), ``Conv`` with ``groups > 1`` or non-zero padding modes, attention ``bias_k``/``bias_v``, and
modules of unknown type that own parameters; and, checked at every step by walking the autograd graph,
a parameter that reaches the losses other than through its own module's recorded calls. With ``unsupported="raise"`` the engine raises
:class:`UnsupportedModuleError` naming the module; with ``"fallback"`` those parameters get exact per-group
gradients from the reference engine (one extra backward per group, through the same graph) and join the
Gram, and a sample-coupling module sends *every* parameter to the reference engine.

Precision: per-term products in float32 (float64 for float64 models; bf16/fp16 activations are upcast, and
under autocast the layer input is rounded to the autocast dtype as the layer itself sees it), the Gram
summed over terms in float64.

Block-wise mode (:meth:`GhostEngine.blockwise_backward`): one min-norm solve per module, done as soon as
that module's output gradients arrive.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from grain_lightning.engine import GroupGradients, group_gradients
from grain_lightning.groups import GroupAssignment
from grain_lightning.solver import MinNormResult, solve_min_norm

__all__ = ["BlockwiseResult", "GhostEngine", "GhostGradients", "UnsupportedModuleError"]

_NORMS = (nn.LayerNorm, nn.RMSNorm)
_CONVS = (nn.Conv1d, nn.Conv2d)
_COUPLING = (nn.modules.batchnorm._BatchNorm,)
_SEQ_FIRST_PARENTS = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


class UnsupportedModuleError(TypeError):
    """A module with trainable parameters that the one-backward engine cannot handle exactly."""


def _work(t: torch.Tensor) -> torch.Tensor:
    """Half precision upcast to float32; float32/float64 unchanged."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def _as_autocast(x: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.Tensor:
    """The input as an autocast linear/conv sees it (rounded to ``dtype``), for exact per-sample gradients."""
    return x.to(dtype) if dtype is not None and x.is_floating_point() and x.dtype != torch.float64 else x


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate the calls of a layer along ``T`` (no copy for a single call)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, 1)


def _group_sum(onehot: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``(k, m)`` group sums of per-sample rows ``v`` (``(n, m)``), in ``v``'s dtype."""
    return onehot.T.to(v.dtype) @ v


class _Tap(torch.autograd.Function):
    """Identity on a layer output; its backward hands ``dL/d output`` to ``sink`` (no weight gradients)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, anchor: torch.Tensor, rule: "_Rule",
                sink: Callable[[torch.Tensor], None]) -> torch.Tensor:
        ctx.sink, ctx.ghost_rule = sink, rule
        return x.detach()  # shares storage, not an autograd view: in-place ops after the layer stay legal

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        ctx.sink(grad)
        return grad, None, None, None


# ---------------------------------------------------------------------------------------------- terms
class _Term(ABC):
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
        if self.where is None:
            return grad
        return grad.view(grad.shape[0], -1)[self.where] if isinstance(self, _MatTerm) else grad.view(-1)[self.where]


class _VecTerm(_Term):
    """Per-sample gradient vectors ``v`` (``(n, m)``): biases, norm weights."""

    def __init__(self, param, where, v: torch.Tensor) -> None:
        super().__init__(param, where)
        self.v = v

    def gram(self, onehot):
        g = _group_sum(onehot, self.v)
        return (g @ g.T).double()

    def group_grads(self, onehot):
        return _group_sum(onehot, self.v)

    def combine(self, ws, wk):
        return ws.to(self.v.dtype) @ self.v


class _MatTerm(_Term):
    """``g_i = B_i^T A_i`` with ``A``: ``(n, T, d)``, ``B``: ``(n, T, p)`` (Linear, unfolded Conv, attention)."""

    def __init__(self, param, where, a: torch.Tensor, b: torch.Tensor, mode: str, k: int) -> None:
        super().__init__(param, where)
        self.a, self.b, self.mode, self.k = a, b, mode, k
        self.g: Optional[torch.Tensor] = None
        self.store = True  # keep G or (A, B) for the combined gradient

    def _use_ghost(self) -> bool:
        n, t, d = self.a.shape
        p = self.b.shape[2]
        if self.mode != "auto":
            return self.mode == "ghost"
        return (n * t) ** 2 * (d + p) <= n * t * p * d + self.k**2 * p * d

    def gram(self, onehot):
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
        if self.store and self.k * p * d <= n * t * (d + p):  # keep the smaller of G and (A, B) for the combined gradient
            g = self.group_grads(onehot)
            flat = g.reshape(g.shape[0], -1)
            self.g, self.a, self.b = g, None, None
            return (flat @ flat.T).double()
        # G_j in slices of output rows that stay in cache (about 2 MiB each): never the whole k x p x d
        rows = max(1, 2**19 // (self.k * d))
        gram = torch.zeros(self.k, self.k, dtype=self.a.dtype, device=self.a.device)
        for start in range(0, p, rows):
            flat = self.group_grads(onehot, self.b[:, :, start:start + rows]).reshape(self.k, -1)
            gram.addmm_(flat, flat.T)
        return gram.double()

    def group_grads(self, onehot, b: Optional[torch.Tensor] = None):
        """``(k, p, d)`` group gradients (of the output columns in ``b``, default all)."""
        if self.g is not None:
            return self.g
        a, b = self.a, (self.b if b is None else b)
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

    def combine(self, ws, wk):
        if self.g is not None:
            return torch.tensordot(wk.to(self.g.dtype), self.g, dims=1)
        bw = self.b * ws.to(self.b.dtype)[:, None, None]
        return bw.reshape(-1, bw.shape[2]).T @ self.a.reshape(-1, self.a.shape[2])


class _EmbTerm(_Term):
    """Embedding weight: ``ids`` ``(n, T)``, ``B`` ``(n, T, D)`` with padding rows already zeroed."""

    def __init__(self, param, ids: torch.Tensor, b: torch.Tensor, mode: str, k: int) -> None:
        super().__init__(param, None)
        self.ids, self.b, self.mode, self.k = ids, b, mode, k

    def gram(self, onehot):
        n, t = self.ids.shape
        uniq, inv = torch.unique(self.ids, return_inverse=True)
        ghost_cost = (n * t) ** 2 * self.b.shape[2]
        mat_cost = n * t * self.b.shape[2] + self.k**2 * uniq.numel() * self.b.shape[2]
        if (self.mode == "auto" and ghost_cost <= mat_cost) or self.mode == "ghost":
            same = (self.ids[:, :, None, None] == self.ids[None, None, :, :]).to(self.b.dtype)
            kern = (same * torch.einsum("itp,jsp->itjs", self.b, self.b)).sum((1, 3))
            o = onehot.to(kern.dtype)
            return (o.T @ kern @ o).double()
        rows = self._rows(onehot, uniq, inv).reshape(self.k, -1)
        return (rows @ rows.T).double()

    def _rows(self, onehot, uniq, inv):
        """``(k, U, D)`` group gradients restricted to the ``U`` rows the batch touches."""
        n, t = self.ids.shape
        group = onehot.argmax(1)
        flat = (group[:, None] * uniq.numel() + inv).reshape(-1)
        out = self.b.new_zeros(self.k * uniq.numel(), self.b.shape[2])
        return out.index_add_(0, flat, self.b.reshape(n * t, -1)).view(self.k, uniq.numel(), -1)

    def group_grads(self, onehot):
        uniq, inv = torch.unique(self.ids, return_inverse=True)
        out = self.b.new_zeros(self.k, *self.param.shape)
        out[:, uniq] = self._rows(onehot, uniq, inv)
        return out

    def combine(self, ws, wk):
        bw = (self.b * ws.to(self.b.dtype)[:, None, None]).reshape(-1, self.b.shape[2])
        return self.b.new_zeros(self.param.shape).index_add_(0, self.ids.reshape(-1), bw)


# ---------------------------------------------------------------------------------------------- rules
@dataclass
class _Call:
    """One forward call of a layer: what its rule needs, plus the output gradient once backward delivers it."""

    inputs: Any
    info: Any = None
    grad: Optional[torch.Tensor] = None


class _Rule(ABC):
    """How one module's trainable parameters are handled; one block of the block-wise mode."""

    def __init__(self, engine: "GhostEngine", name: str, module: nn.Module) -> None:
        self.engine, self.name, self.module = engine, name, module
        self.calls: list[_Call] = []

    def counted(self, p: Optional[torch.Tensor]) -> bool:
        return p is not None and id(p) in self.engine._ghost_ids and id(p) not in self.engine._outside

    def owns(self) -> set[int]:
        """Ids of the parameters this rule's calls may use."""
        mods = self.module.modules() if isinstance(self.module, nn.MultiheadAttention) else [self.module]
        return {id(p) for m in mods for p in m.parameters(recurse=False)}

    @property
    def params(self) -> list[nn.Parameter]:
        return [p for p in self.module.parameters(recurse=False) if self.counted(p)]

    def attach(self) -> list:
        return [self.module.register_forward_hook(self._forward_hook)]

    def _forward_hook(self, module, args, output):
        if not isinstance(output, torch.Tensor) or not output.requires_grad:
            return None
        return self.record(args[0], output)

    def record(self, x: torch.Tensor, output: torch.Tensor, info: Any = None) -> torch.Tensor:
        call = _Call(self.prepare(x), info)
        self.calls.append(call)
        return _Tap.apply(output, self.engine._anchor, self, lambda g: self.engine._receive(self, call, g))

    def prepare(self, x: torch.Tensor) -> Any:
        return x.detach()

    def ready(self) -> bool:
        return all(c.grad is not None for c in self.calls)

    def samples(self, t: torch.Tensor, batch_dim: int, n: int) -> torch.Tensor:
        """``(n, T, f)`` view of a per-position tensor whose batch lives in ``batch_dim``."""
        if t.ndim < 2 or t.shape[batch_dim] != n:
            raise RuntimeError(
                f"module {self.name!r}: expected the batch of {n} samples in dim {batch_dim} of a tensor with "
                f"at least 2 dims, got shape {tuple(t.shape)} (samples must not be mixed in one row)"
            )
        return _work(t.movedim(batch_dim, 0).reshape(n, -1, t.shape[-1]))

    @abstractmethod
    def terms(self, n: int, k: int) -> list[_Term]:
        """The gradient terms of this module's calls, once their output gradients have arrived."""


class _LinearRule(_Rule):
    def __init__(self, engine, name, module, batch_dim: int) -> None:
        super().__init__(engine, name, module)
        self.batch_dim = batch_dim

    def prepare(self, x):
        return _as_autocast(x.detach(), _autocast_dtype(x.device.type))

    def terms(self, n, k):
        m = self.module
        a = _cat([self.samples(c.inputs, self.batch_dim, n) for c in self.calls])
        b = _cat([self.samples(c.grad, self.batch_dim, n) for c in self.calls])
        return _weight_bias_terms(self, m, a, b, k)


def _weight_bias_terms(rule: "_Rule", m: nn.Module, a: torch.Tensor, b: torch.Tensor, k: int) -> list["_Term"]:
    """Terms of a Linear-like layer from inputs ``a`` (n, T, d) and output gradients ``b`` (n, T, p)."""
    out: list[_Term] = []
    if rule.counted(m.weight):
        out.append(_MatTerm(m.weight, None, a.to(b.dtype), b, rule.engine.linear_gram, k))
    if rule.counted(m.bias):
        out.append(_VecTerm(m.bias, None, b.sum(1)))
    return out


class _ConvRule(_Rule):
    """Conv1d/Conv2d as a Linear on unfolded patches: ``T`` = output positions, ``d = C_in kh kw``."""

    def prepare(self, x):
        m = self.module
        x = _as_autocast(x.detach(), _autocast_dtype(x.device.type))
        if x.ndim != m.weight.ndim:
            raise RuntimeError(f"module {self.name!r}: expected a batched {m.weight.ndim}-D input, got {tuple(x.shape)}")
        if isinstance(m, nn.Conv1d):
            x = x.unsqueeze(2)
            pad = [*m._reversed_padding_repeated_twice, 0, 0]
            kernel, dil, stride = (1, *m.kernel_size), (1, *m.dilation), (1, *m.stride)
        else:
            pad, kernel, dil, stride = m._reversed_padding_repeated_twice, m.kernel_size, m.dilation, m.stride
        patches = F.unfold(F.pad(x, list(pad)), kernel, dilation=dil, stride=stride)  # (n, d, T)
        return patches.transpose(1, 2)

    def terms(self, n, k):
        m = self.module
        a = _cat([_work(c.inputs) for c in self.calls])
        b = _cat([_work(c.grad.reshape(n, c.grad.shape[1], -1).transpose(1, 2)) for c in self.calls])
        return _weight_bias_terms(self, m, a, b, k)


class _EmbeddingRule(_Rule):
    def terms(self, n, k):
        m = self.module
        if not self.counted(m.weight):
            return []
        ids = _cat([c.inputs.reshape(n, -1) for c in self.calls])
        b = _cat([_work(c.grad.reshape(n, -1, m.embedding_dim)) for c in self.calls])
        if m.padding_idx is not None:
            b = b * (ids != m.padding_idx).unsqueeze(-1).to(b.dtype)
        return [_EmbTerm(m.weight, ids, b, self.engine.linear_gram, k)]


class _NormRule(_Rule):
    """LayerNorm / RMSNorm: per-sample ``sum_pos B * xhat`` (weight) and ``sum_pos B`` (bias)."""

    def __init__(self, engine, name, module, batch_dim: int) -> None:
        super().__init__(engine, name, module)
        self.batch_dim = batch_dim

    def terms(self, n, k):
        m = self.module
        shape = tuple(m.normalized_shape)
        wv, bv = [], []
        for c in self.calls:
            x = _work(c.inputs)
            if isinstance(m, nn.LayerNorm):
                xhat = F.layer_norm(x, shape, eps=m.eps)
            else:
                xhat = F.rms_norm(x, shape, eps=m.eps if m.eps is not None else torch.finfo(c.inputs.dtype).eps)
            g = _work(c.grad).to(xhat.dtype)
            flat = lambda t: self.samples(t.reshape(*t.shape[: t.ndim - len(shape)], -1), self.batch_dim, n).sum(1)
            wv.append(flat(g * xhat))
            bv.append(flat(g))
        out: list[_Term] = []
        if self.counted(m.weight):
            out.append(_VecTerm(m.weight, None, sum(wv)))
        if self.counted(getattr(m, "bias", None)):
            out.append(_VecTerm(m.bias, None, sum(bv)))
        return out


class _AttentionRule(_Rule):
    """``nn.MultiheadAttention``: its in/out projections, captured as the ``F.linear`` calls they are.

    ``F.multi_head_attention_forward`` applies ``linear`` to sequence-first ``(L, N, E)`` inputs (in
    projection, possibly to row slices of ``in_proj_weight``) and to ``(L*N, E)`` rows (out projection).
    While the module runs, ``torch.nn.functional.linear`` is replaced by a wrapper that records the calls
    whose weight is (a view of) one of the module's projection weights and taps their outputs.
    """

    def __init__(self, engine, name, module: nn.MultiheadAttention) -> None:
        super().__init__(engine, name, module)
        m = module
        self.weights = [w for w in (m.in_proj_weight, m.q_proj_weight, m.k_proj_weight, m.v_proj_weight,
                                    m.out_proj.weight) if w is not None]
        self.biases = [b for b in (m.in_proj_bias, m.out_proj.bias) if b is not None]
        self._saved: Optional[Callable] = None
        self._batch = 0

    @property
    def params(self):
        return [p for p in self.module.parameters() if self.counted(p)]

    def attach(self):
        return [self.module.register_forward_pre_hook(self._pre, with_kwargs=True),
                self.module.register_forward_hook(self._post)]

    def _pre(self, module, args, kwargs):
        query = args[0] if args else kwargs["query"]
        if query.ndim != 3:
            raise RuntimeError(f"module {self.name!r}: the one-backward engine needs batched (3-D) attention inputs")
        self._batch = query.shape[0 if module.batch_first else 1]
        self._saved = F.linear
        original = self._saved

        def linear(x, weight, bias=None):
            out = original(x, weight, bias)
            w_slice, b_slice = self._locate(weight, self.weights), self._locate(bias, self.biases)
            if w_slice is None or not out.requires_grad:
                return out
            return self.record(x, out, (w_slice, b_slice, self._batch))

        F.linear = linear
        return None

    def _post(self, module, args, output):
        self.restore()
        return None

    def restore(self) -> None:
        if self._saved is not None:
            F.linear, self._saved = self._saved, None

    @staticmethod
    def _locate(t: Optional[torch.Tensor], params: list) -> Optional[tuple]:
        """``(param, slice)`` if ``t`` is one of ``params`` or a contiguous leading-dim slice of one."""
        if t is None:
            return None
        for p in params:
            if t is p:
                return p, None
            if t._base is p:
                start = (t.storage_offset() - p.storage_offset()) // p.stride(0)
                return p, slice(start, start + t.shape[0])
        return None

    def prepare(self, x):
        return _as_autocast(x.detach(), _autocast_dtype(x.device.type))

    def terms(self, n, k):
        out: list[_Term] = []
        groups: dict[tuple, list[_Call]] = {}
        for c in self.calls:
            (w, ws), _, _ = c.info
            groups.setdefault((id(w), None if ws is None else (ws.start, ws.stop)), []).append(c)
        for calls in groups.values():
            (w, ws), bias, batch = calls[0].info
            if batch != n:
                raise RuntimeError(f"module {self.name!r}: attention batch {batch} != {n} losses")
            rows = lambda t: t.view(-1, batch, t.shape[-1]) if t.ndim == 2 else t
            a = _cat([self.samples(rows(c.inputs), 1, n) for c in calls])
            b = _cat([self.samples(rows(c.grad), 1, n) for c in calls])
            if self.counted(w):
                out.append(_MatTerm(w, ws, a.to(b.dtype), b, self.engine.linear_gram, k))
            if bias is not None and self.counted(bias[0]):
                out.append(_VecTerm(bias[0], bias[1], b.sum(1)))
        return out


# ---------------------------------------------------------------------------------------------- engine
@dataclass
class BlockwiseResult:
    """What :meth:`GhostEngine.blockwise_backward` did: one min-norm solve per block (module)."""

    solves: dict[str, MinNormResult]
    grams: dict[str, torch.Tensor]

    def gram(self) -> torch.Tensor:
        """The global ``(k, k)`` Gram (sum of the block Grams)."""
        return sum(self.grams.values())


class GhostGradients:
    """The result of :meth:`GhostEngine.backward`: the group Gram and, on demand, the combined gradient.

    Same protocol as the reference engine's :class:`~grain_lightning.engine.GroupGradients`
    (``num_groups``, ``gram()``, ``combine(weights)``), without storing ``k`` gradients per parameter.
    """

    def __init__(self, engine: "GhostEngine", gram: torch.Tensor, k: int) -> None:
        self.engine, self._gram, self.num_groups = engine, gram, k

    def gram(self) -> torch.Tensor:
        return self._gram

    def combine(self, weights: torch.Tensor) -> list[Optional[torch.Tensor]]:
        """``sum_j w_j g_j`` for every parameter of ``engine.params`` (``None`` for unreached ones)."""
        return self.engine._combine(weights)

    def release(self) -> None:
        """Drop the activations the engine keeps for :meth:`combine`."""
        self.engine.release()


class GhostEngine:
    """Exact group Gram and combined gradient in one forward and one backward pass.

    Usage::

        engine = GhostEngine(model)                     # checks every module with trainable parameters
        with engine.capture():
            losses = loss_fn(model(x), y, reduction="none")      # (n,)
        grads = engine.backward(losses, assignment)     # GhostGradients; grads.gram(): (k, k) float64
        engine.write_gradients(weights)                 # p.grad = sum_j w_j g_j

    Args:
        module: the model.
        params: the parameters that count (default: every trainable parameter of ``module``); frozen ones
            are always ignored.
        linear_gram: ``"auto"`` (cheaper form per term), ``"ghost"`` or ``"materialize"``.
        unsupported: ``"raise"`` (:class:`UnsupportedModuleError` naming the module) or ``"fallback"``
            (reference engine for those parameters; every parameter if a module couples samples).
        combine: how the combined gradient is formed: ``"bookkeeping"`` (from the stored ``A, B`` or ``G``
            of every layer: no second backward, but that storage peaks at the end of the backward) or
            ``"backward"`` (keep the graph, store nothing, and run one weighted backward
            ``sum_i w_{group(i)} l_i / n_{group(i)}`` once the weights are known: peak memory of a plain
            step, one extra backward in time).

    Every supported layer must see the batch in dim 0 of its input (dim 1 for the layers of a
    ``TransformerEncoderLayer``/``DecoderLayer`` with ``batch_first=False``; ``MultiheadAttention`` follows
    its ``batch_first``); the shapes are checked. Parameters must be used only by their module's forward.
    """

    def __init__(self, module: nn.Module, *, params: Optional[Iterable[torch.Tensor]] = None,
                 linear_gram: str = "auto", unsupported: str = "raise", combine: str = "bookkeeping") -> None:
        if combine not in ("bookkeeping", "backward"):
            raise ValueError(f"combine must be 'bookkeeping' or 'backward', got {combine!r}")
        self.combine = combine
        if linear_gram not in ("auto", "ghost", "materialize"):
            raise ValueError(f"linear_gram must be 'auto', 'ghost' or 'materialize', got {linear_gram!r}")
        if unsupported not in ("raise", "fallback"):
            raise ValueError(f"unsupported must be 'raise' or 'fallback', got {unsupported!r}")
        self.linear_gram, self.unsupported = linear_gram, unsupported
        trainable = [p for p in module.parameters() if p.requires_grad]
        if params is not None:
            mine = {id(p) for p in trainable}
            given = [p for p in dict.fromkeys(params) if p.requires_grad]
            foreign = [tuple(p.shape) for p in given if id(p) not in mine]
            if foreign:
                raise ValueError(f"params of shapes {foreign} are not trainable parameters of the module")
            trainable = given
        #: the parameters this engine writes, in order (ghost-handled and fallback ones)
        self.params: list[nn.Parameter] = trainable
        self._named = list(module.named_parameters())
        counted = {id(p) for p in trainable}

        owners: dict[int, list[str]] = {}
        for name, sub in module.named_modules(remove_duplicate=False):
            for p in sub.parameters(recurse=False):
                if id(p) in counted:
                    owners.setdefault(id(p), []).append(name)
        tied = {i for i, names in owners.items() if len(set(names)) > 1}

        self.rules: list[_Rule] = []
        self.fallback_reasons: dict[str, str] = {}
        self.coupling: list[tuple[str, nn.Module]] = []
        fallback: set[int] = set()
        claimed: set[int] = set()
        seq_first = {id(c) for m in module.modules() if isinstance(m, _SEQ_FIRST_PARENTS) and not m.self_attn.batch_first
                     for c in m.children()}
        for name, sub in module.named_modules():
            label = f"{name or '<root>'!r} ({type(sub).__name__})"
            if isinstance(sub, _COUPLING):
                self.coupling.append((label, sub))
            if id(sub) in claimed:
                continue
            mine = [p for p in (sub.parameters() if isinstance(sub, nn.MultiheadAttention)
                                else sub.parameters(recurse=False)) if id(p) in counted]
            if isinstance(sub, nn.MultiheadAttention):
                claimed.add(id(sub.out_proj))
            if not mine:
                continue
            reason = self._why_unsupported(sub)
            if reason is None and any(id(p) in tied for p in mine):
                shared = [owners[id(p)] for p in mine if id(p) in tied][0]
                reason = f"a parameter is shared by modules {shared} (tied weights)"
            if reason is not None:
                if unsupported == "raise":
                    raise UnsupportedModuleError(
                        f"module {label}: {reason}; use unsupported='fallback' (reference engine for these "
                        "parameters) or the reference engine"
                    )
                self.fallback_reasons[label] = reason
                fallback.update(id(p) for p in mine)
                continue
            bdim = 1 if id(sub) in seq_first else 0
            if isinstance(sub, nn.Linear):
                self.rules.append(_LinearRule(self, name, sub, bdim))
            elif isinstance(sub, _CONVS):
                self.rules.append(_ConvRule(self, name, sub))
            elif isinstance(sub, nn.Embedding):
                self.rules.append(_EmbeddingRule(self, name, sub))
            elif isinstance(sub, _NORMS):
                self.rules.append(_NormRule(self, name, sub, bdim))
            else:
                self.rules.append(_AttentionRule(self, name, sub))
        self._fallback_ids = fallback
        self._ghost_ids = counted - fallback
        self._outside: set[int] = set()  # this step: parameters used outside their recorded calls
        if unsupported == "raise":
            self._check_coupling()
        self._anchor: Optional[torch.Tensor] = None
        self._listening = False
        self._captured = False
        self._terms: list[_Term] = []
        self._reached: set[int] = set()
        self._state: Optional[tuple] = None
        self._second: Optional[tuple] = None
        self._on_ready: Optional[Callable[[_Rule], None]] = None

    @staticmethod
    def _why_unsupported(m: nn.Module) -> Optional[str]:
        if isinstance(m, nn.Linear):
            return None
        if isinstance(m, _CONVS):
            if m.groups != 1:
                return f"groups={m.groups} (only groups=1 is supported)"
            if m.padding_mode != "zeros":
                return f"padding_mode={m.padding_mode!r} (only 'zeros' is supported)"
            return None
        if isinstance(m, nn.Embedding):
            if m.max_norm is not None or m.sparse:
                return "max_norm and sparse=True are not supported"
            return None
        if isinstance(m, _NORMS):
            return None
        if isinstance(m, nn.MultiheadAttention):
            if (m.bias_k is not None and m.bias_k.requires_grad) or (m.bias_v is not None and m.bias_v.requires_grad):
                return "trainable bias_k/bias_v (add_bias_kv=True) are not supported"
            return None
        return ("unsupported module type with trainable parameters (supported: Linear, Conv1d, Conv2d, Embedding, "
                "LayerNorm, RMSNorm, MultiheadAttention)")

    def _coupled(self) -> list[str]:
        return [label for label, m in self.coupling if m.training or not m.track_running_stats]

    def _check_coupling(self) -> None:
        coupled = self._coupled()
        if coupled:
            raise UnsupportedModuleError(
                f"module {coupled[0]} couples the samples of a batch (batch statistics in training mode): "
                "per-sample output gradients are not per-sample gradients; use eval mode for it, "
                "unsupported='fallback' or the reference engine"
            )

    @property
    def fully_supported(self) -> bool:
        """Whether every counted parameter is handled by the one-backward rules (no fallback, no coupling)."""
        return not self._fallback_ids and not self._coupled()

    # ------------------------------------------------------------------ capture
    def capture(self) -> "_Capture":
        """Context manager recording each layer's input and tapping its output during the forward pass."""
        return _Capture(self)

    @property
    def captured(self) -> bool:
        """Whether a forward has been captured and not yet consumed by a backward."""
        return self._captured

    def _receive(self, rule: _Rule, call: _Call, grad: torch.Tensor) -> None:
        if not self._listening:  # a fallback backward passing through the taps
            return
        call.grad = grad.detach()
        if self._on_ready is not None and rule.ready():
            self._on_ready(rule)

    # ------------------------------------------------------------------ backward
    def _begin(self, losses: torch.Tensor, assignment: GroupAssignment):
        if losses.ndim != 1:
            raise ValueError(f"expected (n,) per-sample losses, got shape {tuple(losses.shape)}")
        if not self._captured:
            raise RuntimeError("no captured forward: compute the losses inside `with engine.capture():`")
        if assignment.index.shape != losses.shape:
            raise ValueError(f"assignment of {assignment.index.shape[0]} samples for {losses.shape[0]} losses")
        n, k = losses.shape[0], assignment.num_groups
        index = assignment.index.to(losses.device)
        onehot = torch.zeros(n, k, dtype=torch.float64 if losses.dtype == torch.float64 else torch.float32,
                             device=losses.device)
        onehot[torch.arange(n, device=losses.device), index] = 1.0
        coupled = self._coupled()
        if coupled and self.unsupported == "raise":
            self._reset()
            self._check_coupling()
        self._outside = set() if coupled else self._uses_outside_layers(losses)
        if self._outside and self.unsupported == "raise":
            names = {id(p): n for n, p in self._named}
            bad = [names.get(i, "?") for i in self._outside]
            self._reset()
            raise UnsupportedModuleError(
                f"parameters {bad} reach the losses outside their module's recorded forward (used functionally, "
                "or their module was not called inside capture()); use unsupported='fallback' or the reference engine"
            )
        fb_ids = {id(p) for p in self.params} if coupled else self._fallback_ids | self._outside
        fb_params = [p for p in self.params if id(p) in fb_ids]
        fallback = None
        if fb_params:
            fallback = group_gradients(assignment.group_means(losses), fb_params, retain_graph=not coupled)
        return n, k, index, onehot, fb_params, fallback, coupled

    def _uses_outside_layers(self, losses: torch.Tensor) -> set[int]:
        """Ids of one-backward parameters whose gradient does not flow only through their own rule's taps.

        Walks the autograd graph from the losses, remembering the last tap passed; reaching a parameter's
        ``AccumulateGrad`` with no tap, or under another module's tap, means a use the rules do not see.
        """
        owned = {id(r): r.owns() for r in self.rules}
        bad: set[int] = set()
        seen: set = set()
        stack: list = [(losses.grad_fn, None)]
        while stack:
            node, rule = stack.pop()
            if node is None or (node, rule) in seen:
                continue
            seen.add((node, rule))
            var = getattr(node, "variable", None)
            if var is not None:
                if id(var) in self._ghost_ids and (rule is None or id(var) not in owned[id(rule)]):
                    bad.add(id(var))
                continue
            rule = getattr(node, "ghost_rule", rule)
            stack.extend((fn, rule) for fn, _ in node.next_functions if fn is not None)
        return bad

    def _run_backward(self, losses, assignment, index, coupled, retain: bool = False) -> None:
        if coupled or not any(rule.calls for rule in self.rules):
            return
        scale = 1.0 / assignment.counts.to(device=losses.device, dtype=losses.dtype)[index]
        self._listening = True
        try:
            torch.autograd.grad((losses * scale).sum(), [self._anchor], allow_unused=True, retain_graph=retain)
        finally:
            self._listening = False

    def _rule_terms(self, rule: _Rule, n: int, k: int) -> list[_Term]:
        if not rule.calls or not rule.ready():
            rule.calls = [c for c in rule.calls if c.grad is not None]
        terms = rule.terms(n, k) if rule.calls else []
        for call in rule.calls:  # the taps in the graph still reference their calls: let go of the tensors
            call.inputs = call.grad = None
        rule.calls = []
        self._reached.update(id(t.param) for t in terms)
        return terms

    def backward(self, losses: torch.Tensor, assignment: GroupAssignment) -> GhostGradients:
        """One backward of ``sum_i l_i / n_{group(i)}``: the ``(k, k)`` float64 group Gram.

        Each layer's Gram term is computed as soon as its output gradients arrive; the combined gradient
        is written by :meth:`write_gradients` (or returned by ``GhostGradients.combine``).
        """
        n, k, index, onehot, fb_params, fallback, coupled = self._begin(losses, assignment)
        gram = torch.zeros(k, k, dtype=torch.float64)
        terms: list[_Term] = []
        self._reached = set()

        second = self.combine == "backward" and not coupled

        def on_ready(rule: _Rule) -> None:
            nonlocal gram
            for term in self._rule_terms(rule, n, k):
                if second and isinstance(term, _MatTerm):
                    term.store = False
                gram += term.gram(onehot).cpu()
                if not second:
                    terms.append(term)

        self._on_ready = on_ready
        try:
            self._run_backward(losses, assignment, index, coupled, retain=second)
            if not coupled:
                for rule in self.rules:  # layers whose outputs got no gradient, or partly
                    if rule.calls:
                        on_ready(rule)
        finally:
            self._on_ready = None
            self._reset()
        if fallback is not None:
            gram += fallback.gram()
        self._terms = [] if coupled else terms
        self._state = (assignment, onehot, fb_params, fallback)
        self._second = (losses, self._reached) if second else None
        return GhostGradients(self, gram, k)

    def _combine(self, weights: torch.Tensor) -> list[Optional[torch.Tensor]]:
        if self._state is None:
            raise RuntimeError("call backward() before combining gradients")
        assignment, onehot, fb_params, fallback = self._state
        k = assignment.num_groups
        if weights.shape != (k,):
            raise ValueError(f"expected ({k},) weights, got shape {tuple(weights.shape)}")
        wk = weights.to(device=onehot.device, dtype=torch.float64)
        ws = wk[assignment.index.to(onehot.device)]
        if self._second is not None:  # weighted second backward: autograd's own weight gradients
            losses, reached = self._second
            self._second = None
            scale = ws.to(losses.dtype) / assignment.counts.to(device=losses.device, dtype=losses.dtype)[
                assignment.index.to(losses.device)]
            wanted = [p for p in self.params if id(p) in reached]
            grads = torch.autograd.grad((losses * scale).sum(), wanted, allow_unused=True) if wanted else []
            out = {id(p): g for p, g in zip(wanted, grads) if g is not None}
        else:
            out = self._assemble(self._terms, ws, wk, onehot)
        result: list[Optional[torch.Tensor]] = []
        fb = dict(zip(map(id, fb_params), fallback.combine(weights))) if fallback is not None else {}
        for p in self.params:
            if id(p) in fb:
                result.append(fb[id(p)])
            elif id(p) in self._reached and out.get(id(p)) is not None:
                result.append(out[id(p)].to(p.dtype))
            else:
                result.append(None)
        return result

    @staticmethod
    def _assemble(terms: list[_Term], ws, wk, onehot) -> dict[int, torch.Tensor]:
        """``sum_j w_j g_j`` per parameter id, adding up the terms (slices) of each parameter."""
        out: dict[int, torch.Tensor] = {}
        for term in terms:
            part = term.combine(ws, wk)
            grad = out.get(id(term.param))
            if grad is None and term.where is None:
                out[id(term.param)] = part.reshape(term.param.shape)
                continue
            if grad is None:
                grad = out[id(term.param)] = torch.zeros(term.param.shape, dtype=part.dtype, device=part.device)
            term.slot(grad).add_(part.reshape(term.slot(grad).shape))
        return out

    def write_gradients(self, weights: torch.Tensor) -> None:
        """Set ``p.grad = sum_j w_j g_j`` for every counted parameter (``None`` where no group reached it)."""
        for p, g in zip(self.params, self._combine(weights)):
            p.grad = g
        self.release()

    def release(self) -> None:
        """Drop the activations (or the graph) kept for the combined gradient."""
        self._terms, self._state, self._second = [], None, None

    def group_gradients(self, losses: torch.Tensor, assignment: GroupAssignment) -> GroupGradients:
        """The ``(k, *p.shape)`` group gradients of every counted parameter, from one backward.

        Same result as the reference :func:`~grain_lightning.engine.group_gradients` of
        ``assignment.group_means(losses)`` (used for gradient accumulation across micro-batches, where the
        Gram needs gradients of groups from different micro-batches).
        """
        n, k, index, onehot, fb_params, fallback, coupled = self._begin(losses, assignment)
        self._reached = set()
        try:
            self._run_backward(losses, assignment, index, coupled)
            terms = [] if coupled else [t for r in self.rules for t in self._rule_terms(r, n, k)]
        finally:
            self._reset()
        grads = {id(p): torch.zeros((k, *p.shape), dtype=p.dtype, device=p.device) for p in self.params}
        for term in terms:
            full = grads[id(term.param)]
            g = term.group_grads(onehot)
            for j in range(k):
                term.slot(full[j]).copy_(g[j].reshape(term.slot(full[j]).shape))
        fb = dict(zip(map(id, fb_params), zip(fallback.grads, fallback.reached))) if fallback is not None else {}
        out, reached = [], []
        for p in self.params:
            if id(p) in fb:
                out.append(fb[id(p)][0])
                reached.append(fb[id(p)][1])
            else:
                out.append(grads[id(p)])
                reached.append(id(p) in self._reached)
        return GroupGradients(out, reached)

    def blockwise_backward(self, losses: torch.Tensor, assignment: GroupAssignment, *,
                           tol: float = 1e-12) -> BlockwiseResult:
        r"""Block-wise GRAIN: a separate min-norm solve per module (block), written into ``.grad``.

        Block ``b`` gets ``d_b = sum_j w^b_j g^b_j`` with ``w^b = argmin_{w in simplex} w^T G_b w``. Since
        ``<d_b, g^b_j> >= ||d_b||^2`` for every block, ``<d, g_j> = sum_b <d_b, g^b_j> >= ||d||^2 >= 0`` for
        every group ``j``, as in the global solve; but ``||d||`` is at most the global min-norm step's (each
        block takes its own minimum), and ``d`` is no longer one convex combination of the ``g_j``. Each
        layer is solved and written as soon as its output gradients arrive and its activations are then
        dropped: no group gradients or Grams are kept across layers. Fallback parameters form one block.
        """
        n, k, index, onehot, fb_params, fallback, coupled = self._begin(losses, assignment)
        solves: dict[str, MinNormResult] = {}
        grams: dict[str, torch.Tensor] = {}

        def on_ready(rule: _Rule) -> None:
            terms = self._rule_terms(rule, n, k)
            if not terms:
                return
            gram = sum(t.gram(onehot).cpu() for t in terms)
            solve = solve_min_norm(gram, tol=tol)
            wk = solve.weights.to(device=onehot.device, dtype=torch.float64)
            ws = wk[index]
            grads = self._assemble(terms, ws, wk, onehot)
            for p in rule.params:
                if id(p) in grads:
                    p.grad = grads[id(p)].to(p.dtype)
            solves[rule.name], grams[rule.name] = solve, gram

        self._on_ready = on_ready
        self._reached = set()
        try:
            self._run_backward(losses, assignment, index, coupled)
            if not coupled:
                for rule in self.rules:
                    if rule.calls:
                        on_ready(rule)
        finally:
            self._on_ready = None
            self._reset()
        for p in self.params:
            if id(p) not in self._reached and id(p) not in {id(q) for q in fb_params}:
                p.grad = None
        if fallback is not None:
            gram = fallback.gram()
            solve = solve_min_norm(gram, tol=tol)
            for p, d, r in zip(fb_params, fallback.combine(solve.weights), fallback.reached):
                p.grad = d
            solves["<fallback>"], grams["<fallback>"] = solve, gram
        return BlockwiseResult(solves, grams)

    def _reset(self) -> None:
        for rule in self.rules:
            for call in rule.calls:
                call.inputs = call.grad = None
            rule.calls = []
        self._listening = False
        self._captured = False
        self._anchor = None


class _Capture:
    def __init__(self, engine: GhostEngine) -> None:
        self.engine = engine
        self.handles: list = []

    def __enter__(self) -> GhostEngine:
        eng = self.engine
        eng._reset()
        eng.release()
        eng._anchor = torch.zeros((), requires_grad=True)
        self.handles = [h for rule in eng.rules for h in rule.attach()]
        return eng

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        for rule in self.engine.rules:
            if isinstance(rule, _AttentionRule):
                rule.restore()
        self.engine._captured = exc[0] is None
