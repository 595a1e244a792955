"""``lightfmp predict``: score new rows with a finished run's model, streaming the file, written atomically.

::

    lightfmp predict --output_dir RUN --data.path new.csv --predictions scores.csv [--id_column id]

The model is the run's latest stage (``finetune.ckpt``, else ``pruned.ckpt``, else ``pretrain.ckpt``; ``--stage``
picks one; the log says which). The saved preprocessor encodes the model's kept fields exactly as in training:
a category never seen in training gets the out-of-vocabulary id 0, a missing value the missing id / the training
mean. No label column is needed. The output CSV has one line per input row: the row id (``row``, the row number
in the file starting at 0, or the ``--id_column`` values under that column's name) and ``score``, the predicted
probability of the positive class (:meth:`LightFMPModule.predict_step`).

Streaming: :func:`~lightfmp.data.unlabeled.feature_chunks` reads ``--data.chunksize`` rows at a time; each chunk
is encoded and cut into ``--batch_size`` batches, which Lightning's ``trainer.predict`` scores with
``predict_step``; a :class:`ScoreWriter` (a ``BasePredictionWriter``) appends each batch's scores to the output as
it goes, so memory holds one chunk, never the whole file. The scores go to ``<predictions>.tmp``, renamed to
``<predictions>`` only when every row is scored; on any error the temporary file is removed and an existing
``<predictions>`` is left as it was.
"""

from __future__ import annotations

import argparse
import csv
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, TextIO

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, IterableDataset
from typing_extensions import override

from lightfmp.data.formats.base import PathLike
from lightfmp.data.preprocess import Preprocessor
from lightfmp.data.unlabeled import DEFAULT_PREDICT_CHUNKSIZE, PREDICT_FORMATS, feature_chunks
from lightfmp.inputs import CTRBatch
from lightfmp.outputs import atomic_write
from lightfmp.saved_run import STAGE_CHECKPOINTS, SavedRun, load_run

DEFAULT_PREDICT_BATCH_SIZE = 4096

__all__ = ["PredictionBatch", "PredictionResult", "ScoreStream", "ScoreWriter", "main", "predict"]


@dataclass
class PredictionBatch(CTRBatch):
    """A :class:`CTRBatch` of rows to score (labels NaN) that carries their row ids through Lightning's loop."""

    row_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @override
    def to(self, device: torch.device | str, non_blocking: bool = False) -> PredictionBatch:
        moved = super().to(device, non_blocking)
        return PredictionBatch(moved.dense, moved.sparse, moved.labels, self.row_ids)


class ScoreStream(IterableDataset):
    """Batches of encoded new rows: each chunk of ``chunks`` (``(frame, row_ids)``) encoded by ``preprocessor``
    and cut into ``batch_size`` rows (used with ``DataLoader(batch_size=None)``)."""

    def __init__(self, chunks: Iterator[tuple[Any, np.ndarray]], preprocessor: Preprocessor, batch_size: int) -> None:
        super().__init__()
        self.chunks, self.preprocessor, self.batch_size = chunks, preprocessor, batch_size

    def __iter__(self) -> Iterator[PredictionBatch]:
        for frame, row_ids in self.chunks:
            encoded = self.preprocessor.encode_features(frame)
            for index in torch.arange(len(encoded)).split(self.batch_size):
                b = encoded.batch(index)
                yield PredictionBatch(b.dense, b.sparse, b.labels, row_ids[index.numpy()])


class ScoreWriter(BasePredictionWriter):
    """Appends ``(row id, score)`` lines to ``handle`` after each predicted batch (header written first)."""

    def __init__(self, handle: TextIO, id_name: str) -> None:
        super().__init__(write_interval="batch")
        self.writer = csv.writer(handle, lineterminator="\n")
        self.writer.writerow([id_name, "score"])
        self.rows = 0

    @override
    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: Any,
        batch_indices: Optional[Sequence[int]],
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        scores = prediction.detach().float().cpu().numpy()
        self.writer.writerows(zip(batch.row_ids.tolist(), map(str, scores)))  # float32's shortest exact repr
        self.rows += len(scores)


@dataclass
class PredictionResult:
    """What :func:`predict` did: the stage and checkpoint used, rows scored, the output file."""

    stage: str
    checkpoint: Path
    rows: int
    predictions: Path
    fields: list[str]


def _check_predictions_path(predictions: Path) -> None:
    if predictions.is_dir():
        raise IsADirectoryError(f"--predictions {str(predictions)!r} is a directory; give a file name such as out.csv")
    if not predictions.parent.is_dir():
        raise FileNotFoundError(
            f"the directory of --predictions {str(predictions)!r} does not exist ({str(predictions.parent)!r})"
        )


def _default_format(run: SavedRun) -> str:
    """The run's data format when it can be read for scoring; synthetic data has the criteo layout; else csv."""
    if run.data_format in PREDICT_FORMATS:
        return run.data_format
    return "criteo" if run.data_format == "synthetic" else "csv"


