"""The ``grain`` command: fine-tune a pretrained text model with GRAIN, and sweep seeds x methods x learning rates.

    grain fit --model.pretrained minilm --data.path reviews.csv --data.text_column "Review Text" \\
        --data.label_column "Recommended IND" --model.grain.grouping 4
    grain fit ... --print_config > cfg.yaml
    grain sweep --config cfg.yaml --seeds 10 --methods mean,grain-sample,grain-chunks4 --output_dir OUT

``fit`` / ``validate`` / ``test`` / ``predict`` are LightningCLI subcommands over :class:`TextModel` and
:class:`TextDataModule` (``--model.pretrained`` is linked to ``--data.tokenizer`` and ``--data.task`` to
``--model.task``; the data gives the model its ``num_labels`` and regression target scale). ``--result_json
PATH`` makes ``fit`` validate and test the final weights and write the run's result
(:mod:`grain_lightning.text.result`), which ``sweep`` collects.
The default logger is TensorBoard (``<default_root_dir>/lightning_logs``).
"""

from __future__ import annotations

import sys
import time
from typing import Optional

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from typing_extensions import override

__all__ = ["GrainCLI", "main"]


class GrainCLI(LightningCLI):
    """LightningCLI for :class:`~grain_lightning.text.TextModel` with a result file for sweeps."""

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--result_json", type=Optional[str], default=None,
            help="fit only: validate and test the final weights and write the run's result here (used by grain sweep)",
        )  # fmt: skip
        parser.link_arguments("model.pretrained", "data.tokenizer")
        parser.link_arguments("data.task", "model.task")
        parser.link_arguments("data.num_labels", "model.num_labels", apply_on="instantiate")
        parser.link_arguments("data.target_mean", "model.target_mean", apply_on="instantiate")
        parser.link_arguments("data.target_std", "model.target_std", apply_on="instantiate")

    def _result_path(self) -> Optional[str]:
        return self.config.get(self.subcommand, {}).get("result_json") if self.subcommand else None

    def before_fit(self) -> None:
        """With ``--result_json``: record the validation curve and the fit's wall time."""
        from grain_lightning.text.result import ValidationCurve

        self._curve = ValidationCurve()
        if self._result_path():
            has_split = getattr(self.datamodule, "has_split", None)
            if has_split is not None and not has_split("test"):
                raise ValueError(
                    "--result_json tests the final weights, but the data has no test split: give --data.test_path "
                    "or --data.path with --data.test_fraction > 0"
                )
            self.trainer.callbacks.append(self._curve)  # type: ignore[attr-defined]
        self._fit_start = time.perf_counter()

    def after_fit(self) -> None:
        """With ``--result_json``: validate and test the final weights, write ``result.json``."""
        path = self._result_path()
        if not path:
            return
        from grain_lightning.text.module import monitor_of
        from grain_lightning.text.result import run_result, write_json

        wall_s = time.perf_counter() - self._fit_start
        monitor, mode = monitor_of(self.model.task)
        seed = self.config[self.subcommand].get("seed_everything")
        result = run_result(
            self.trainer, self.model, self.datamodule, monitor=monitor, mode=mode, wall_s=wall_s,
            curve=self._curve.points, seed=seed if isinstance(seed, int) and not isinstance(seed, bool) else None,
            lr=float(self.model.hparams["lr"]),
        )  # fmt: skip
        if self.trainer.is_global_zero:
            write_json(path, result)


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point of the ``grain`` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["sweep"]:
        from grain_lightning.sweep import main as sweep_main

        raise SystemExit(sweep_main(args[1:]))
    from grain_lightning.text.data import TextDataModule
    from grain_lightning.text.module import TextModel

    GrainCLI(TextModel, TextDataModule, args=argv, save_config_kwargs={"overwrite": True})  # None: sys.argv


if __name__ == "__main__":
    main()
