r"""``nn.MultiheadAttention``: its in/out projections, captured as the ``F.linear`` calls they are.

Each projection is a Linear term (cost as :mod:`~grain_lightning.ghost.rules.linear`), row slices of the
packed ``in_proj_weight`` each their own term. Trainable ``bias_k``/``bias_v`` are refused.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from grain_lightning.ghost.registry import register_rule
from grain_lightning.ghost.rules.base import GhostRule, RecordedCall, RuleHost
from grain_lightning.ghost.tensors import as_autocast, autocast_dtype
from grain_lightning.ghost.terms import MatrixTerm, Term, VectorTerm

__all__ = ["AttentionRule"]


@register_rule(nn.MultiheadAttention)
class AttentionRule(GhostRule):
    """``nn.MultiheadAttention``: its in/out projections, captured as the ``F.linear`` calls they are.

    ``F.multi_head_attention_forward`` applies ``linear`` to sequence-first ``(L, N, E)`` inputs (in
    projection, possibly to row slices of ``in_proj_weight``) and to ``(L*N, E)`` rows (out projection).
    While the module runs, ``torch.nn.functional.linear`` is replaced by a wrapper that records the calls
    whose weight is (a view of) one of the module's projection weights and taps their outputs.
    """

    def __init__(self, engine: RuleHost, name: str, module: nn.Module, batch_dim: int = 0) -> None:
        super().__init__(engine, name, module, batch_dim)
        m = module
        assert isinstance(m, nn.MultiheadAttention)
        self.weights = [
            w
            for w in (m.in_proj_weight, m.q_proj_weight, m.k_proj_weight, m.v_proj_weight, m.out_proj.weight)
            if w is not None
        ]
        self.biases = [b for b in (m.in_proj_bias, m.out_proj.bias) if b is not None]
        self._saved: Optional[Callable] = None
        self._batch = 0

    @classmethod
    def why_unsupported(cls, module: nn.Module) -> Optional[str]:
        assert isinstance(module, nn.MultiheadAttention)
        if any(b is not None and b.requires_grad for b in (module.bias_k, module.bias_v)):
            return "trainable bias_k/bias_v (add_bias_kv=True) are not supported"
        return None

    @classmethod
    def own_parameters(cls, module: nn.Module) -> list[nn.Parameter]:
        return list(module.parameters())

    @classmethod
    def claimed_children(cls, module: nn.Module) -> list[nn.Module]:
        return list(module.children())

    def attach(self) -> list[Any]:
        return [
            self.module.register_forward_pre_hook(self._pre, with_kwargs=True),
            self.module.register_forward_hook(self._post),
        ]

    def _pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        query = args[0] if args else kwargs["query"]
        if query.ndim != 3:
            raise RuntimeError(f"module {self.name!r}: the one-backward engine needs batched (3-D) attention inputs")
        self._batch = query.shape[0 if module.batch_first else 1]
        self._saved = F.linear
        original = self._saved

        def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
            out = original(x, weight, bias)
            w_slice, b_slice = self._locate(weight, self.weights), self._locate(bias, self.biases)
            if w_slice is None or not out.requires_grad:
                return out
            return self.record(x, out, (w_slice, b_slice, self._batch))

        F.linear = linear  # type: ignore[assignment]  # restored by detach() when the module returns
        return None

    def _post(self, module: nn.Module, args: tuple, output: Any) -> None:
        self.detach()
        return None

    def detach(self) -> None:
        if self._saved is not None:
            F.linear, self._saved = self._saved, None

    @staticmethod
    def _locate(
        t: Optional[torch.Tensor], params: Sequence[torch.Tensor]
    ) -> Optional[tuple[torch.Tensor, Optional[slice]]]:
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

    def call_batch(self, x: torch.Tensor, output: torch.Tensor) -> tuple[int, int]:
        return self._batch, self._batch  # the projections see (L, N, E) or (L*N, E) rows; N is checked in terms

    def prepare(self, x: torch.Tensor) -> Any:
        return as_autocast(x.detach(), autocast_dtype(x.device.type))

    def terms(self, n: int, k: int) -> list[Term]:
        out: list[Term] = []
        groups: dict[tuple, list[RecordedCall]] = {}
        for c in self.calls:
            (w, ws), _, _ = c.info
            groups.setdefault((id(w), None if ws is None else (ws.start, ws.stop)), []).append(c)
        for calls in groups.values():
            (w, ws), bias, batch = calls[0].info
            if batch != n:
                raise RuntimeError(f"module {self.name!r}: attention batch {batch} != {n} losses")
            a = self.concat([self.samples(_sequence_rows(c.inputs, batch), 1, n) for c in calls])
            b = self.concat([self.samples(_sequence_rows(c.output_grad, batch), 1, n) for c in calls])
            if self.counted(w):
                out.append(MatrixTerm(w, ws, a.to(b.dtype), b, self.engine.linear_gram, k))
            if bias is not None and self.counted(bias[0]):
                out.append(VectorTerm(bias[0], bias[1], b.sum(1)))
        return out


def _sequence_rows(t: torch.Tensor, batch: int) -> torch.Tensor:
    """``(L*N, E)`` rows of the out projection back to sequence-first ``(L, N, E)``; 3-D tensors unchanged."""
    return t.view(-1, batch, t.shape[-1]) if t.ndim == 2 else t
