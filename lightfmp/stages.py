"""Light-FMP's three stages: what each one does. Where their outputs go is :mod:`lightfmp.outputs`.

=========== =====================================================
stage       does
=========== =====================================================
pretrain    fit backbone + field gates on ``pretrain_fraction``
prune       keep fields with ``P(z != 0) > threshold`` (or the top k by a selection method)
finetune    fit the pruned model on the rest of the train split
=========== =====================================================

Each stage reads its input checkpoint once, writes its files (see :mod:`lightfmp.outputs`) and returns its
``metrics.json`` entry. Inputs are checked before any work: a fitting stage refuses a trainer that would not
train (``max_epochs`` or ``max_steps`` 0) and training rows of a single label class; prune and finetune refuse
data other than stage 1's (:mod:`lightfmp.data.fingerprint`). The files are written through
:func:`lightfmp.staging.staged_outputs`: a stage that fails or is killed leaves the previous outputs as they were.

Under DDP (``--trainer.strategy ddp --trainer.devices N``) every rank runs every stage: the fits and the test
scores are data-parallel (rows sharded, metrics synchronised), prune's selection is computed on every rank and
rank 0's is used by all, and rank 0 alone writes (:mod:`lightfmp.distributed`).
"""

from __future__ import annotations

import math
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import lightning as L
import pandas as pd
import torch
from lightning.pytorch.callbacks import Callback

from lightfmp.callbacks import TrainingThroughput
from lightfmp.data.datamodule import CTRDataModule
from lightfmp.data.fingerprint import CONTENT_OPTIONS, check_same_data, data_fingerprint
from lightfmp.distributed import broadcast, rank, world_size
from lightfmp.lightning_module import LIGHTFMP_CHECKPOINT_KEY, LightFMPModule, evaluate
from lightfmp.outputs import (
    KEEP_PROBABILITIES_FILE,
    PathLike,
    check_output_dir,
    checkpoint_preprocessor_state,
    metrics_entry,
    read_checkpoint,
    read_preprocessor,
    save_checkpoint,
    stage_checkpoint,
    write_feature_report,
    write_preprocessor,
)
from lightfmp.plots import plot_keep_probabilities
from lightfmp.selection import (
    DEFAULT_SELECTION,
    SelectionContext,
    check_selection,
    constant_fields,
    get_method,
    rank_fields,
)
from lightfmp.staging import staged_outputs

__all__ = ["check_fit_length", "check_trainer_length", "finetune", "pretrain", "prune", "timed_fit"]


def check_fit_length(option: str, value: Optional[int], stage: str) -> None:
    """Refuse a training length of 0 (``option`` as the user typed it, e.g. ``--trainer.max_epochs``): the stage
    would record the test scores of an untrained model and an undefined throughput."""
    if value == 0:
        raise ValueError(
            f"{option} 0: stage {stage!r} would not train; expected a positive number (or -1 for no limit)"
        )


def check_trainer_length(trainer: L.Trainer, stage: str) -> None:
    """:func:`check_fit_length` of the trainer's ``max_epochs`` and ``max_steps``."""
    check_fit_length("--trainer.max_epochs", trainer.max_epochs, stage)
    check_fit_length("--trainer.max_steps", trainer.max_steps, stage)


#: fewer optimizer steps per epoch than this get a warning (Criteo's config on a 20k-row file trained stage 1 on
#: less than one batch per epoch and gave AUC 0.50)
MIN_STEPS_PER_EPOCH = 20


