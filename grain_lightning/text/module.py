r"""``TextModel``: a Hugging Face text model fine-tuned with GRAIN (or the plain mean): sequence classification,
regression, or causal language modelling.

Classification / regression: ``AutoModelForSequenceClassification.from_pretrained(pretrained, num_labels=C)``
loads the encoder and adds a fresh head; ``num_labels=1`` is regression (MSE on standardised targets, RMSE
reported in the data's unit). Causal language modelling (``task="causal_lm"``):
``AutoModelForCausalLM.from_pretrained(pretrained)`` (e.g. GPT-2, its LM head kept), labels are the input ids
with padding ``-100``, a sample's loss is its token-mean next-token loss and the metric is the perplexity of the
split, ``exp`` of the token-mean loss over all its predicted tokens (:mod:`grain_lightning.text.perplexity`).
Full fine-tuning, or LoRA (``lora_r``): ``peft`` adds rank-``r`` adapters to ``lora_target_modules`` and
freezes the rest; a classification head stays trainable. Per-sample losses go to
:class:`~grain_lightning.GrainMixin`, which groups them (``grain.grouping``) and makes the step;
``grain.aggregation="mean"`` is plain training with the same everything else. AdamW (no decay on biases, norms
and other 1-D parameters) with a linear warm-up (``warmup_fraction`` of the optimizer steps) and linear decay to 0.

Logged: ``train_loss``, ``val_loss`` / ``test_loss`` (mean per-sample loss) and ``val_acc`` / ``test_acc``
(classification), ``val_rmse`` / ``test_rmse`` (regression) or ``val_ppl`` / ``test_ppl`` (causal LM);
``grain/*`` diagnostics on GRAIN's own schedule. ``predict_step`` returns class ids, values in the data's unit,
or (causal LM) each text's token-mean loss.
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
from grain_lightning.text.perplexity import TokenPerplexity, sample_losses, token_nll
from grain_lightning.text.pretrained import resolve_pretrained

__all__ = ["MODEL_TASKS", "TextModel", "monitor_of"]

_NO_DECAY = ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight")
#: what a ``TextModel`` does
MODEL_TASKS = ("classification", "regression", "causal_lm")
_MONITORS = {"classification": ("val_acc", "max"), "regression": ("val_rmse", "min"), "causal_lm": ("val_ppl", "min")}


def monitor_of(task: str) -> tuple[str, str]:
    """The validation metric a run of ``task`` is judged by and its direction: ``("val_acc", "max")``,
    ``("val_rmse", "min")`` or ``("val_ppl", "min")``."""
    if task not in _MONITORS:
        raise ValueError(f"task must be one of {MODEL_TASKS}, got {task!r}")
    return _MONITORS[task]


def _resolve_task(task: Optional[str], num_labels: int) -> str:
    """``task``, or (``None``) the one ``num_labels`` implies; refuses a ``num_labels`` that does not fit it."""
    if task is not None and task not in MODEL_TASKS:
        raise ValueError(f"task must be one of {MODEL_TASKS} or None, got {task!r}")
    if task == "causal_lm":
        return task
    if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1:
        raise ValueError(f"num_labels must be an int >= 1 (1 = regression), got {num_labels!r}")
    implied = "regression" if num_labels == 1 else "classification"
    if task is not None and task != implied:
        need = "== 1" if task == "regression" else ">= 2"
        raise ValueError(f"task={task!r} needs num_labels {need}, got {num_labels}")
    return implied


class TextModel(GrainMixin, L.LightningModule):
    """Sequence classification (``num_labels >= 2``), regression (``num_labels = 1``) or causal language
    modelling (``task="causal_lm"``) with GRAIN.

    Args:
        pretrained: a local Hugging Face model directory, or ``"minilm"`` (the packaged all-MiniLM-L6-v2).
        num_labels: classes, or 1 for regression (the ``grain`` command links it to the data); not used by
            ``causal_lm``.
        task: ``"classification"``, ``"regression"`` or ``"causal_lm"`` (the ``grain`` command links it to
            ``--data.task``); ``None``: regression if ``num_labels == 1``, else classification.
        lr, weight_decay, warmup_fraction: AdamW and the linear warm-up/decay schedule.
        lora_r: LoRA rank (``None``: full fine-tuning); ``lora_alpha``, ``lora_dropout``,
            ``lora_target_modules`` (default ``["query", "value"]``, BERT's attention projections, for
            classification/regression; ``peft``'s default for the architecture for ``causal_lm``, e.g. GPT-2's
            ``c_attn``).
        target_mean, target_std: regression targets are ``(y - mean) / std`` (linked to the data).
        grain: the GRAIN options (:class:`~grain_lightning.GrainConfig`).
    """

    def __init__(
        self,
        pretrained: str = "minilm",
        num_labels: int = 2,
        task: Optional[str] = None,
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
        resolved = _resolve_task(task, num_labels)
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr!r}")
        if not 0.0 <= warmup_fraction < 1.0:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {warmup_fraction!r}")
        if lora_r is not None and (isinstance(lora_r, bool) or not isinstance(lora_r, int) or lora_r < 1):
            raise ValueError(f"lora_r must be an int >= 1 or None, got {lora_r!r}")
        if not target_std > 0:
            raise ValueError(f"target_std must be > 0, got {target_std!r}")
        self.save_hyperparameters(ignore=["grain"])
        self.task = resolved
        self.regression = resolved == "regression"
        self.causal_lm = resolved == "causal_lm"
        model = self._load(str(resolve_pretrained(pretrained)), num_labels)
        if lora_r is not None:
            targets = lora_target_modules or (None if self.causal_lm else ["query", "value"])
            model = self._with_lora(model, lora_r, lora_alpha, lora_dropout, targets)
        self.model = model.train()  # from_pretrained returns eval mode; Lightning keeps submodules' modes
        # in the state dict, so a checkpoint predicts in the unit of the data it was trained on, whatever data
        # module is attached at predict time
        self.register_buffer("target_mean", torch.tensor(float(target_mean), dtype=torch.float64))
        self.register_buffer("target_std", torch.tensor(float(target_std), dtype=torch.float64))
        metric: Any = (
            TokenPerplexity
            if self.causal_lm
            else (lambda: MeanSquaredError(squared=False))
            if self.regression
            else (lambda: Accuracy(task="multiclass", num_classes=num_labels))
        )
        self.val_metric, self.test_metric = metric(), metric()

    def _load(self, path: str, num_labels: int) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
        from transformers.utils import logging as hf_logging

        if self.causal_lm:
            return AutoModelForCausalLM.from_pretrained(path)
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the "newly initialized head" report is expected here
        try:
            return AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)
        finally:
            hf_logging.set_verbosity(verbosity)

    @staticmethod
    def _with_lora(
        model: torch.nn.Module, r: int, alpha: int, dropout: float, targets: Optional[list[str]]
    ) -> torch.nn.Module:
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
        """``(n, C)`` logits, ``(n,)`` standardised predictions for regression, or ``(n, T, V)`` next-token logits."""
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        return logits.squeeze(-1) if self.regression else logits

    def _token_nll(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Causal LM: ``(nll, mask)``, ``(n, T - 1)`` each (:func:`~grain_lightning.text.perplexity.token_nll`)."""
        return token_nll(self(batch["input_ids"], batch["attention_mask"]), batch["labels"])

    def _losses(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        out = self(batch["input_ids"], batch["attention_mask"])
        if self.regression:
            return F.mse_loss(out, batch["labels"].float(), reduction="none"), out
        return F.cross_entropy(out, batch["labels"], reduction="none"), out

    @override
    def grain_losses(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """``(n,)`` per-sample losses: cross-entropy, squared error, or a text's token-mean next-token loss."""
        if self.causal_lm:
            return sample_losses(*self._token_nll(batch))
        return self._losses(batch)[0]

    target_mean: torch.Tensor
    target_std: torch.Tensor

    def _unscale(self, values: torch.Tensor) -> torch.Tensor:
        return values * self.target_std.to(values.dtype) + self.target_mean.to(values.dtype)

    def _evaluate(self, batch: dict[str, torch.Tensor], prefix: str, metric: Any) -> None:
        if self.causal_lm:
            nll, mask = self._token_nll(batch)
            losses = sample_losses(nll, mask)
            self.log(f"{prefix}_loss", losses.mean(), on_epoch=True, batch_size=losses.shape[0], prog_bar=True)
            metric.update(nll, mask)
            self.log(f"{prefix}_ppl", metric, on_epoch=True, batch_size=losses.shape[0], prog_bar=True)
            return
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
        if self.causal_lm:
            return sample_losses(*self._token_nll(batch))
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
                (no_decay if param.dim() < 2 or name.endswith(_NO_DECAY) else decay).append(param)
        groups = [
            {"params": decay, "weight_decay": self.hparams["weight_decay"]},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=self.hparams["lr"])
        steps = self._optimizer_steps()
        warmup = int(self.hparams["warmup_fraction"] * steps)
        scheduler = get_linear_schedule_with_warmup(optimizer, warmup, steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
