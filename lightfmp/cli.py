"""The ``lightfmp`` command: LightningCLI with one subcommand per stage and ``pipeline`` for all three.

::

    lightfmp pipeline --output_dir out/                                   # built-in UCI Adult data
    lightfmp pipeline --data.format criteo --data.path train.txt --output_dir out/
    lightfmp pretrain --config configs/adult.yaml --output_dir out/
    lightfmp prune    --config configs/adult.yaml --output_dir out/ --top_k 8
    lightfmp prune    --config configs/adult.yaml --output_dir out/ --top_k 6 --selection permutation
    lightfmp finetune --config configs/adult.yaml --output_dir out/
    lightfmp predict  --output_dir out/ --data.path new.csv --predictions scores.csv   # lightfmp.predict
    lightfmp export   --output_dir out/ --path model.pt2                               # lightfmp.export
    lightfmp preprocess --data.format criteo --data.path train.txt --data.cache_dir cache/   # once, then any stage

``--model.*`` configures :class:`~lightfmp.lightning_module.LightFMPModule`, ``--data.*`` the
:class:`~lightfmp.data.CTRDataModule`, ``--trainer.*`` Lightning's Trainer (one per fitting stage).
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path
from typing import Any, Optional

import lightning as L
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lightfmp import stages
from lightfmp.data.datamodule import CTRDataModule
from lightfmp.distributed import is_rank_zero
from lightfmp.lightning_module import LightFMPModule
from lightfmp.logs import stage_loggers
from lightfmp.outputs import PRUNE_ROW_NOTE, check_output_dir, summary_table
from lightfmp.selection import DEFAULT_SELECTION, check_selection

DEFAULT_OUTPUT_DIR = "lightfmp_out"
_OVERRIDES = ("lr", "weight_decay", "dropout")


def _auc(value: Optional[float]) -> str:
    """A test AUC for printing; None (one label class in the test split) is "undefined"."""
    return "undefined" if value is None else f"{value:.4f}"


class LightFMPTrainer(L.Trainer):
    """A Lightning Trainer that also runs Light-FMP's stages (used as LightningCLI subcommands).

    Each fitting stage runs on a fresh Trainer built from this one's arguments (:meth:`for_stage`: a Trainer's
    state, e.g. its epoch counter, is spent after ``fit``), whose loggers write a version named by the stage
    (:mod:`lightfmp.logs`).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._init_arguments = copy.deepcopy((args, kwargs))
        super().__init__(*args, **kwargs)

    def fresh(self, **overrides: Any) -> LightFMPTrainer:
        """A new trainer with this one's constructor arguments (deep copies) updated by ``overrides``."""
        args, kwargs = copy.deepcopy(self._init_arguments)
        kwargs.update(overrides)
        return type(self)(*args, **kwargs)

    def for_stage(self, stage: str, output_dir: str, **overrides: Any) -> LightFMPTrainer:
        """:meth:`fresh` with ``overrides`` and the loggers of ``stage`` (:func:`~lightfmp.logs.stage_loggers`)."""
        logger = copy.deepcopy(self._init_arguments[1].get("logger", True))
        return self.fresh(**overrides, logger=stage_loggers(logger, stage, output_dir))

    def pretrain(
        self,
        model: LightFMPModule,
        datamodule: CTRDataModule,
        output_dir: str = DEFAULT_OUTPUT_DIR,
        ckpt_path: Optional[str] = None,
        finetune_epochs: Optional[int] = None,
    ) -> None:
        """Stage 1: fit the model and its field gates on the pretrain subset.

        Args:
            ckpt_path: resume an interrupted stage-1 fit from this Lightning checkpoint.
            finetune_epochs: stage 3's epochs; not used here, accepted so that one config file serves every
                subcommand.
        """
        check_output_dir(output_dir)
        entry = stages.pretrain(self.for_stage("pretrain", output_dir), model, datamodule, output_dir, ckpt_path)
        rank_zero_info(f"pretrain: test AUC {_auc(entry['auc'])}, expected open fields {entry['expected_fields']:.1f}")

    def prune(
        self,
        model: LightFMPModule,
        datamodule: CTRDataModule,
        output_dir: str = DEFAULT_OUTPUT_DIR,
        checkpoint: Optional[str] = None,
        threshold: float = 0.5,
        top_k: Optional[int] = None,
        selection: str = DEFAULT_SELECTION,
        finetune_epochs: Optional[int] = None,
        allow_data_mismatch: bool = False,
    ) -> None:
        """Stage 2: drop the fields whose gate is closed (or that a selection method ranks low) and save the
        smaller model. ``finetune_epochs`` (stage 3's) is accepted and unused, so that one config file serves
        every subcommand.

        Args:
            checkpoint: stage-1 checkpoint (default: ``<output_dir>/pretrain.ckpt``).
            threshold: keep a field when its keep probability ``P(z != 0)`` exceeds this.
            top_k: keep exactly the ``top_k`` best fields instead (required by every selection but lightfmp).
            selection: who ranks the fields: lightfmp (the stage-1 gates), random, univariate, permutation,
                lasso or autofield (see lightfmp.selection); the baselines that fit a model train for the
                trainer's max_epochs on the pretrain subset.
            allow_data_mismatch: go on when the data (file content, schema, split or preprocessing options)
                differs from the data stage 1 was trained on; refused by default.
        """
        check_selection(selection, top_k)
        _, report, entry = stages.prune(
            output_dir,
            datamodule,
            checkpoint,
            threshold,
            top_k,
            selection,
            self.max_epochs,
            allow_data_mismatch,
            getattr(self.strategy, "checkpoint_format", None),  # the torchrec strategy's; else as pretrain.ckpt
        )
        if is_rank_zero():
            print(report.to_string(index=False))
            total = entry["fields"] + len(entry["dropped_fields"])
            print(
                f"kept {len(entry['kept_fields'])} of {total} fields (selection: {selection}): {entry['kept_fields']}"
            )

    def finetune(
        self,
        model: LightFMPModule,
        datamodule: CTRDataModule,
        output_dir: str = DEFAULT_OUTPUT_DIR,
        checkpoint: Optional[str] = None,
        finetune_epochs: Optional[int] = None,
        allow_data_mismatch: bool = False,
    ) -> None:
        """Stage 3: continue training the pruned model on the rest of the data (``--model.lr`` etc. apply).

        Args:
            checkpoint: pruned checkpoint (default: ``<output_dir>/pruned.ckpt``).
            finetune_epochs: epochs of this stage (default: the trainer's ``max_epochs``), as in ``pipeline``.
            allow_data_mismatch: go on when the data differs from the data stage 1 was trained on.
        """
        stages.check_fit_length("--finetune_epochs", finetune_epochs, "finetune")
        overrides = {k: model.hparams[k] for k in _OVERRIDES}
        check_output_dir(output_dir)
        epochs = {"max_epochs": finetune_epochs} if finetune_epochs is not None else {}
        trainer = self.for_stage("finetune", output_dir, **epochs)
        entry = stages.finetune(trainer, datamodule, output_dir, checkpoint, overrides, allow_data_mismatch)
        rank_zero_info(f"finetune: test AUC {_auc(entry['auc'])} with {entry['fields']} fields")

    def preprocess(self, model: LightFMPModule, datamodule: CTRDataModule, quiet: bool = False) -> None:
        """Build the data cache of ``--data.cache_dir`` (read in chunks, fit on the training split, encode) so
        that every stage given the same ``--data.*`` options maps it instead of reading the file.
        ``model`` is not used.

        Args:
            quiet: no progress bars (they show only when stderr is a terminal anyway).
        """
        if datamodule.cache_dir is None:
            raise ValueError("preprocess writes the cache of --data.cache_dir: give one")
        if quiet:
            datamodule.progress = False
        datamodule.setup()
        rank_zero_info(
            f"preprocess: {len(datamodule.train_indices)} training rows cached in {datamodule.data_cache().root}"
        )

    def pipeline(
        self,
        model: LightFMPModule,
        datamodule: CTRDataModule,
        output_dir: str = DEFAULT_OUTPUT_DIR,
        threshold: float = 0.5,
        top_k: Optional[int] = None,
        finetune_epochs: Optional[int] = None,
        selection: str = DEFAULT_SELECTION,
    ) -> None:
        """Run pretrain, prune and finetune; print the kept fields and the before/after table.

        Args:
            threshold: keep a field when its keep probability exceeds this.
            top_k: keep exactly the ``top_k`` best fields instead (required by every selection but lightfmp).
            finetune_epochs: epochs of stage 3 (default: the trainer's ``max_epochs``).
            selection: who chooses the fields in stage 2: lightfmp (default), random, univariate,
                permutation, lasso or autofield (see lightfmp.selection).
        """
        check_selection(selection, top_k)  # before stage 1, not after it
        check_output_dir(output_dir)
        stages.check_trainer_length(self, "pretrain")
        stages.check_fit_length("--finetune_epochs", finetune_epochs, "finetune")
        if datamodule.subset != "pretrain":
            datamodule = datamodule.for_subset("pretrain")
        self.pretrain(model, datamodule, output_dir)
        self.prune(model, datamodule, output_dir, None, threshold, top_k, selection)  # reuses the stage-1 data
        self.finetune(model, datamodule, output_dir, finetune_epochs=finetune_epochs)
        if is_rank_zero():
            print(f"\nLight-FMP results in {Path(output_dir).resolve()}")
            print(summary_table(output_dir).to_string(index=False))
            print(f"\n{PRUNE_ROW_NOTE}\n(summary.md and summary.csv in the output directory)")


