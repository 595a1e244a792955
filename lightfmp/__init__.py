"""Light-FMP: feature and model pruning for TorchRec recommenders.

Importing the package registers the ``torchrec`` Lightning strategy (:mod:`lightfmp.torchrec_strategy`).
"""

from lightfmp.torchrec_strategy import register_torchrec_strategy

register_torchrec_strategy()