def predict(
    output_dir: PathLike,
    data_path: PathLike,
    predictions: PathLike,
    data_format: Optional[str] = None,
    id_column: Optional[str] = None,
    chunksize: int = DEFAULT_PREDICT_CHUNKSIZE,
    batch_size: int = DEFAULT_PREDICT_BATCH_SIZE,
    stage: Optional[str] = None,
    accelerator: str = "cpu",
) -> PredictionResult:
    """Score every row of ``data_path`` with the run in ``output_dir`` and write ``predictions`` (see the module
    docstring). Every input is checked before the output is touched: the run's files, the new file and its
    columns, the output's directory.

    Args:
        data_format: the format of ``data_path`` (one of ``PREDICT_FORMATS``; default: the run's own format).
        id_column: a column of the file whose values identify the rows (default: the row number).
        chunksize: rows read at a time; batch_size: rows per model call.
        stage: ``finetune``, ``prune`` or ``pretrain`` (default: the latest one that exists).
        accelerator: Lightning accelerator of the predicting trainer.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    predictions = Path(predictions)
    _check_predictions_path(predictions)
    run = load_run(output_dir, stage)
    data_format = data_format or _default_format(run)
    chunks = feature_chunks(
        data_format, data_path, run.preprocessor.schema, chunksize=chunksize, id_column=id_column, layout=run.layout
    )
    rank_zero_info(
        f"lightfmp predict: scoring {str(data_path)!r} ({data_format}) with stage {run.stage!r} "
        f"({run.checkpoint}, {run.module.feature_spec.num_fields} fields)"
    )
    stream = ScoreStream(chunks, run.preprocessor, batch_size)
    loader = DataLoader(stream, batch_size=None, collate_fn=lambda b: b)  # one batch each
    rows = 0

    def write(tmp: Path) -> None:
        nonlocal rows
        with open(tmp, "w", newline="") as handle:
            writer = ScoreWriter(handle, id_column or "row")
            trainer = L.Trainer(
                accelerator=accelerator,
                devices=1,
                logger=False,
                callbacks=[writer],
                enable_progress_bar=False,
                enable_model_summary=False,
                enable_checkpointing=False,
            )
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*does not have many workers.*")
                warnings.filterwarnings("ignore", message=".*infer the batch indices.*")  # not needed: ids ride along
                trainer.predict(run.module, dataloaders=loader, return_predictions=False)
            if trainer.interrupted:
                raise RuntimeError(f"prediction was interrupted; {str(predictions)!r} was not written")
            rows = writer.rows

    tmp = predictions.with_name(predictions.name + ".tmp")  # the temporary name atomic_write uses
    try:
        atomic_write(predictions, write)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    rank_zero_info(f"lightfmp predict: wrote {rows} scores to {predictions} (stage {run.stage!r})")
    return PredictionResult(run.stage, run.checkpoint, rows, predictions, list(run.module.feature_spec.names))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightfmp predict",
        description="Score the rows of a new file with a finished Light-FMP run (one probability per row).",
    )
    parser.add_argument("--output_dir", required=True, help="the output directory of a finished run")
    parser.add_argument("--data.path", dest="data_path", required=True, help="the file of rows to score")
    parser.add_argument("--predictions", required=True, help="output CSV: row id and score per input row")
    parser.add_argument(
        "--data.format",
        dest="data_format",
        choices=PREDICT_FORMATS,
        default=None,
        help="format of --data.path (default: the run's format; criteo after a run on synthetic data, else csv)",
    )
    parser.add_argument(
        "--data.chunksize", dest="chunksize", type=int, default=DEFAULT_PREDICT_CHUNKSIZE, help="rows read at a time"
    )
    parser.add_argument("--batch_size", type=int, default=DEFAULT_PREDICT_BATCH_SIZE, help="rows per model call")
    parser.add_argument("--id_column", default=None, help="a column identifying the rows (default: the row number)")
    parser.add_argument(
        "--stage", choices=list(STAGE_CHECKPOINTS), default=None, help="which stage's model (default: the latest)"
    )
    parser.add_argument("--accelerator", default="cpu", help="Lightning accelerator (cpu, gpu, auto)")
    return parser


def main(args: Optional[list[str]] = None) -> PredictionResult:
    """``lightfmp predict`` (``args`` without the subcommand's name)."""
    ns = build_parser().parse_args(args)
    result = predict(
        ns.output_dir,
        ns.data_path,
        ns.predictions,
        data_format=ns.data_format,
        id_column=ns.id_column,
        chunksize=ns.chunksize,
        batch_size=ns.batch_size,
        stage=ns.stage,
        accelerator=ns.accelerator,
    )
    print(f"wrote {result.rows} scores to {result.predictions} with the {result.stage} model ({result.checkpoint})")
    return result
