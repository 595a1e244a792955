"""A finished Light-FMP run read back for use: the model of its latest stage and the preprocessing it needs.

:func:`load_run` picks the stage checkpoint in an output directory (``finetune.ckpt``, else ``pruned.ckpt``, else
``pretrain.ckpt``, or the one asked for) and returns a :class:`SavedRun`: the module in eval mode, the
preprocessor restricted to the model's (kept) fields, the stage-1 column layout and the data format of the run.
It only reads; errors name the directory or file that is missing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from lightfmp.data.preprocess import Preprocessor
from lightfmp.lightning_module import LIGHTFMP_CHECKPOINT_KEY, LightFMPModule
from lightfmp.outputs import PREPROCESSOR_FILE, PathLike, read_checkpoint, read_preprocessor

#: stage -> its checkpoint file, latest stage first (the order :func:`load_run` tries them in)
STAGE_CHECKPOINTS = {"finetune": "finetune.ckpt", "prune": "pruned.ckpt", "pretrain": "pretrain.ckpt"}

__all__ = ["STAGE_CHECKPOINTS", "SavedRun", "load_run", "stage_checkpoint_path"]


@dataclass
class SavedRun:
    """What :func:`load_run` read from a run's output directory.

    Attributes:
        stage: the stage whose model this is (``finetune``, ``prune`` or ``pretrain``).
        checkpoint: its checkpoint file.
        module: the model (eval mode, on the CPU).
        preprocessor: the fitted preprocessor restricted to the model's fields.
        layout: the stage-1 field names in the training file's order (a criteo file's columns after the label).
        data_format: the ``--data.format`` of the run, when a checkpoint records it.
    """

    stage: str
    checkpoint: Path
    module: LightFMPModule
    preprocessor: Preprocessor
    layout: tuple[str, ...]
    data_format: Optional[str]


def stage_checkpoint_path(output_dir: PathLike, stage: Optional[str] = None) -> tuple[str, Path]:
    """``(stage, path)`` of the checkpoint to use: ``stage``'s, or the latest stage's that exists.

    Raises ``FileNotFoundError`` naming the directory (missing, or without any stage checkpoint) or the file.
    """
    out = Path(output_dir)
    if not out.is_dir():
        what = "is not a directory" if out.exists() else "does not exist"
        raise FileNotFoundError(f"output_dir {str(out)!r} {what}; pass the --output_dir of a finished Light-FMP run")
    if stage is not None:
        if stage not in STAGE_CHECKPOINTS:
            raise ValueError(f"unknown stage {stage!r}; expected one of {list(STAGE_CHECKPOINTS)}")
        path = out / STAGE_CHECKPOINTS[stage]
        if not path.exists():  # a file, or a torchrec-strategy checkpoint directory (checkpoint_format dcp)
            raise FileNotFoundError(f"no {STAGE_CHECKPOINTS[stage]} in {str(out)!r}: stage {stage!r} has not run there")
        return stage, path
    for name, file in STAGE_CHECKPOINTS.items():
        if (out / file).exists():
            return name, out / file
    raise FileNotFoundError(
        f"{str(out)!r} holds no stage checkpoint (looked for {', '.join(STAGE_CHECKPOINTS.values())}); "
        "run `lightfmp pipeline` (or pretrain) with this --output_dir first"
    )


def _data_format(checkpoint: dict[str, Any]) -> Optional[str]:
    saved = checkpoint.get("datamodule_hyper_parameters") or {}
    return saved.get("format")


def load_run(output_dir: PathLike, stage: Optional[str] = None) -> SavedRun:
    """The model and preprocessing of a finished run (see the module docstring)."""
    stage, path = stage_checkpoint_path(output_dir, stage)
    checkpoint = read_checkpoint(path)
    module = LightFMPModule.from_checkpoint(checkpoint).eval()
    preprocessor = read_preprocessor(checkpoint, path)
    names = list(module.feature_spec.names)
    unknown = [n for n in names if n not in preprocessor.schema.names]
    if unknown:
        raise ValueError(f"{path} holds no preprocessing for the model's field(s) {unknown}")
    full_file = Path(output_dir) / PREPROCESSOR_FILE
    full = Preprocessor.load(full_file) if full_file.is_file() else preprocessor
    data_format = _data_format(checkpoint)
    if data_format is None and stage != "pretrain" and (Path(output_dir) / STAGE_CHECKPOINTS["pretrain"]).exists():
        data_format = _data_format(read_checkpoint(Path(output_dir) / STAGE_CHECKPOINTS["pretrain"]))
    extra = checkpoint.get(LIGHTFMP_CHECKPOINT_KEY, {})
    if extra.get("stage") not in (None, stage):
        raise ValueError(f"{path} was written by stage {extra.get('stage')!r}, expected {stage!r}")
    return SavedRun(
        stage=stage,
        checkpoint=path,
        module=module,
        preprocessor=preprocessor.select(names),
        layout=tuple(full.schema.names),
        data_format=data_format,
    )
