"""``univariate``: each field scored alone by the validation AUC of its per-value mean label (target encoding).

For every field, the mean label of each of its values is estimated on the pretrain subset (with add-one
smoothing towards the overall rate, so a value seen once is not a perfect predictor); dense fields are first
cut into 16 quantile bins of the pretrain rows; a multi-valued field scores a row by the mean of its values'
encodings (the overall rate for an empty row). The field's score is the AUC of that encoding against the
label on the validation split, a measure that favours no value count. Interactions between fields are
invisible to it (a field that only matters jointly with another scores about 0.5).

Data: pretrain subset (encodings) and validation split (AUC). Cost: one pass over both per field, no model.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torchmetrics.functional.classification import binary_auroc

from lightfmp.selection.base import SelectionContext, register_method

DENSE_BINS = 16
SMOOTHING = 1.0


def _field_codes(context: SelectionContext, name: str, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, row_of_code)``: the value ids of ``name`` in ``rows`` and the row position each belongs to."""
    data, spec = context.data, context.spec
    if name in spec.dense:
        col = data.dense[:, spec.dense.index(name)]
        train = col[torch.as_tensor(context.train_rows, dtype=torch.long)]
        # numpy: torch.quantile refuses inputs of more than 2^24 elements
        edges = torch.from_numpy(np.quantile(train.double().numpy(), np.linspace(0, 1, DENSE_BINS + 1)[1:-1]))
        codes = torch.bucketize(col[rows].double(), edges.unique())
        return codes, torch.arange(len(rows))
    feat = next(f for f in spec.sparse if f.name == name)
    if not feat.multi_valued:
        singles = [f.name for f in spec.sparse if not f.multi_valued]
        return data.sparse[rows, singles.index(name)], torch.arange(len(rows))
    offsets, values = data.multi[name]
    starts, lens = offsets[rows], offsets[rows + 1] - offsets[rows]
    out = torch.cumsum(lens, 0) - lens
    total = int(lens.sum())
    shift = torch.repeat_interleave(starts - out, lens, output_size=total)
    return values[torch.arange(total) + shift], torch.repeat_interleave(torch.arange(len(rows)), lens)


def encoding_auc(context: SelectionContext, name: str) -> float:
    """Validation AUC of field ``name``'s smoothed per-value mean label, fitted on the pretrain subset."""
    train = torch.as_tensor(context.train_rows, dtype=torch.long)
    val = torch.as_tensor(context.val_rows, dtype=torch.long)
    y_train, y_val = context.data.labels[train].double(), context.data.labels[val]
    prior = float(y_train.mean())
    codes, row = _field_codes(context, name, train)
    size = int(codes.max()) + 1 if codes.numel() else 1
    val_codes, val_row = _field_codes(context, name, val)
    size = max(size, int(val_codes.max()) + 1 if val_codes.numel() else 1)
    hits = torch.zeros(size, dtype=torch.float64).index_add_(0, codes, y_train[row])
    counts = torch.zeros(size, dtype=torch.float64).index_add_(0, codes, torch.ones_like(codes, dtype=torch.float64))
    encoding = (hits + SMOOTHING * prior) / (counts + SMOOTHING)
    per_row = torch.zeros(len(val), dtype=torch.float64).index_add_(0, val_row, encoding[val_codes])
    n = torch.zeros(len(val), dtype=torch.float64).index_add_(0, val_row, torch.ones_like(val_row, dtype=torch.float64))
    score = torch.where(n > 0, per_row / n.clamp(min=1), torch.full_like(per_row, prior))
    return float(binary_auroc(score, y_val.long()))


@register_method
class Univariate:
    name = "univariate"

    def scores(self, context: SelectionContext) -> pd.Series:
        return pd.Series({f: encoding_auc(context, f) for f in context.fields})
