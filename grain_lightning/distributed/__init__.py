"""GRAIN across data-parallel ranks: the ``grain_ddp`` and ``grain_fsdp`` strategies, the cross-rank min-norm,
collectives, layout, the FSDP2 exchange, faults.

Importing this package registers the ``grain_ddp`` and ``grain_fsdp`` strategy names with Lightning.
"""

from grain_lightning.distributed.collectives import CommCounter
from grain_lightning.distributed.cross_rank import MODES, CrossRankMinNorm, CrossRankResult
from grain_lightning.distributed.faults import RankFailedError, UnequalBatchesError
from grain_lightning.distributed.fsdp import GrainFSDPStrategy
from grain_lightning.distributed.strategy import GrainDDPStrategy

__all__ = [
    "CommCounter",
    "CrossRankMinNorm",
    "CrossRankResult",
    "GrainDDPStrategy",
    "GrainFSDPStrategy",
    "MODES",
    "RankFailedError",
    "UnequalBatchesError",
]
