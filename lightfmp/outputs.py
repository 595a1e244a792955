"""The output directory of a Light-FMP run: which stage writes which file, ``metrics.json`` and the summary
derived from it, and saving / reading stage checkpoints.

=========== =====================================================================
stage       writes
=========== =====================================================================
pretrain    ``pretrain.ckpt``, ``preprocessor.json``
prune       ``pruned.ckpt``, ``feature_report.csv``, ``keep_probabilities.png``
finetune    ``finetune.ckpt``
=========== =====================================================================

Each stage adds its entry to ``metrics.json`` (test AUC and LogLoss, number of fields, parameters, training
seconds, training samples per second) only once all its files are in place (:mod:`lightfmp.staging` writes a
stage's files elsewhere first and moves them in when the stage has succeeded); an undefined number (the AUC of a
test split with one label class) is ``null``, never ``NaN``, so the file is strict JSON. ``summary.csv`` and
``summary.md`` (the before/after table, :func:`summary_table`) are rewritten with ``metrics.json``.

A stage checkpoint is a Lightning checkpoint (``LightFMPModule.load_from_checkpoint`` loads it) with the
stage's information under ``"lightfmp"`` (including ``"data"``, the :mod:`~lightfmp.data.fingerprint` of the
data stage 1 was trained on) and the preprocessor where Lightning keeps the datamodule's state
(``DATAMODULE_CHECKPOINT_KEY``, :func:`~lightfmp.data.datamodule.preprocessor_state`); ``preprocessor.json``
holds the same preprocessor state (:meth:`~lightfmp.data.preprocess.Preprocessor.save`).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional, Union

import lightning as L
import pandas as pd
import torch

from lightfmp.callbacks import TrainingThroughput
from lightfmp.data.datamodule import DATAMODULE_CHECKPOINT_KEY, preprocessor_from_state
from lightfmp.data.preprocess import Preprocessor
from lightfmp.lightning_module import LIGHTFMP_CHECKPOINT_KEY, LightFMPModule
from lightfmp.torchrec_strategy import read_sharded_whole, save_sharded

PathLike = Union[str, Path]
STAGES = ("pretrain", "prune", "finetune")
STAGE_FILES = {
    "pretrain": ("pretrain.ckpt", "preprocessor.json"),
    "prune": ("pruned.ckpt", "feature_report.csv", "keep_probabilities.png"),
    "finetune": ("finetune.ckpt",),
}
METRICS_FILE = "metrics.json"
PREPROCESSOR_FILE = "preprocessor.json"
FEATURE_REPORT_FILE = "feature_report.csv"
KEEP_PROBABILITIES_FILE = "keep_probabilities.png"
SUMMARY_FILES = ("summary.csv", "summary.md")
#: why the prune row can differ from pretrain's with the same fields (written under the table in summary.md)
PRUNE_ROW_NOTE = (
    "The prune row scores the stage-1 model with its gates fixed to 0/1 (a field is in or out), the model the "
    "pruned network reproduces exactly; the pretrain row scores it with the deterministic soft gates of "
    "training (each field's embedding scaled by its gate value). So the prune row's LogLoss can move even when "
    "no field is dropped: the kept fields' gates go from their soft value to 1."
)


# ------------------------------------------------------------------------------------------ files
def atomic_write(path: Path, write: Callable[[Path], Any]) -> None:
    """``write(tmp)`` to ``<path>.tmp``, then rename it to ``path``."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def check_output_dir(output_dir: PathLike) -> Path:
    """``output_dir`` as a ``Path``; raises ``NotADirectoryError`` naming it when it, or the nearest of its parents
    that exists, is not a directory (checked before a stage runs; nothing is created)."""
    out = Path(output_dir)
    for path in (out, *out.parents):
        if path.exists():
            if not path.is_dir():
                where = "is" if path == out else f"is inside {str(path)!r}, which is"
                raise NotADirectoryError(
                    f"output_dir {str(out)!r} {where} an existing file, not a directory; pass a new or existing "
                    "directory as --output_dir"
                )
            break
    return out


