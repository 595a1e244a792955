"""``lasso``: an L1 relaxation of the field gates (LPFS-like).

A fresh copy of the stage-1 architecture gets one continuous scale ``s_f`` per field (initialised to 1),
which multiplies the field's input exactly where a hard-concrete gate would; it is trained like stage 1 on the
pretrain subset with ``l1 * sum_f |s_f|`` added to the loss (the scales in their own optimiser group with the
model's ``gate_lr``). Fields are ranked by ``|s_f|`` at the end. The embeddings are free to grow and undo a
small scale; the L1 term still shrinks the scales of fields that do not help the loss fastest, which is what
the ranking uses (LPFS smooths the L0 norm instead; a plain L1 is the simplest relaxation).

Data: pretrain subset. Cost: one extra stage-1 fit (``F`` more parameters).
"""

from __future__ import annotations

import pandas as pd
import torch
from torch import nn

from lightfmp.selection.base import SelectionContext, fit, register_method, ungated_copy

L1_WEIGHT = 0.01


@register_method
class Lasso:
    name = "lasso"
    l1 = L1_WEIGHT

    def scores(self, context: SelectionContext) -> pd.Series:
        model = ungated_copy(context)
        scale = nn.Parameter(torch.ones(len(context.fields)))
        fit(
            context,
            model,
            gates=lambda b: scale.unsqueeze(0).expand(b, -1),
            extra_parameters=[scale],
            penalty=lambda: self.l1 * scale.abs().sum(),
        )
        return pd.Series(scale.detach().abs().double().numpy(), index=context.fields)
