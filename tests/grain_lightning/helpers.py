"""Small models and data for the Lightning tests (module-level classes: picklable)."""

from __future__ import annotations

import copy
from typing import Any, Optional

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from grain_lightning import GrainConfig, GrainMixin


def make_data(n: int = 64, d: int = 6, classes: int = 3, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    w = torch.randn(d, classes, generator=g)
    y = (x @ w + 0.5 * torch.randn(n, classes, generator=g)).argmax(1)
    return TensorDataset(x, y)


def loader(ds: TensorDataset, batch_size: int = 16) -> DataLoader:
    return DataLoader(ds, batch_size=batch_size, shuffle=False)


def make_net(d: int = 6, classes: int = 3, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(d, 8), torch.nn.Tanh(), torch.nn.Linear(8, classes))


def make_optim(params, kind: str, lr: float):
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if kind == "momentum":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.01)


class PlainModule(L.LightningModule):
    """Ordinary automatic-optimization module: the baseline GRAIN must reproduce with one group."""

    def __init__(self, net: torch.nn.Module, optim: str = "sgd", lr: float = 0.1, scheduler: bool = False):
        super().__init__()
        self.net, self.optim, self.lr, self.scheduler = copy.deepcopy(net), optim, lr, scheduler

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        opt = make_optim(self.parameters(), self.optim, self.lr)
        if not self.scheduler:
            return opt
        return {
            "optimizer": opt,
            "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.StepLR(opt, 2, 0.5), "interval": "step"},
        }


class GrainModule(GrainMixin, L.LightningModule):
    def __init__(
        self,
        net: torch.nn.Module,
        optim: str = "sgd",
        lr: float = 0.1,
        scheduler: bool = False,
        grain: Optional[GrainConfig] = None,
        nan_at_step: Optional[int] = None,
    ):
        super().__init__(grain=grain)
        self.net, self.optim, self.lr, self.scheduler = copy.deepcopy(net), optim, lr, scheduler
        self.nan_at_step = nan_at_step
        self.val_seen = 0

    def grain_losses(self, batch, batch_idx):
        x, y = batch
        losses = F.cross_entropy(self.net(x), y, reduction="none")
        if self.nan_at_step is not None and batch_idx == self.nan_at_step:
            losses = losses * float("nan")
        return losses

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.val_seen += x.shape[0]
        self.log("val_loss", F.cross_entropy(self.net(x), y))

    def configure_optimizers(self):
        return PlainModule.configure_optimizers(self)


class ParamRecorder(L.Callback):
    """Records a flat copy of the parameters after every training batch."""

    def __init__(self) -> None:
        self.params: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.params.append(torch.cat([p.detach().reshape(-1).clone() for p in pl_module.parameters()]))


def trainer(**kw) -> L.Trainer:
    base = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        max_epochs=1,
        num_sanity_val_steps=0,
    )
    base.update(kw)
    return L.Trainer(**base)
