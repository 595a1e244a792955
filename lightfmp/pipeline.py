"""Light-FMP's three stages and what each writes into the output directory.

=========== ===================================================== ==========================================
stage       does                                                  writes
=========== ===================================================== ==========================================
pretrain    fit backbone + field gates on ``pretrain_fraction``   ``pretrain.ckpt``, ``preprocessor.json``
prune       keep fields with ``P(z != 0) > threshold`` (or top k) ``pruned.ckpt``, ``feature_report.csv``
finetune    fit the pruned model on the rest of the train split   ``finetune.ckpt``
=========== ===================================================== ==========================================

Each stage adds its entry to ``metrics.json`` (test AUC and LogLoss, number of fields, parameters, training
seconds, training samples per second) only once all its files are in place; files are written to a temporary
name first and renamed. Starting a stage removes the outputs of that stage and of the later ones, so a failed
run never leaves stale files that look complete.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Optional

import lightning as L
import pandas as pd
import torch
from lightning.pytorch.callbacks import Callback

from lightfmp.data.preprocess import Preprocessor
from lightfmp.module import LIGHTFMP_CHECKPOINT_KEY, LightFMPModule, evaluate

STAGES = ("pretrain", "prune", "finetune")
STAGE_FILES = {
    "pretrain": ("pretrain.ckpt", "preprocessor.json"),
    "prune": ("pruned.ckpt", "feature_report.csv"),
    "finetune": ("finetune.ckpt",),
}
METRICS_FILE = "metrics.json"


class TrainingThroughput(Callback):
    """Seconds of ``fit``'s training loop (wall clock, and CPU time of this process, which is less sensitive to
    other jobs on a shared machine) and the number of training samples it consumed."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.cpu_seconds = 0.0
        self.samples = 0
        self._start: Optional[float] = None
        self._cpu_start = 0.0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()
        self._cpu_start = time.process_time()
        self.samples = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.samples += len(batch)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._start is not None:
            self.seconds = time.perf_counter() - self._start
            self.cpu_seconds = time.process_time() - self._cpu_start

    @property
    def samples_per_second(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else float("nan")


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def _clear_from(output_dir: Path, stage: str) -> None:
    """Remove the files and metrics of ``stage`` and of every later stage."""
    later = STAGES[STAGES.index(stage) :]
    for s in later:
        for name in STAGE_FILES[s]:
            (output_dir / name).unlink(missing_ok=True)
    metrics = read_metrics(output_dir)
    if any(s in metrics for s in later):
        for s in later:
            metrics.pop(s, None)
        _atomic(output_dir / METRICS_FILE, lambda p: p.write_text(json.dumps(metrics, indent=2)))


def read_metrics(output_dir: str | Path) -> dict[str, Any]:
    path = Path(output_dir) / METRICS_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def _record(output_dir: Path, stage: str, entry: dict[str, Any]) -> None:
    metrics = read_metrics(output_dir)
    metrics[stage] = entry
    _atomic(output_dir / METRICS_FILE, lambda p: p.write_text(json.dumps(metrics, indent=2)))


def _save_checkpoint(trainer: Optional[L.Trainer], module: LightFMPModule, path: Path, extra: dict[str, Any]) -> None:
    """A Lightning checkpoint (loadable by ``LightFMPModule.load_from_checkpoint``) plus ``extra`` under 'lightfmp'."""
    if trainer is not None:
        def write(tmp: Path) -> None:
            module.checkpoint_extra = extra  # added by LightFMPModule.on_save_checkpoint
            try:
                trainer.save_checkpoint(tmp, weights_only=True)
            finally:
                module.checkpoint_extra = None
    else:
        def write(tmp: Path) -> None:
            torch.save(
                {
                    "state_dict": module.state_dict(),
                    LightFMPModule.CHECKPOINT_HYPER_PARAMS_KEY: dict(module.hparams),
                    "pytorch-lightning_version": L.__version__,
                    LIGHTFMP_CHECKPOINT_KEY: extra,
                },
                tmp,
            )
    _atomic(path, write)


def _stage_input(
    output_dir: str | Path, checkpoint: Optional[str | Path], default_name: str, previous_stage: str
) -> tuple[Path, Path, dict[str, Any]]:
    """The output directory, the input checkpoint (default: the previous stage's) and its Light-FMP entry."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = Path(checkpoint) if checkpoint is not None else out / default_name
    if not ckpt_path.exists():
        raise FileNotFoundError(
            f"no {default_name} at {ckpt_path}; run `lightfmp {previous_stage}` first or pass --checkpoint"
        )
    return out, ckpt_path, _lightfmp_extra(ckpt_path)


def _lightfmp_extra(path: Path) -> dict[str, Any]:
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if LIGHTFMP_CHECKPOINT_KEY not in ckpt:
        raise ValueError(f"{path} is not a Light-FMP checkpoint (no {LIGHTFMP_CHECKPOINT_KEY!r} entry)")
    return ckpt[LIGHTFMP_CHECKPOINT_KEY]


def _entry(module: LightFMPModule, scores: dict[str, float], throughput: Optional[TrainingThroughput]) -> dict[str, Any]:
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
    return entry


def _single_process(trainer: L.Trainer) -> None:
    if trainer.world_size > 1:
        raise ValueError(
            f"Light-FMP's stages run in one process (they write the output directory from it); got a trainer with "
            f"world_size={trainer.world_size}. Use --trainer.devices 1 --trainer.num_nodes 1"
        )


def _fit(
    trainer: L.Trainer, module: LightFMPModule, datamodule: L.LightningDataModule, ckpt_path: Optional[str] = None
) -> TrainingThroughput:
    _single_process(trainer)
    throughput = TrainingThroughput()
    trainer.callbacks.append(throughput)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    finally:
        trainer.callbacks.remove(throughput)
    if trainer.interrupted:
        raise RuntimeError("training was interrupted; the stage's outputs were not written")
    return throughput


def pretrain(
    trainer: L.Trainer, module: LightFMPModule, datamodule, output_dir: str | Path, ckpt_path: Optional[str] = None
) -> dict[str, Any]:
    """Stage 1: fit backbone and field gates on the datamodule's pretrain subset.

    ``ckpt_path``: resume an interrupted stage-1 fit from a full Lightning checkpoint (e.g. one written by a
    ``ModelCheckpoint`` callback); the default starts from scratch.
    """
    _single_process(trainer)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    _clear_from(out, "pretrain")
    if not module.hparams.field_mask:
        raise ValueError("pretrain needs a model with field_mask=True")
    if datamodule.hparams.stage != "pretrain":
        datamodule = datamodule.for_stage("pretrain")
    throughput = _fit(trainer, module, datamodule, ckpt_path)
    scores = evaluate(module, datamodule.test_dataloader())
    preprocessor = datamodule.preprocessor.state_dict()
    _atomic(out / "preprocessor.json", lambda p: p.write_text(json.dumps(preprocessor)))
    _save_checkpoint(trainer, module, out / "pretrain.ckpt", {"stage": "pretrain", "preprocessor": preprocessor})
    entry = _entry(module, scores, throughput)
    entry["expected_fields"] = float(module.gate.expected_l0().detach()) if module.gate is not None else None
    _record(out, "pretrain", entry)
    return entry


def prune(
    output_dir: str | Path,
    datamodule,
    checkpoint: Optional[str | Path] = None,
    threshold: float = 0.5,
    top_k: Optional[int] = None,
) -> tuple[LightFMPModule, pd.DataFrame, dict[str, Any]]:
    """Stage 2: keep the open fields of the stage-1 checkpoint and build the smaller model.

    Returns the pruned module, the per-field report and the metrics entry: the test scores of the stage-1
    model with its gates fixed to 0/1, which the pruned model reproduces exactly (``CTRBackbone.prune``).
    They are computed on ``datamodule``'s test split if it is already set up with stage 1's fields (as after
    :func:`pretrain`), so the data is not read again; otherwise on a copy set up with stage 1's preprocessor.
    """
    out, ckpt_path, extra = _stage_input(output_dir, checkpoint, "pretrain.ckpt", "pretrain")
    _clear_from(out, "prune")
    masked = LightFMPModule.load_from_checkpoint(ckpt_path, map_location="cpu")
    if masked.gate is None:
        raise ValueError(f"{ckpt_path} holds a model without field gates; prune needs the stage-1 checkpoint")
    report = masked.gate.report(threshold=threshold, top_k=top_k)
    kept = [n for n in masked.feature_spec.names if n in set(report.loc[report.kept, "field"])]
    if not kept:
        best = report.iloc[0]
        raise ValueError(
            f"pruning with threshold={threshold} would remove every field (highest keep probability: "
            f"{best.field}={best.keep_probability:.3f}); lower the threshold, set top_k, or weaken the L0 penalty"
        )
    pruned_module = masked.pruned(kept)
    if datamodule.encoded is None:
        datamodule = datamodule.for_stage("pretrain", preprocessor=Preprocessor.from_state_dict(extra["preprocessor"]))
        datamodule.setup("test")
    if datamodule.feature_spec != masked.feature_spec:
        raise ValueError(
            f"the data's fields {list(datamodule.feature_spec.names)} differ from the stage-1 model's "
            f"{list(masked.feature_spec.names)}"
        )
    gates = torch.tensor([float(n in kept) for n in masked.feature_spec.names])
    scores = evaluate(masked, datamodule.test_dataloader(), gates=gates)
    _atomic(out / "feature_report.csv", lambda p: report.to_csv(p, index=False))
    _save_checkpoint(
        None, pruned_module, out / "pruned.ckpt",
        {"stage": "prune", "preprocessor": extra["preprocessor"], "kept_fields": kept, "source": str(ckpt_path)},
    )
    entry = _entry(pruned_module, scores, None)
    entry["kept_fields"] = kept
    entry["dropped_fields"] = [n for n in masked.feature_spec.names if n not in kept]
    entry["parameters_before"] = masked.num_parameters()
    _record(out, "prune", entry)
    return pruned_module, report, entry


def finetune(
    trainer: L.Trainer,
    datamodule,
    output_dir: str | Path,
    checkpoint: Optional[str | Path] = None,
    overrides: Optional[dict[str, Any]] = None,
) -> dict[str, Any]:
    """Stage 3: continue training the pruned model on the rest of the train split, reading only kept fields.

    ``overrides``: optimisation hyper-parameters (lr, weight_decay, dropout) to replace the checkpoint's.
    """
    _single_process(trainer)
    out, ckpt_path, extra = _stage_input(output_dir, checkpoint, "pruned.ckpt", "prune")
    if "kept_fields" not in extra:
        raise ValueError(f"{ckpt_path} is not a pruned checkpoint (stage {extra.get('stage')!r})")
    _clear_from(out, "finetune")
    module = LightFMPModule.load_from_checkpoint(ckpt_path, map_location="cpu", **(overrides or {}))
    dm = datamodule.for_stage(
        "finetune", fields=extra["kept_fields"], preprocessor=Preprocessor.from_state_dict(extra["preprocessor"])
    )
    throughput = _fit(trainer, module, dm)
    scores = evaluate(module, dm.test_dataloader())
    _save_checkpoint(trainer, module, out / "finetune.ckpt", {**extra, "stage": "finetune"})
    entry = _entry(module, scores, throughput)
    _record(out, "finetune", entry)
    return entry


def summary_table(output_dir: str | Path) -> pd.DataFrame:
    """Before/after table from ``metrics.json``: one row per finished stage."""
    metrics = read_metrics(output_dir)
    rows = []
    for stage in STAGES:
        if stage in metrics:
            m = metrics[stage]
            rows.append(
                {
                    "stage": stage,
                    "fields": m["fields"],
                    "parameters": m["parameters"],
                    "test_auc": round(m["auc"], 4),
                    "test_logloss": round(m["logloss"], 4),
                    "train_seconds": round(m["train_seconds"], 1) if "train_seconds" in m else None,
                    "samples_per_second": round(m["samples_per_second"]) if "samples_per_second" in m else None,
                }
            )
    return pd.DataFrame(rows)
