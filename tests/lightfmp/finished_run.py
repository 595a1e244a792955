"""A tiny finished Light-FMP run (pipeline on synthetic data, about 2 s) and new rows to score with it."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from lightfmp.cli import run_cli
from lightfmp.data.preprocess import Preprocessor
from lightfmp.data.synthetic import SyntheticCTR
from lightfmp.lightning_module import LightFMPModule
from lightfmp.outputs import read_checkpoint, read_preprocessor

DENSE, SPARSE = 4, 6


def tiny_run(out: Path, backbone: str = "dlrm", top_k: int = 5) -> Path:
    """``lightfmp pipeline`` on 3000 synthetic rows (4 dense and 6 sparse fields, ``top_k`` kept), 1 epoch."""
    run_cli(
        [
            "pipeline", "--data.format", "synthetic", "--data.synthetic_rows", "3000",
            "--data.synthetic_dense", str(DENSE), "--data.synthetic_sparse", str(SPARSE),
            "--data.synthetic_num_informative", "3", "--data.batch_size", "256", "--data.pretrain_fraction", "0.5",
            "--model.backbone", backbone, "--model.embedding_dim", "4", "--model.hidden", "[16]",
            "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false",
            "--output_dir", str(out), "--top_k", str(top_k),
        ]
    )  # fmt: skip
    return out


def new_rows(rows: int = 300, seed: int = 7) -> pd.DataFrame:
    """Fresh rows of the same synthetic task (another seed: some categories unseen in training), with label."""
    return SyntheticCTR(num_rows=rows, num_dense=DENSE, num_sparse=SPARSE, num_informative=3, seed=seed).generate()


def stage_model(checkpoint: Path) -> tuple[LightFMPModule, Preprocessor]:
    """The module of a stage checkpoint (eval mode) and its preprocessor restricted to the module's fields."""
    ckpt = read_checkpoint(checkpoint)
    module = LightFMPModule.from_checkpoint(ckpt).eval()
    return module, read_preprocessor(ckpt, checkpoint).select(module.feature_spec.names)


def eager_scores(checkpoint: Path, frame: pd.DataFrame) -> torch.Tensor:
    """``sigmoid(module(batch))`` of all rows of ``frame`` (label included) in one batch: the reference scores."""
    module, preprocessor = stage_model(checkpoint)
    encoded = preprocessor.transform(frame[[*preprocessor.schema.names, preprocessor.schema.label]])
    with torch.no_grad():
        return torch.sigmoid(module(encoded.batch(torch.arange(len(frame)))))
