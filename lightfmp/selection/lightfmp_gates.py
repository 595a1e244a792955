"""``lightfmp`` (the default): Light-FMP's own hard-concrete gates, ranked by keep probability ``P(z != 0)``.

Data: none beyond stage 1 (it reads the stage-1 model's gates). Cost: nothing after stage 1. Without a
``top_k`` the prune stage keeps the fields with keep probability above the threshold instead
(:meth:`~lightfmp.gates.HardConcreteGate.report`).
"""

from __future__ import annotations

import pandas as pd

from lightfmp.selection.base import SelectionContext, register_method


@register_method
class LightFMPGates:
    name = "lightfmp"

    def scores(self, context: SelectionContext) -> pd.Series:
        gate = context.model.gate
        if gate is None:
            raise ValueError("selection 'lightfmp' needs the stage-1 model with field gates")
        return pd.Series(gate.keep_probability().detach().double().numpy(), index=gate.names)
