"""Deprecated: the stages moved to :mod:`lightfmp.stages`, their outputs to :mod:`lightfmp.outputs` and
``TrainingThroughput`` to :mod:`lightfmp.callbacks`."""

import warnings

from lightfmp.callbacks import TrainingThroughput
from lightfmp.data.preprocess import Preprocessor
from lightfmp.lightning_module import LIGHTFMP_CHECKPOINT_KEY, LightFMPModule, evaluate
from lightfmp.outputs import METRICS_FILE, STAGE_FILES, STAGES, read_metrics, summary_table
from lightfmp.stages import finetune, pretrain, prune

__all__ = [
    "LIGHTFMP_CHECKPOINT_KEY",
    "METRICS_FILE",
    "STAGES",
    "STAGE_FILES",
    "LightFMPModule",
    "Preprocessor",
    "TrainingThroughput",
    "evaluate",
    "finetune",
    "pretrain",
    "prune",
    "read_metrics",
    "summary_table",
]

warnings.warn(
    "lightfmp.pipeline is deprecated; import from lightfmp.stages (and lightfmp.outputs, lightfmp.callbacks)",
    DeprecationWarning,
    stacklevel=2,
)
