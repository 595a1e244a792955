"""Light-FMP data pipeline: schemas, readers, preprocessing, synthetic data, and the Lightning datamodule."""

from lightfmp.data.preprocess import EncodedFrame, Preprocessor
from lightfmp.data.readers import FORMATS, adult_path, criteo_schema, read_frame
from lightfmp.data.schema import FieldSpec, Schema

__all__ = [
    "EncodedFrame",
    "FORMATS",
    "FieldSpec",
    "Preprocessor",
    "Schema",
    "adult_path",
    "criteo_schema",
    "read_frame",
]
