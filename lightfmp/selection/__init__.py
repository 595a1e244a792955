"""Field selection at a fixed budget: Light-FMP's gates and the feature-selection baselines behind one interface.

Every method (a module here, registered by name in ``METHODS``) scores the fields from the stage-1 data (the
pretrain subset, and the validation split for methods that tune on it) and/or the stage-1 model; the prune
stage keeps the ``top_k`` best (:func:`lightfmp.stages.prune`, ``lightfmp pipeline --selection NAME --top_k K``)
and the finetune stage is the same for all. Methods:

============ ===================================================== ================================
name         scores                                                extra cost after stage 1
============ ===================================================== ================================
lightfmp     hard-concrete keep probability of the stage-1 gates   none
random       a seeded random permutation (the floor)               none
univariate   validation AUC of the field's per-value mean label     two passes over the data/field
permutation  drop in validation AUC when the field is shuffled     one fit + F+1 validation passes
lasso        ``|s_f|`` of an L1-penalised per-field scale (LPFS)   one fit
autofield    keep weight of a softmax keep/drop gate (bilevel)     one fit + one val step per step
============ ===================================================== ================================
"""

from __future__ import annotations

from lightfmp.selection import autofield, lasso, lightfmp_gates, permutation, random_fields, univariate  # noqa: F401
from lightfmp.selection.base import (
    DEFAULT_SELECTION,
    METHODS,
    SelectionContext,
    SelectionMethod,
    check_selection,
    constant_fields,
    get_method,
    rank_fields,
    register_method,
)

__all__ = [
    "DEFAULT_SELECTION",
    "METHODS",
    "SelectionContext",
    "SelectionMethod",
    "check_selection",
    "constant_fields",
    "get_method",
    "rank_fields",
    "register_method",
]
