r"""``nn.Embedding``: ``<g_i, g_j> = sum_{t,s} [id_i(t) = id_j(s)] <B_i(t), B_j(s)>`` (``padding_idx`` masked),
or the group gradients over the ``U`` rows the batch touches when that is cheaper; see
:class:`~grain_lightning.ghost.terms.EmbeddingTerm`. Cost: the cheaper of ``(nT)^2 D`` and
``n T D + k^2 U D`` flops; ``n T`` ids and ``n T D`` output gradients kept. Position ids of shape ``(1, S)``
arrive expanded to the batch (see :meth:`GhostEngine.broadcast`). ``max_norm`` and ``sparse=True`` go to the
generic rule, which refuses them if ``torch.func`` cannot run them per sample.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from grain_lightning.ghost.registry import register_rule, register_sample_coupling
from grain_lightning.ghost.rules.base import GhostRule
from grain_lightning.ghost.tensors import work
from grain_lightning.ghost.terms import EmbeddingTerm, Term

__all__ = ["EmbeddingRule"]


@register_rule(nn.Embedding)
class EmbeddingRule(GhostRule):
    expects = frozenset({"weight"})

    @classmethod
    def why_unsupported(cls, module: nn.Module) -> Optional[str]:
        assert isinstance(module, nn.Embedding)
        if module.max_norm is not None or module.sparse:
            return "max_norm and sparse=True are not supported"
        return None

    def expands_broadcast(self, x: torch.Tensor) -> bool:
        return not x.is_floating_point()  # ids of shape (1, S): position / token-type ids broadcast over the batch

    def terms(self, n: int, k: int) -> list[Term]:
        m = self.module
        assert isinstance(m, nn.Embedding)
        if not self.counted(m.weight):
            return []
        bd = self.batch_dim  # the engine checked that dim bd of every call's ids and output holds the n samples
        ids = self.concat([c.inputs.movedim(bd, 0).reshape(n, -1) for c in self.calls])
        b = self.concat([work(c.output_grad.movedim(bd, 0).reshape(n, -1, m.embedding_dim)) for c in self.calls])
        if m.padding_idx is not None:
            b = b * (ids != m.padding_idx).unsqueeze(-1).to(b.dtype)
        return [EmbeddingTerm(m.weight, ids, b, self.engine.linear_gram, k)]  # type: ignore[arg-type]


# frequency scaling divides each row's gradient by its count in the whole batch: samples are coupled
register_sample_coupling(nn.Embedding, lambda m: bool(m.scale_grad_by_freq))
