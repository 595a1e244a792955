"""``permutation``: permutation importance of a model trained without gates.

A fresh copy of the stage-1 architecture (no field mask, every field fully on) is trained on the pretrain
subset for ``epochs`` (the same batches and optimiser as stage 1). A field's score is the drop in validation
AUC when its values are shuffled across all validation rows (one seeded permutation per field; the other
fields and the labels stay in place).

Data: pretrain subset (training), validation split (scoring). Cost: one extra stage-1 fit plus ``F + 1``
scoring passes over the validation split.
"""

from __future__ import annotations

from typing import Optional

import pandas as pd
import torch
from torchmetrics.classification import BinaryAUROC

from lightfmp.selection.base import SelectionContext, fit, register_method, replace_field, ungated_copy


@torch.no_grad()
def permutation_importance(context: SelectionContext, model: torch.nn.Module) -> pd.Series:
    """Validation AUC of ``model`` minus its AUC with each field shuffled across the validation rows."""
    model.eval()
    val = context.val_rows
    perm = val[torch.randperm(len(val), generator=context.generator(11)).numpy()]

    def auc(field: Optional[str]) -> float:
        metric = BinaryAUROC(sync_on_compute=False)  # a local score: never synchronised across DDP ranks
        for start in range(0, len(val), context.eval_batch_size):
            batch = context.data.batch(val[start : start + context.eval_batch_size])
            if field is not None:
                donor = context.data.batch(perm[start : start + context.eval_batch_size])
                batch = replace_field(batch, donor, context.spec, field)
            metric.update(model(batch), batch.labels.long())
        return float(metric.compute())

    base = auc(None)
    return pd.Series({f: base - auc(f) for f in context.fields})


@register_method
class Permutation:
    name = "permutation"

    def scores(self, context: SelectionContext) -> pd.Series:
        model = fit(context, ungated_copy(context))
        return permutation_importance(context, model)