class LightFMPCLI(LightningCLI):
    """LightningCLI whose subcommands are Light-FMP's stages."""

    @staticmethod
    @override
    def subcommands() -> dict[str, set[str]]:
        return {name: {"model", "datamodule"} for name in ("pretrain", "prune", "finetune", "pipeline", "preprocess")}

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # Stage 1 sees a small subset: smaller batches give the gates enough steps to decide (with 1024-row
        # batches and 3 epochs, no Adult field was pruned; with 256 and 5 epochs, 8 of 14 were).
        parser.set_defaults({"data.batch_size": 256})


def run_cli(args: Optional[list[str]] = None) -> LightFMPCLI:
    """Parse ``args`` (default: ``sys.argv[1:]``) and run the chosen stage; returns the CLI object."""
    return LightFMPCLI(
        LightFMPModule,
        CTRDataModule,
        trainer_class=LightFMPTrainer,
        trainer_defaults={
            "max_epochs": 5,
            "logger": True,  # a CSVLogger under <output_dir>/logs/<stage> (lightfmp.logs)
            "enable_checkpointing": False,
            "enable_model_summary": False,
        },
        save_config_callback=None,
        args=args,
    )


def main(args: Optional[list[str]] = None) -> None:
    """Console entry point ``lightfmp``; ``predict`` and ``export`` have their own parsers (they read a finished
    run and build no datamodule): :mod:`lightfmp.predict`, :mod:`lightfmp.export`."""
    args = sys.argv[1:] if args is None else args
    if args and args[0] in ("predict", "export"):
        from lightfmp import export, predict  # imported on use: the stage subcommands do not need them

        {"predict": predict.main, "export": export.main}[args[0]](args[1:])
        return
    try:
        run_cli(args)
    except BaseException:
        close_process_group()
        raise
    if close_process_group():
        # A multi-process run (plain DDP or the torchrec strategy) sometimes aborted in the interpreter's own
        # teardown, after every stage had finished and committed its files: "terminate called without an active
        # exception" (SIGABRT, a C++ thread of the native libraries destroyed while joinable; seen about 1 run in
        # 3 of tests/lightfmp/test_torchrec_strategy.py). Every output is closed and renamed into place by now,
        # so the process ends here, with status 0, without that teardown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def close_process_group() -> bool:
    """Destroy the process groups a DDP fit left behind (Lightning does not); whether there were any."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        return True
    return False


if __name__ == "__main__":
    main()
