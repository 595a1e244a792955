"""``random``: k fields drawn uniformly at random (the floor every method should beat).

Data: none. Cost: nothing (a seeded permutation of the field names). Scores are a seeded random permutation
of ``1..F``, so the top k are a uniform random k-subset, the same for the same ``seed``.
"""

from __future__ import annotations

import pandas as pd
import torch

from lightfmp.selection.base import SelectionContext, register_method


@register_method
class RandomFields:
    name = "random"

    def scores(self, context: SelectionContext) -> pd.Series:
        order = torch.randperm(len(context.fields), generator=context.generator(7)).double() + 1
        return pd.Series(order.numpy(), index=context.fields)
