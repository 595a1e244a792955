"""``autofield``: AutoField-style keep/drop gates searched bilevel (Wang et al., 2022; DARTS first order).

Each field ``f`` has two architecture logits ``a_f = (keep, drop)``; its input is multiplied, per row, by the keep
component of a Gumbel-softmax sample ``softmax((a_f + g) / temperature)`` (dropping multiplies by 0), as in
AutoField, so the network learns with fields kept and dropped and the logits see what a field is worth (a
deterministic soft weight only measures the value of rescaling the field, and ranked noise fields high in our
tests). A fresh copy of the stage-1 architecture is trained on the
pretrain subset for ``epochs`` with the logits fixed; before every training step the logits take one Adam step
(``arch_lr``) on the loss of the next validation batch with the network weights fixed: the first-order DARTS
approximation of the bilevel problem. Fields are ranked by their final keep weight
``softmax(a_f)[0]``.

Data: pretrain subset (weights) and validation split (architecture). Cost: one extra stage-1 fit with one more
forward/backward per step on a validation batch (about twice a stage-1 fit).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from lightfmp.selection.base import SelectionContext, fit, minibatches, register_method, ungated_copy

ARCH_LR = 0.1
TEMPERATURE = 0.5


@register_method
class AutoField:
    name = "autofield"
    arch_lr = ARCH_LR
    temperature = TEMPERATURE

    def scores(self, context: SelectionContext) -> pd.Series:
        model = ungated_copy(context)
        logits = nn.Parameter(torch.zeros(len(context.fields), 2))
        arch_opt = torch.optim.Adam([logits], lr=self.arch_lr)
        gen = context.generator(3)

        def val_batches() -> Iterator[np.ndarray]:
            while True:
                yield from minibatches(context.val_rows, context.batch_size, gen)

        stream = val_batches()

        def keep(b: int) -> torch.Tensor:
            noise = -torch.log(-torch.log(torch.rand(b, *logits.shape, generator=gen).clamp(1e-6, 1 - 1e-6)))
            return torch.softmax((logits + noise) / self.temperature, dim=2)[:, :, 0]

        def arch_step() -> None:
            batch = context.data.batch(next(stream))
            net_params = list(model.parameters())
            for p in net_params:
                p.requires_grad_(False)
            try:
                loss = F.binary_cross_entropy_with_logits(model(batch, keep(len(batch))), batch.labels)
                arch_opt.zero_grad(set_to_none=True)
                loss.backward()
                arch_opt.step()
            finally:
                for p in net_params:
                    p.requires_grad_(True)

        # the logits are not in fit's optimiser: the training steps leave them alone
        fit(context, model, gates=lambda b: keep(b).detach(), before_step=arch_step)
        return pd.Series(torch.softmax(logits.detach(), dim=1)[:, 0].double().numpy(), index=context.fields)