def output_directory(output_dir: PathLike) -> Path:
    """``output_dir`` as a ``Path`` (see :func:`check_output_dir`), created if needed."""
    out = check_output_dir(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_preprocessor(output_dir: Path, preprocessor: Preprocessor) -> None:
    """``preprocessor.json``: :meth:`Preprocessor.save` (atomic), the state the checkpoints hold too."""
    preprocessor.save(output_dir / PREPROCESSOR_FILE)


def write_feature_report(output_dir: Path, report: pd.DataFrame) -> None:
    """``feature_report.csv``: one row per field of the pretrained model (keep probability, kept)."""
    atomic_write(output_dir / FEATURE_REPORT_FILE, lambda p: report.to_csv(p, index=False))


# ------------------------------------------------------------------------------------------ metrics.json
def read_metrics(output_dir: PathLike) -> dict[str, Any]:
    """The entries of ``metrics.json`` by stage (empty when there is no file)."""
    path = Path(output_dir) / METRICS_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def write_metrics(output_dir: Path, metrics: dict[str, Any]) -> None:
    """Replace ``metrics.json`` (atomically) by ``metrics``, then ``summary.csv`` and ``summary.md`` from it."""
    text = json.dumps(metrics, indent=2, allow_nan=False)  # strict JSON: undefined values are null (metrics_entry)
    atomic_write(output_dir / METRICS_FILE, lambda p: p.write_text(text))
    table = _summary_frame(metrics)
    csv_file, md_file = (output_dir / name for name in SUMMARY_FILES)
    if table.empty:
        csv_file.unlink(missing_ok=True)
        md_file.unlink(missing_ok=True)
        return
    atomic_write(csv_file, lambda p: table.to_csv(p, index=False))
    atomic_write(md_file, lambda p: p.write_text(summary_markdown(table, metrics)))


def metrics_entry(
    module: LightFMPModule, scores: dict[str, Any], throughput: Optional[TrainingThroughput]
) -> dict[str, Any]:
    """A stage's ``metrics.json`` entry: test scores, size of the model and, after a fit, its throughput.

    An undefined number (``None``, NaN or infinite, e.g. the AUC of a test split with one label class) is ``None``
    (``null`` in ``metrics.json``); a NaN or infinite one also warns, naming the key.
    """
    entry: dict[str, Any] = {
        "auc": scores["auc"],
        "logloss": scores["logloss"],
        "test_samples": scores["samples"],
        "fields": module.feature_spec.num_fields,
        "parameters": module.num_parameters(),
    }
    if throughput is not None:
        entry.update(
            train_seconds=throughput.seconds,
            train_cpu_seconds=throughput.cpu_seconds,
            train_samples=throughput.samples,
            samples_per_second=throughput.samples_per_second,
        )
    for key, value in entry.items():
        if isinstance(value, float) and not math.isfinite(value):
            warnings.warn(f"{key} is {value}; recorded as null in {METRICS_FILE}", UserWarning, stacklevel=2)
            entry[key] = None
    return entry


def _rounded(value: Optional[float], digits: Optional[int]) -> Optional[float]:
    """``round(value, digits)``; None stays None (an undefined metric)."""
    return None if value is None else round(value, digits)


def summary_table(output_dir: PathLike) -> pd.DataFrame:
    """Before/after table from ``metrics.json``: one row per finished stage."""
    return _summary_frame(read_metrics(output_dir))


def summary_markdown(table: pd.DataFrame, metrics: dict[str, Any]) -> str:
    """``summary.md``: the before/after table, the kept and dropped fields, and :data:`PRUNE_ROW_NOTE`."""
    header = "| " + " | ".join(table.columns) + " |"
    rule = "| " + " | ".join("---" for _ in table.columns) + " |"
    body = [
        "| " + " | ".join("" if pd.isna(v) else str(v) for v in row) + " |" for row in table.itertuples(index=False)
    ]
    lines = ["# Light-FMP run", "", header, rule, *body, ""]
    if "prune" in metrics:
        prune = metrics["prune"]
        lines += [
            f"Selection `{prune.get('selection', 'lightfmp')}` kept {len(prune['kept_fields'])} fields: "
            f"{', '.join(prune['kept_fields'])}.",
            "",
            f"Dropped {len(prune['dropped_fields'])}: {', '.join(prune['dropped_fields']) or '(none)'}.",
            "",
            PRUNE_ROW_NOTE,
            "",
        ]
    if table["test_auc"].isna().any():
        lines += ["An empty test AUC is undefined: that test split holds one label class.", ""]
    return "\n".join(lines)


def _summary_frame(metrics: dict[str, Any]) -> pd.DataFrame:
    rows = []
    for stage in STAGES:
        if stage in metrics:
            m = metrics[stage]
            rows.append(
                {
                    "stage": stage,
                    "fields": m["fields"],
                    "parameters": m["parameters"],
                    "test_auc": _rounded(m["auc"], 4),
                    "test_logloss": _rounded(m["logloss"], 4),
                    "train_seconds": _rounded(m.get("train_seconds"), 1),
                    "samples_per_second": _rounded(m.get("samples_per_second"), None),
                }
            )
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------ checkpoints
def save_checkpoint(
    trainer: Optional[L.Trainer],
    module: LightFMPModule,
    path: Path,
    extra: dict[str, Any],
    preprocessor: Optional[dict[str, Any]] = None,
    sharded: bool = False,
) -> None:
    """A Lightning checkpoint (loadable by ``LightFMPModule.load_from_checkpoint``) plus ``extra`` under 'lightfmp'.

    With a ``trainer``, Lightning writes it, the fitted datamodule's preprocessor included: one file, or under the
    ``torchrec`` strategy with ``checkpoint_format dcp`` a ``torch.distributed.checkpoint`` directory that each rank
    writes its shards into (every rank calls this). Without one, ``preprocessor`` (a
    :func:`~lightfmp.data.datamodule.preprocessor_state` dict) goes where Lightning would put it; ``sharded``: write
    such a directory (a collective under DDP: every rank calls it), else one file (rank 0 calls it).
    """
    if trainer is not None:  # every rank calls it under DDP (Lightning writes on rank 0, then a barrier)
        module.checkpoint_extra = extra  # added by LightFMPModule.on_save_checkpoint
        try:
            trainer.save_checkpoint(path, weights_only=True)  # into a staging directory: no temporary name needed
        finally:
            module.checkpoint_extra = None
        return
    checkpoint = {
        LightFMPModule.CHECKPOINT_HYPER_PARAMS_KEY: dict(module.hparams),
        "pytorch-lightning_version": L.__version__,
        LIGHTFMP_CHECKPOINT_KEY: extra,
    }
    if preprocessor is not None:
        checkpoint[DATAMODULE_CHECKPOINT_KEY] = preprocessor
    if sharded:
        save_sharded(module.state_dict(), path, checkpoint)
        return
    atomic_write(path, lambda tmp: torch.save({"state_dict": module.state_dict(), **checkpoint}, tmp))


def stage_checkpoint(output_dir: Path, checkpoint: Optional[PathLike], default_name: str, previous_stage: str) -> Path:
    """The input checkpoint of a stage: ``checkpoint``, else ``<output_dir>/<default_name>``; it must exist."""
    path = Path(checkpoint) if checkpoint is not None else output_dir / default_name
    if not path.exists():
        raise FileNotFoundError(
            f"no {default_name} at {path}; run `lightfmp {previous_stage}` first or pass --checkpoint"
        )
    return path


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A stage checkpoint, read once (on the CPU); it must have the Light-FMP entry. A file that ``torch.load``
    cannot read raises ``ValueError`` naming it (the library's error as ``__cause__``). A directory (``torchrec``
    strategy, ``checkpoint_format dcp``, written by any number of ranks) is read whole by this process alone."""
    if path.is_dir():
        checkpoint = read_sharded_whole(path)
        if LIGHTFMP_CHECKPOINT_KEY not in checkpoint:
            raise ValueError(f"{path} is not a Light-FMP checkpoint (no {LIGHTFMP_CHECKPOINT_KEY!r} entry)")
        return checkpoint
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # torch.load raises many types for a damaged file (UnpicklingError, RuntimeError, ...)
        raise ValueError(
            f"{str(path)!r} is not a readable checkpoint (not written by torch.save, or truncated or corrupt; "
            f"{path.stat().st_size} bytes): {type(e).__name__}: {e}"
        ) from e
    if not isinstance(checkpoint, dict) or LIGHTFMP_CHECKPOINT_KEY not in checkpoint:
        raise ValueError(f"{path} is not a Light-FMP checkpoint (no {LIGHTFMP_CHECKPOINT_KEY!r} entry)")
    return checkpoint


def checkpoint_preprocessor_state(checkpoint: dict[str, Any], path: Path) -> dict[str, Any]:
    """The ``preprocessor_state`` dict of a stage checkpoint (checkpoints written before it moved there kept
    the preprocessor state in the Light-FMP entry)."""
    state = checkpoint.get(DATAMODULE_CHECKPOINT_KEY, {})
    if "preprocessor" in state:
        return state
    legacy = checkpoint[LIGHTFMP_CHECKPOINT_KEY].get("preprocessor")
    if legacy is None:
        raise ValueError(f"{path} holds no preprocessor (no {DATAMODULE_CHECKPOINT_KEY!r} entry)")
    return {"preprocessor": legacy}


def read_preprocessor(checkpoint: dict[str, Any], path: Path) -> Preprocessor:
    """The preprocessor a stage checkpoint was made with."""
    loaded = preprocessor_from_state(checkpoint_preprocessor_state(checkpoint, path))
    assert loaded is not None
    return loaded