def warn_small_training(datamodule: CTRDataModule, stage: str) -> None:
    """Warn when the rows a fitting stage trains on are fewer than one batch, or give fewer than
    :data:`MIN_STEPS_PER_EPOCH` optimizer steps per epoch, naming the numbers and the options to change."""
    rows, batch = datamodule.num_train_samples, datamodule.batch_size
    steps = math.ceil(rows / batch)
    if steps >= MIN_STEPS_PER_EPOCH:
        return
    smaller = max(1, rows // MIN_STEPS_PER_EPOCH)
    what = f"fewer than one batch ({batch})" if rows < batch else f"{steps} optimizer steps per epoch at batch {batch}"
    more = " or raise --data.pretrain_fraction" if datamodule.subset == "pretrain" else ""
    warnings.warn(
        f"stage {stage!r} trains on {rows} rows (subset {datamodule.subset!r}): {what}; the gates and embeddings "
        f"may not learn (AUC near 0.5). Lower --data.batch_size (to {smaller} for {MIN_STEPS_PER_EPOCH} steps per "
        f"epoch){more}, or use more data",
        UserWarning,
        stacklevel=2,
    )


def timed_fit(
    trainer: L.Trainer, module: LightFMPModule, datamodule: L.LightningDataModule, ckpt_path: Optional[str] = None
) -> TrainingThroughput:
    """``trainer.fit`` in one process, measured by a :class:`TrainingThroughput` callback; an interrupted fit
    raises."""
    throughput = TrainingThroughput()
    callbacks: list[Callback] = trainer.callbacks  # type: ignore[attr-defined]  # set in Trainer.__init__, unannotated
    callbacks.append(throughput)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    finally:
        callbacks.remove(throughput)
    if trainer.interrupted:
        raise RuntimeError("training was interrupted; the stage's outputs were not written")
    return throughput


#: under several processes without ``--data.cache_dir``, the data is encoded once into this cache directory of
#: the output directory (:meth:`CTRDataModule.share_across_processes`)
SHARED_CACHE = "data_cache"


def pretrain(
    trainer: L.Trainer,
    module: LightFMPModule,
    datamodule: CTRDataModule,
    output_dir: PathLike,
    ckpt_path: Optional[str] = None,
) -> dict[str, Any]:
    """Stage 1: fit backbone and field gates on the datamodule's pretrain subset.

    Writes ``pretrain.ckpt`` and ``preprocessor.json``. ``ckpt_path``: resume an interrupted stage-1 fit from a
    full Lightning checkpoint (e.g. one written by a ``ModelCheckpoint`` callback); the default starts from
    scratch. The data is read (and its training labels checked) before the output directory is touched.
    """
    check_output_dir(output_dir)
    check_trainer_length(trainer, "pretrain")
    if not module.field_mask:
        raise ValueError("pretrain needs a model with field_mask=True")
    datamodule.share_across_processes(trainer.world_size, Path(output_dir) / SHARED_CACHE)
    if datamodule.subset != "pretrain":
        datamodule = datamodule.for_subset("pretrain")
    datamodule.setup("fit")  # reads the data; refuses training labels of one class
    warn_small_training(datamodule, "pretrain")
    fingerprint = data_fingerprint(_options(datamodule))
    throughput = timed_fit(trainer, module, datamodule, ckpt_path)
    scores = evaluate(module, datamodule.test_dataloader(), trainer=trainer)
    with staged_outputs(Path(output_dir), "pretrain") as staged:  # after the fit: under DDP, every rank is up
        assert datamodule.preprocessor is not None  # fitted by the datamodule's setup
        if staged.writer:
            write_preprocessor(staged.directory, datamodule.preprocessor)
        save_checkpoint(trainer, module, staged.path("pretrain.ckpt"), {"stage": "pretrain", "data": fingerprint})
        entry = metrics_entry(module, scores, throughput)
        entry["expected_fields"] = float(module.gate.expected_l0().detach()) if module.gate is not None else None
        staged.commit(entry)
    return entry


def _options(datamodule: CTRDataModule) -> dict[str, Any]:
    return {k: v for k, v in dict(getattr(datamodule, "hparams", {}) or {}).items() if not k.startswith("_")}


def _check_stage1_data(datamodule: CTRDataModule, ckpt: dict[str, Any], ckpt_path: Path, allow: bool) -> None:
    """Refuse data other than stage 1's (:func:`~lightfmp.data.fingerprint.check_same_data`); a checkpoint from
    before fingerprints is compared on the options Lightning saved with it, not on the file's content."""
    current = data_fingerprint(_options(datamodule))
    saved = ckpt[LIGHTFMP_CHECKPOINT_KEY].get("data")
    if saved is None and ckpt.get("datamodule_hyper_parameters"):
        hparams = ckpt["datamodule_hyper_parameters"]
        saved = {**current, **{k: hparams[k] for k in CONTENT_OPTIONS if k in hparams}}
    differ = check_same_data(saved, current, ckpt_path, allow)
    if differ:
        warnings.warn(
            f"--allow_data_mismatch: going on with data other than stage 1's ({'; '.join(differ)})",
            UserWarning,
            stacklevel=3,
        )


def prune(
    output_dir: PathLike,
    datamodule: CTRDataModule,
    checkpoint: Optional[PathLike] = None,
    threshold: float = 0.5,
    top_k: Optional[int] = None,
    selection: str = DEFAULT_SELECTION,
    selection_epochs: Optional[int] = None,
    allow_data_mismatch: bool = False,
    checkpoint_format: Optional[str] = None,
) -> tuple[LightFMPModule, pd.DataFrame, dict[str, Any]]:
    """Stage 2: keep the fields chosen by ``selection`` and build the smaller model from the stage-1 checkpoint.

    ``selection`` names a method of :mod:`lightfmp.selection`: ``"lightfmp"`` (default) keeps the fields whose
    gate keep probability exceeds ``threshold``, or the ``top_k`` most probable; any other method scores the
    fields from the stage-1 data and/or model and keeps its ``top_k`` best (``top_k`` is required).
    ``selection_epochs``: epochs of the methods that fit a model of their own (default 5).
    ``allow_data_mismatch``: go on (with a warning) when ``datamodule``'s data is not stage 1's.
    ``checkpoint_format``: ``pruned.ckpt`` as one file (``file``) or a ``torch.distributed.checkpoint`` directory
    (``dcp``, every rank writing its part under DDP); default: the format of the stage-1 checkpoint read.

    Writes ``pruned.ckpt``, ``feature_report.csv`` (a ``score`` column from the method, and ``selection``) and
    ``keep_probabilities.png``.
    Returns the pruned module, the per-field report and the metrics entry (with ``selection`` and
    ``selection_seconds``): the test scores of the stage-1 model with its gates fixed to 0/1, which the pruned
    model reproduces exactly (``CTRBackbone.prune``). They are computed on ``datamodule``'s test split if it is
    already set up with stage 1's fields (as after :func:`pretrain`), so the data is not read again; otherwise
    on a copy set up with stage 1's preprocessor.
    """
    check_selection(selection, top_k)
    if checkpoint_format not in (None, "file", "dcp"):
        raise ValueError(f"checkpoint_format must be 'file' or 'dcp', got {checkpoint_format!r}")
    out = check_output_dir(output_dir)
    ckpt_path = stage_checkpoint(out, checkpoint, "pretrain.ckpt", "pretrain")
    sharded = ckpt_path.is_dir() if checkpoint_format is None else checkpoint_format == "dcp"
    ckpt = read_checkpoint(ckpt_path)
    masked = LightFMPModule.from_checkpoint(ckpt)
    if masked.gate is None:
        raise ValueError(f"{ckpt_path} holds a model without field gates; prune needs the stage-1 checkpoint")
    fields = len(masked.feature_spec.names)
    if top_k is not None and top_k > fields:
        raise ValueError(f"top_k={top_k} is more than the stage-1 model's {fields} fields")
    _check_stage1_data(datamodule, ckpt, ckpt_path, allow_data_mismatch)
    if datamodule.encoded is None:
        datamodule.share_across_processes(world_size(), out / SHARED_CACHE)
        datamodule = datamodule.for_subset("pretrain", preprocessor=read_preprocessor(ckpt, ckpt_path))
        datamodule.setup("test")
    if datamodule.feature_spec != masked.feature_spec:
        raise ValueError(
            f"the data's fields {list(datamodule.feature_spec.names)} differ from the stage-1 model's "
            f"{list(masked.feature_spec.names)}"
        )
    start = time.perf_counter()
    if selection == DEFAULT_SELECTION:
        report = masked.gate.report(threshold=threshold, top_k=top_k)
        report.insert(1, "score", report["keep_probability"])
    else:
        assert top_k is not None  # check_selection
        context = SelectionContext.from_datamodule(masked, datamodule, selection_epochs)
        report = rank_fields(masked.feature_spec.names, get_method(selection).scores(context), top_k)
        keep_probability = dict(zip(masked.gate.names, masked.gate.keep_probability().detach().double().tolist()))
        report["keep_probability"] = report["field"].map(keep_probability)  # stage-1 gates, for reference
    selection_seconds = time.perf_counter() - start
    report = broadcast(report)  # under DDP every rank computed it; rank 0's decision is the one used everywhere
    report["selection"] = selection
    constant = constant_fields(SelectionContext.from_datamodule(masked, datamodule))
    report["constant"] = report["field"].isin(constant)
    kept_constant = list(report.loc[report.kept & report.constant, "field"])
    if kept_constant:
        warnings.warn(
            f"selection {selection!r} keeps fields with a single value in the pretrain subset, which carry no "
            f"information: {kept_constant} (see the 'constant' column of feature_report.csv)",
            UserWarning,
            stacklevel=2,
        )
    kept = [n for n in masked.feature_spec.names if n in set(report.loc[report.kept, "field"])]
    if not kept:
        best = report.iloc[0]
        raise ValueError(
            f"pruning with threshold={threshold} would remove every field (highest keep probability: "
            f"{best.field}={best.keep_probability:.3f}); lower the threshold, set top_k, or weaken the L0 penalty"
        )
    pruned_module = masked.pruned(kept)
    gates = torch.tensor([float(n in kept) for n in masked.feature_spec.names])
    test = datamodule.evaluation_loader("test", replicas=(world_size(), rank()))  # sharded under DDP, synced
    scores = evaluate(masked, test, gates=gates)
    entry = metrics_entry(pruned_module, scores, None)
    entry["kept_fields"] = kept
    entry["dropped_fields"] = [n for n in masked.feature_spec.names if n not in kept]
    entry["parameters_before"] = masked.num_parameters()
    entry["selection"] = selection
    entry["selection_seconds"] = selection_seconds
    extra = {"stage": "prune", "kept_fields": kept, "source": str(ckpt_path), "selection": selection}
    if "data" in ckpt[LIGHTFMP_CHECKPOINT_KEY]:
        extra["data"] = ckpt[LIGHTFMP_CHECKPOINT_KEY]["data"]
    line = threshold if selection == DEFAULT_SELECTION and top_k is None else None
    with staged_outputs(out, "prune") as staged:
        if staged.writer:
            write_feature_report(staged.directory, report)
            plot_keep_probabilities(report, staged.path(KEEP_PROBABILITIES_FILE), line)
        if staged.writer or sharded:  # a sharded checkpoint is written by every rank
            preprocessor = checkpoint_preprocessor_state(ckpt, ckpt_path)
            save_checkpoint(None, pruned_module, staged.path("pruned.ckpt"), extra, preprocessor, sharded)
        staged.commit(entry)
    return pruned_module, report, entry


def finetune(
    trainer: L.Trainer,
    datamodule: CTRDataModule,
    output_dir: PathLike,
    checkpoint: Optional[PathLike] = None,
    overrides: Optional[dict[str, Any]] = None,
    allow_data_mismatch: bool = False,
) -> dict[str, Any]:
    """Stage 3: continue training the pruned model on the rest of the train split, reading only kept fields.

    Writes ``finetune.ckpt``. ``overrides``: optimisation hyper-parameters (lr, weight_decay, dropout) to
    replace the checkpoint's. ``allow_data_mismatch``: go on (with a warning) when ``datamodule``'s data is not
    stage 1's.
    """
    out = check_output_dir(output_dir)
    check_trainer_length(trainer, "finetune")
    ckpt_path = stage_checkpoint(out, checkpoint, "pruned.ckpt", "prune")
    ckpt = read_checkpoint(ckpt_path)
    extra = ckpt[LIGHTFMP_CHECKPOINT_KEY]
    if "kept_fields" not in extra:
        raise ValueError(f"{ckpt_path} is not a pruned checkpoint (stage {extra.get('stage')!r})")
    _check_stage1_data(datamodule, ckpt, ckpt_path, allow_data_mismatch)
    module = LightFMPModule.from_checkpoint(ckpt, **(overrides or {}))
    datamodule.share_across_processes(trainer.world_size, out / SHARED_CACHE)
    dm = datamodule.for_subset("finetune", fields=extra["kept_fields"], preprocessor=read_preprocessor(ckpt, ckpt_path))
    dm.setup("fit")  # reads the data; refuses training labels of one class
    warn_small_training(dm, "finetune")
    stage_extra = {k: v for k, v in extra.items() if k != "preprocessor"}  # older checkpoints kept it there
    throughput = timed_fit(trainer, module, dm)
    scores = evaluate(module, dm.test_dataloader(), trainer=trainer)
    with staged_outputs(out, "finetune") as staged:
        save_checkpoint(trainer, module, staged.path("finetune.ckpt"), {**stage_extra, "stage": "finetune"})
        entry = metrics_entry(module, scores, throughput)
        staged.commit(entry)
    return entry
