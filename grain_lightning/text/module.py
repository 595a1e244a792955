r"""``TextModel``: a Hugging Face sequence classifier / regressor fine-tuned with GRAIN (or the plain mean).

``AutoModelForSequenceClassification.from_pretrained(pretrained, num_labels=C)`` loads the encoder and adds
a fresh head; ``num_labels=1`` is regression (MSE on standardised targets, RMSE reported in the data's unit).
Full fine-tuning, or LoRA (``lora_r``): ``peft`` adds rank-``r`` adapters to ``lora_target_modules`` and
freezes the encoder; the head stays trainable. Per-sample losses go to :class:`~grain_lightning.GrainMixin`,
which groups them (``grain.grouping``) and makes the step; ``grain.aggregation="mean"`` is plain training with
the same everything else. AdamW (no decay on biases and norms) with a linear warm-up
(``warmup_fraction`` of the optimizer steps) and linear decay to 0.

Logged: ``train_loss``, ``val_loss`` / ``test_loss`` and ``val_acc`` / ``test_acc`` (classification) or
``val_rmse`` / ``test_rmse`` (regression); ``grain/*`` diagnostics on GRAIN's own schedule.
``predict_step`` returns class ids or values in the data's unit.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics import Accuracy, MeanSquaredError
from typing_extensions import override

from grain_lightning.config import GrainConfig
from grain_lightning.mixin import GrainMixin
from grain_lightning.text.pretrained import resolve_pretrained

__all__ = ["TextModel", "monitor_of"]

_NO_DECAY = ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight")


def monitor_of(num_labels: int) -> tuple[str, str]:
    """The validation metric a run is judged by and its direction: ``("val_acc", "max")`` or ``("val_rmse", "min")``."""
    return ("val_acc", "max") if num_labels > 1 else ("val_rmse", "min")


class TextModel(GrainMixin, L.LightningModule):
    """Sequence classification (``num_labels >= 2``) or regression (``num_labels = 1``) with GRAIN.

    Args:
        pretrained: a local Hugging Face model directory, or ``"minilm"`` (the packaged all-MiniLM-L6-v2).
        num_labels: classes, or 1 for regression (the ``grain`` command links it to the data).
        lr, weight_decay, warmup_fraction: AdamW and the linear warm-up/decay schedule.
        lora_r: LoRA rank (``None``: full fine-tuning); ``lora_alpha``, ``lora_dropout``,
            ``lora_target_modules`` (default ``["query", "value"]``, BERT's attention projections).
        target_mean, target_std: regression targets are ``(y - mean) / std`` (linked to the data).
        grain: the GRAIN options (:class:`~grain_lightning.GrainConfig`).
    """

    def __init__(
        self,
        pretrained: str = "minilm",
        num_labels: int = 2,
        lr: float = 5e-5,
        weight_decay: float = 0.01,
        warmup_fraction: float = 0.1,
        lora_r: Optional[int] = None,
        lora_alpha: int = 16,
        lora_dropout: float = 0.0,
        lora_target_modules: Optional[list[str]] = None,
        target_mean: float = 0.0,
        target_std: float = 1.0,
        grain: Optional[GrainConfig] = None,
    ) -> None:
        super().__init__(grain=grain)
        if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1:
            raise ValueError(f"num_labels must be an int >= 1 (1 = regression), got {num_labels!r}")
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr!r}")
        if not 0.0 <= warmup_fraction < 1.0:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {warmup_fraction!r}")
        if lora_r is not None and (isinstance(lora_r, bool) or not isinstance(lora_r, int) or lora_r < 1):
            raise ValueError(f"lora_r must be an int >= 1 or None, got {lora_r!r}")
        if not target_std > 0:
            raise ValueError(f"target_std must be > 0, got {target_std!r}")
        self.save_hyperparameters(ignore=["grain"])
        from transformers import AutoModelForSequenceClassification
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the "newly initialized head" report is expected here
        try:
            model = AutoModelForSequenceClassification.from_pretrained(
                str(resolve_pretrained(pretrained)), num_labels=num_labels
            )
        finally:
            hf_logging.set_verbosity(verbosity)
        if lora_r is not None:
            model = self._with_lora(model, lora_r, lora_alpha, lora_dropout, lora_target_modules or ["query", "value"])
        self.model = model.train()  # from_pretrained returns eval mode; Lightning keeps submodules' modes
        self.regression = num_labels == 1
        # in the state dict, so a checkpoint predicts in the unit of the data it was trained on, whatever data
        # module is attached at predict time
        self.register_buffer("target_mean", torch.tensor(float(target_mean), dtype=torch.float64))
        self.register_buffer("target_std", torch.tensor(float(target_std), dtype=torch.float64))
        metric = (
            (lambda: MeanSquaredError(squared=False))
            if self.regression
            else (lambda: Accuracy(task="multiclass", num_classes=num_labels))
        )
        self.val_metric, self.test_metric = metric(), metric()

    @staticmethod
    def _with_lora(model: torch.nn.Module, r: int, alpha: int, dropout: float, targets: list[str]) -> torch.nn.Module:
        import peft

        head = [n for n, _ in model.named_parameters() if n.split(".")[0] in ("classifier", "score")]
        wrapped = peft.get_peft_model(
            model, peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets)
        )
        trainable = {f"base_model.model.{n}" for n in head}
        for name, param in wrapped.named_parameters():
            if name in trainable:
                param.requires_grad_(True)
        return wrapped

    @override
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``(n, C)`` logits, or ``(n,)`` standardised predictions for regression."""
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        return logits.squeeze(-1) if self.regression else logits

    def _losses(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        out = self(batch["input_ids"], batch["attention_mask"])
        if self.regression:
            return F.mse_loss(out, batch["labels"].float(), reduction="none"), out
        return F.cross_entropy(out, batch["labels"], reduction="none"), out

    @override
    def grain_losses(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._losses(batch)[0]

    target_mean: torch.Tensor
    target_std: torch.Tensor

    def _unscale(self, values: torch.Tensor) -> torch.Tensor:
        return values * self.target_std.to(values.dtype) + self.target_mean.to(values.dtype)

    def _evaluate(self, batch: dict[str, torch.Tensor], prefix: str, metric: Any) -> None:
        losses, out = self._losses(batch)
        n = losses.shape[0]
        self.log(f"{prefix}_loss", losses.mean(), on_epoch=True, batch_size=n, prog_bar=True)
        if self.regression:
            metric.update(self._unscale(out.float()), self._unscale(batch["labels"].float()))
            self.log(f"{prefix}_rmse", metric, on_epoch=True, batch_size=n, prog_bar=True)
        else:
            metric.update(out, batch["labels"])
            self.log(f"{prefix}_acc", metric, on_epoch=True, batch_size=n, prog_bar=True)

    @override
    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_metric)

    @override
    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_metric)

    @override
    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        out = self(batch["input_ids"], batch["attention_mask"])
        return self._unscale(out.float()) if self.regression else out.argmax(-1)

    def _optimizer_steps(self) -> int:
        """Optimizer steps of the fit: ``ceil(batches / N)`` per epoch (GRAIN steps a partial last cycle too, ``N =
        grain.accumulate_grad_batches``) times the epochs, capped by ``max_steps`` (counted in optimizer steps
        under manual optimization)."""
        trainer = self.trainer
        _ = trainer.estimated_stepping_batches  # loads the train loader: num_training_batches is known after it
        per_epoch = math.ceil(trainer.num_training_batches / self.grain_config.accumulate_grad_batches)
        steps = per_epoch * trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else math.inf
        if trainer.max_steps is not None and trainer.max_steps > 0:
            steps = min(steps, trainer.max_steps)
        if math.isinf(steps):
            raise ValueError("TextModel's schedule needs Trainer(max_epochs) or Trainer(max_steps)")
        return max(1, int(steps))

    @override
    def configure_optimizers(self) -> Any:
        from transformers import get_linear_schedule_with_warmup

        decay: list[torch.nn.Parameter] = []
        no_decay: list[torch.nn.Parameter] = []
        for name, param in self.named_parameters():
            if param.requires_grad:
                (no_decay if name.endswith(_NO_DECAY) else decay).append(param)
        groups = [
            {"params": decay, "weight_decay": self.hparams["weight_decay"]},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=self.hparams["lr"])
        steps = self._optimizer_steps()
        warmup = int(self.hparams["warmup_fraction"] * steps)
        scheduler = get_linear_schedule_with_warmup(optimizer, warmup, steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
