"""Light-FMP: feature and model pruning for TorchRec recommenders."""
