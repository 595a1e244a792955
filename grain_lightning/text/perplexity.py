r"""Next-token losses of a causal language model, and perplexity over a whole split.

``labels`` follow the Hugging Face convention: the input ids, ``-100`` where nothing is to be predicted
(padding). Position ``t`` of the logits predicts ``labels[:, t + 1]``, so a text of ``L`` tokens has ``L - 1``
predicted tokens.

Per-sample loss (what GRAIN groups and the mean baseline averages): the token-mean negative log-likelihood of
the sample, ``l_i = sum_t nll_it m_it / max(1, sum_t m_it)`` (``m``: predicted-token mask); every text weighs the
same whatever its length, as a sample of a classification task does. A text with fewer than 2 tokens has nothing
to predict: its loss is exactly 0.

Perplexity of a split: ``exp(sum_i sum_t nll_it m_it / sum_i sum_t m_it)``, the exponential of the token-mean
loss over every predicted token of the split (not the mean of per-text perplexities, nor ``exp`` of the mean
per-sample loss). Accumulated in float64; summed across processes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics import Metric
from typing_extensions import override

__all__ = ["IGNORE_INDEX", "TokenPerplexity", "sample_losses", "token_nll"]

#: the label of a position that is not predicted (Hugging Face's convention)
IGNORE_INDEX = -100


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(nll, mask)``, both ``(n, T - 1)``: the loss of predicting ``labels[:, 1:]`` from ``logits[:, :-1]`` (``(n,
    T, V)``, computed in at least float32), 0 where the label is :data:`IGNORE_INDEX`; ``mask`` marks predicted
    tokens. Cost: one log-softmax over ``n (T - 1) V`` logits."""
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"expected logits (n, T, V) and labels (n, T), got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    target = labels[:, 1:]
    pred = logits[:, :-1]
    if pred.dtype in (torch.float16, torch.bfloat16):
        pred = pred.float()
    nll = F.cross_entropy(pred.transpose(1, 2), target, ignore_index=IGNORE_INDEX, reduction="none")
    return nll, target != IGNORE_INDEX


def sample_losses(nll: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``(n,)`` per-sample token-mean losses (see the module docstring); 0 for a sample with no predicted token."""
    return (nll * mask).sum(1) / mask.sum(1).clamp(min=1)


class TokenPerplexity(Metric):
    """``exp`` of the token-mean negative log-likelihood over every token seen since the last reset."""

    full_state_update = False
    nll: torch.Tensor
    tokens: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.add_state("nll", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("tokens", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    @override
    def update(self, nll: torch.Tensor, mask: torch.Tensor) -> None:
        """Add the token losses ``nll`` where ``mask`` (both ``(n, T - 1)``, from :func:`token_nll`)."""
        self.nll += (nll.detach().double() * mask).sum()
        self.tokens += mask.sum()

    @override
    def compute(self) -> torch.Tensor:
        """The perplexity; ``nan`` when no token was seen."""
        if int(self.tokens) == 0:
            return torch.tensor(float("nan"), dtype=torch.float64)
        return torch.exp(self.nll / self.tokens)
