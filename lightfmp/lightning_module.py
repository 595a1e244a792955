"""``LightFMPModule``: a click-through LightningModule with an optional hard-concrete field mask.

The pretrain stage (``field_mask=True``) trains the backbone and one gate per field together; the loss is
``BCEWithLogits(model(x, z), y) + gate.penalty()`` with ``z ~ HardConcrete(log_alpha)`` sampled per row.
Evaluation uses the deterministic gate. The finetune stage (``field_mask=False``) is plain training of the
pruned model.

The network is built from a :class:`~lightfmp.inputs.ModelInputs`: given as ``feature_spec`` (a dict, as saved
in checkpoints) or taken from ``trainer.datamodule.feature_spec`` in ``setup()``. The spec is stored in the
hyper-parameters, so ``LightFMPModule.load_from_checkpoint(path)`` rebuilds the same network.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable, Sequence
from typing import Any, Optional

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchmetrics.aggregation import SumMetric
from typing_extensions import override

from lightfmp.backbones import BACKBONES, CTRBackbone, build_backbone
from lightfmp.gates import HardConcreteGate
from lightfmp.inputs import CTRBatch, ModelInputs
from lightfmp.metrics import BinaryAUC, BinaryLogLoss

LIGHTFMP_CHECKPOINT_KEY = "lightfmp"

__all__ = ["LIGHTFMP_CHECKPOINT_KEY", "LightFMPModule", "evaluate"]


class LightFMPModule(L.LightningModule):
    """Click-through model for Light-FMP's stages.

    Args:
        backbone: one of ``"mlp"``, ``"dlrm"``, ``"dcnv2"``, ``"deepfm"``.
        embedding_dim: width of every embedding table.
        hidden: MLP widths (the over arch for DLRM, the deep part for DCN-v2 and DeepFM).
        dense_hidden: DLRM dense-arch widths before the final ``embedding_dim`` layer.
        cross_layers: number of DCN-v2 cross layers.
        dropout: dropout after each hidden layer (MLP, DCN-v2, DeepFM).
        lr, weight_decay: AdamW settings of the backbone (embedding tables included).
        field_mask: train a hard-concrete gate per field (stage 1).
        l0_weight: L0 price per field (fraction of all fields) when no ``target_fields``.
        target_fields: target count (>= 1) or fraction (< 1) of kept fields, enforced by a Lagrangian.
        init_keep_probability: initial ``P(z != 0)`` of every gate.
        gate_lr: learning rate of the gates (own optimizer group, no weight decay).
        dual_lr: step of the dual ascent on the Lagrange multipliers (target mode).
        l0_warmup: fraction of the training steps over which the L0 penalty ramps in from 0 (the weight grows
            linearly, or the target moves from the initial expected count to ``target_fields``); gates that
            close before the embeddings have learned anything would never reopen.
        feature_spec: the network's inputs (``ModelInputs.to_dict()``); filled in from the datamodule if None.
    """

    def __init__(
        self,
        backbone: str = "dcnv2",
        embedding_dim: int = 16,
        hidden: Sequence[int] = (256, 128),
        dense_hidden: Sequence[int] = (64,),
        cross_layers: int = 2,
        dropout: float = 0.0,
        lr: float = 1e-2,
        weight_decay: float = 0.0,
        field_mask: bool = True,
        l0_weight: float = 0.02,
        target_fields: Optional[float] = None,
        init_keep_probability: float = 0.9,
        gate_lr: float = 0.05,
        l0_warmup: float = 0.3,
        dual_lr: float = 0.01,
        feature_spec: Optional[dict[str, Any]] = None,
    ) -> None:
        super().__init__()
        if backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {backbone!r}; expected one of {sorted(BACKBONES)}")
        if lr <= 0 or gate_lr <= 0:
            raise ValueError(f"lr and gate_lr must be > 0, got lr={lr}, gate_lr={gate_lr}")
        self.save_hyperparameters()
        # typed copies of the hyper-parameters read below (``self.hparams`` keeps them for checkpoints and the CLI)
        self.backbone = backbone
        self.embedding_dim = embedding_dim
        self.hidden = tuple(hidden)
        self.dense_hidden = tuple(dense_hidden)
        self.cross_layers = cross_layers
        self.dropout = dropout
        self.lr = lr
        self.weight_decay = weight_decay
        self.field_mask = field_mask
        self.l0_weight = l0_weight
        self.target_fields = target_fields
        self.init_keep_probability = init_keep_probability
        self.gate_lr = gate_lr
        self.l0_warmup = l0_warmup
        self.dual_lr = dual_lr
        self.net: Optional[CTRBackbone] = None
        self.gate: Optional[HardConcreteGate] = None
        self.val_auc, self.val_logloss = BinaryAUC(), BinaryLogLoss()  # AUC NaN when a split has one class
        self.test_auc, self.test_logloss = BinaryAUC(), BinaryLogLoss()
        self.test_samples = SumMetric()
        self.checkpoint_extra: Optional[dict[str, Any]] = None  # stage information saved under "lightfmp"
        self.eval_gates: Optional[torch.Tensor] = None  # (F,) gates replacing the field mask's in eval (evaluate)
        if feature_spec is not None:
            self._build(ModelInputs.from_dict(feature_spec))

    # ----------------------------------------------------------------- construction
    @property
    def feature_spec(self) -> ModelInputs:
        if self.net is None:
            raise RuntimeError("the network is not built yet: give feature_spec or fit with a datamodule")
        return self.net.spec

    def _backbone_kwargs(self) -> dict[str, Any]:
        common = {"embedding_dim": self.embedding_dim}
        return {
            "mlp": {**common, "hidden": self.hidden, "dropout": self.dropout},
            "dlrm": {**common, "dense_hidden": self.dense_hidden, "over_hidden": self.hidden},
            "dcnv2": {**common, "cross_layers": self.cross_layers, "hidden": self.hidden, "dropout": self.dropout},
            "deepfm": {**common, "hidden": self.hidden, "dropout": self.dropout},
        }[self.backbone]

    def _build(self, spec: ModelInputs) -> None:
        self.net = build_backbone(self.backbone, spec, **self._backbone_kwargs())
        self.hparams["feature_spec"] = spec.to_dict()
        if self.field_mask:
            self.gate = HardConcreteGate(
                spec.names,
                init_keep_probability=self.init_keep_probability,
                l0_weight=self.l0_weight,
                target_fields=self.target_fields,
            )

    @override
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        data_spec = getattr(datamodule, "feature_spec", None)
        if self.net is None:
            if data_spec is None:
                raise RuntimeError("LightFMPModule needs feature_spec, or a datamodule with a feature_spec")
            self._build(data_spec)
        elif data_spec is not None and data_spec != self.net.spec:
            raise ValueError(
                "the model and the data disagree on the fields: model "
                f"{list(self.net.spec.names)}, data {list(data_spec.names)} "
                "(was the checkpoint made from another schema?)"
            )

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.checkpoint_extra is not None:
            checkpoint[LIGHTFMP_CHECKPOINT_KEY] = self.checkpoint_extra

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get(self.CHECKPOINT_HYPER_PARAMS_KEY, {}).get("feature_spec")
        if saved is None:
            raise ValueError("this checkpoint has no feature_spec: it was not written by LightFMPModule")
        spec = ModelInputs.from_dict(saved)
        if self.net is None:
            self._build(spec)
        elif spec != self.net.spec:
            raise ValueError(
                f"checkpoint fields {list(spec.names)} differ from this model's {list(self.net.spec.names)}"
            )

    @classmethod
    def from_checkpoint(cls, checkpoint: dict[str, Any], **overrides: Any) -> LightFMPModule:
        """The module saved in an already loaded ``checkpoint`` dict (what ``load_from_checkpoint`` does after
        reading the file): constructor arguments from its hyper-parameters updated by ``overrides``, then
        ``on_load_checkpoint`` and a strict ``load_state_dict``."""
        hparams = {**checkpoint.get(cls.CHECKPOINT_HYPER_PARAMS_KEY, {}), **overrides}
        accepted = inspect.signature(cls.__init__).parameters
        module = cls(**{k: v for k, v in hparams.items() if k in accepted and k != "self"})
        module.on_load_checkpoint(checkpoint)
        module.load_state_dict(checkpoint["state_dict"])
        return module

    def pruned(self, keep: Iterable[str]) -> LightFMPModule:
        """A new module without a mask that only consumes ``keep`` (weights copied, see ``CTRBackbone.prune``)."""
        net = self._require_net().prune(keep)
        hp = {k: v for k, v in self.hparams.items() if not k.startswith("_")}  # LightningCLI adds _instantiator
        hp.update(field_mask=False, feature_spec=net.spec.to_dict())
        new = LightFMPModule(**hp)
        new.net = net
        return new

    def _require_net(self) -> CTRBackbone:
        if self.net is None:
            raise RuntimeError("the network is not built yet: give feature_spec or fit with a datamodule")
        return self.net

    def num_parameters(self) -> int:
        """Parameters of the backbone (gates and multipliers excluded; whole tables when they are sharded)."""
        net = self._require_net()
        dense = sum(p.numel() for name, p in net.named_parameters() if not name.startswith("embeddings."))
        return dense + net.embeddings.num_parameters()

    # ----------------------------------------------------------------- forward and steps
    @override
    def forward(self, batch: CTRBatch, gates: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits ``(B,)``. With a field mask and no explicit ``gates``, samples (train) or uses test gates (eval),
        or ``eval_gates`` (F,) in eval mode when set."""
        net = self._require_net()
        if gates is None and self.eval_gates is not None and not self.training:
            gates = self.eval_gates.to(batch.dense.device).unsqueeze(0).expand(batch.dense.shape[0], -1)
        if gates is None and self.gate is not None:
            trainer = self._trainer  # None outside a fit; under DDP the gate noise is that of the global batch
            replicas = (trainer.world_size, trainer.global_rank) if trainer is not None and self.training else (1, 0)
            gates = self.gate(batch.dense.shape[0], replicas)
        return net(batch.dense, batch.sparse, gates)

    @override
    def training_step(self, batch: CTRBatch, batch_idx: int) -> torch.Tensor:
        logits = self(batch)
        bce = F.binary_cross_entropy_with_logits(logits, batch.labels)
        loss = bce
        bs = len(batch)
        if self.gate is not None:
            loss = loss + self.gate.penalty(self._l0_progress())
            self.log("expected_fields", self.gate.expected_l0().detach(), on_step=True, batch_size=bs)
        self.log("train_bce", bce.detach(), on_step=True, prog_bar=True, batch_size=bs)
        return loss

    @override
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.gate is not None:
            self.gate.dual_step(self.dual_lr, self._l0_progress())
            last = batch_idx + 1 == self.trainer.num_training_batches
            every = self.trainer.log_every_n_steps  # type: ignore[attr-defined]  # set in Trainer.__init__, unannotated
            if self.global_step % max(every, 1) == 0 or last:
                self._log_keep_probabilities()

    def _log_keep_probabilities(self) -> None:
        """One curve per field, ``keep_probability/<field>``, on the Trainer's ``log_every_n_steps`` and at the end
        of each epoch. Written to the loggers directly (rank 0 only; the gates are the same on every rank), not
        through ``self.log``, which would synchronise every field across ranks at every step."""
        assert self.gate is not None
        keep = self.gate.keep_probability().detach().tolist()
        metrics = {f"keep_probability/{name}": p for name, p in zip(self.gate.names, keep)}
        for logger in self.loggers:
            logger.log_metrics(metrics, step=self.global_step)

    @override
    def on_train_start(self) -> None:
        total = self.trainer.estimated_stepping_batches
        self._total_steps = None if not total or total == float("inf") else float(total)

    def _l0_progress(self) -> float:
        warmup, total = self.l0_warmup, getattr(self, "_total_steps", None)
        if warmup <= 0 or total is None:
            return 1.0
        return min(1.0, self.global_step / (warmup * total))

    @override
    def validation_step(self, batch: CTRBatch, batch_idx: int) -> None:
        logits = self(batch)
        self.val_auc.update(logits, batch.labels.long())
        self.val_logloss.update(logits, batch.labels)
        self.log_dict({"val_auc": self.val_auc, "val_logloss": self.val_logloss}, prog_bar=True, batch_size=len(batch))

    @override
    def test_step(self, batch: CTRBatch, batch_idx: int) -> None:
        logits = self(batch)
        self.test_auc.update(logits, batch.labels.long())
        self.test_logloss.update(logits, batch.labels)
        self.log_dict({"test_auc": self.test_auc, "test_logloss": self.test_logloss}, batch_size=len(batch))
        self.test_samples.update(len(batch))
        self.log("test_samples", self.test_samples, batch_size=len(batch))  # summed over ranks (a torchmetric)

    @override
    def predict_step(self, batch: CTRBatch, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        """Scores ``(B,)``: the probability of label 1 (sigmoid of the logits; labels are not read). With a field
        mask, the deterministic test-time gates apply (Lightning's predict loop runs in eval mode)."""
        return torch.sigmoid(self(batch))

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        groups: list[dict[str, Any]] = [
            {"params": list(self._require_net().parameters()), "lr": self.lr, "weight_decay": self.weight_decay}
        ]
        if self.gate is not None:
            groups.append({"params": self.gate.gate_parameters(), "lr": self.gate_lr, "weight_decay": 0.0})
        return torch.optim.AdamW(groups)


def _as_is(batch: CTRBatch) -> CTRBatch:
    return batch


def evaluate(
    model: LightFMPModule,
    loader: Iterable[CTRBatch],
    gates: Optional[torch.Tensor] = None,
    trainer: Optional[L.Trainer] = None,
) -> dict[str, Any]:
    """AUC, LogLoss and sample count over a whole loader, by Lightning's test loop (``trainer.test``: the module's
    ``test_step`` and torchmetrics states, synchronised across ranks; the scores also go to ``trainer``'s loggers).

    ``gates`` (F,) replace the model's own field mask (e.g. 0/1 gates); ``trainer``: the stage's (default: a
    quiet one on the CPU, no logger). ``auc`` is None when the loader's labels hold a single class (AUC is
    undefined there).
    """
    if trainer is None:
        trainer = L.Trainer(
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
    if not isinstance(loader, DataLoader):  # e.g. a list of batches, which Lightning would read as many loaders
        loader = DataLoader(list(loader), batch_size=None, collate_fn=_as_is)  # type: ignore[arg-type]
    model.eval_gates = gates
    try:
        results = trainer.test(model, dataloaders=loader, verbose=False)
    finally:
        model.eval_gates = None
    if not results or not results[0].get("test_samples"):
        raise ValueError("evaluate() got an empty loader")
    scores = results[0]
    auc = float(scores["test_auc"])
    return {
        "auc": None if math.isnan(auc) else auc,
        "logloss": float(scores["test_logloss"]),
        "samples": int(scores["test_samples"]),
    }
