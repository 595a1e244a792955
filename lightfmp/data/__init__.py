"""Light-FMP data pipeline: schemas, format readers, preprocessing, splits, synthetic data, and the datamodule.

``CTRDataModule`` (which imports Lightning) is loaded on first access: ``from lightfmp.data import
CTRDataModule``.
"""

from typing import Any

from lightfmp.data.formats import FORMATS, adult_path, criteo_schema, read_frame
from lightfmp.data.preprocess import EncodedFrame, Preprocessor
from lightfmp.data.schema import FieldSpec, Schema
from lightfmp.data.splits import Split, split_indices, train_subsets
from lightfmp.data.synthetic import SyntheticCTR, write_criteo_tsv

__all__ = [
    "CTRDataModule",
    "EncodedFrame",
    "FORMATS",
    "FieldSpec",
    "Preprocessor",
    "Schema",
    "Split",
    "SyntheticCTR",
    "adult_path",
    "criteo_schema",
    "read_frame",
    "split_indices",
    "train_subsets",
    "write_criteo_tsv",
]


def __getattr__(name: str) -> Any:
    if name == "CTRDataModule":
        from lightfmp.data.datamodule import CTRDataModule

        return CTRDataModule
    if name == "stage_subsets":
        import warnings

        warnings.warn("stage_subsets is deprecated; use train_subsets", DeprecationWarning, stacklevel=2)
        return train_subsets
    raise AttributeError(f"module 'lightfmp.data' has no attribute {name!r}")
