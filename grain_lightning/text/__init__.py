"""GRAIN for pretrained Hugging Face text models: the model, the data, the packaged MiniLM, a run's result.

``TextModel`` (sequence classification / regression / causal language modelling, full fine-tuning or LoRA,
``GrainMixin``), ``TextDataModule`` (CSV/Parquet text and label columns, tokenized once and cached),
``TokenPerplexity`` (a split's perplexity), ``resolve_pretrained``
(a local model directory, or ``"minilm"``), ``run_result`` (what ``grain sweep`` reads). Needs the ``hf``
extra (transformers, peft); ``"minilm"`` needs the ``text`` extra.
"""

from grain_lightning.text.data import TextDataModule, read_table
from grain_lightning.text.module import MODEL_TASKS, TextModel, monitor_of
from grain_lightning.text.perplexity import TokenPerplexity
from grain_lightning.text.pretrained import MINILM, cache_dir, minilm_path, resolve_pretrained
from grain_lightning.text.result import ValidationCurve, run_result, write_json

__all__ = [
    "MINILM",
    "MODEL_TASKS",
    "TextDataModule",
    "TextModel",
    "TokenPerplexity",
    "ValidationCurve",
    "cache_dir",
    "minilm_path",
    "monitor_of",
    "read_table",
    "resolve_pretrained",
    "run_result",
    "write_json",
]
