"""Multi-process CPU (gloo) fits under ``grain_fsdp``, for tests/grain_lightning/distributed/test_fsdp.py.

Usage: ``python tests/grain_lightning/distributed/fsdp_worker.py OUTDIR SCENARIO [SCENARIO ...]`` with
``MASTER_PORT`` set (``GRAIN_TEST_DEVICES=3`` for three ranks). As ``ddp_worker.py``: Lightning's popen
launcher re-runs this command as the other ranks, rank ``r`` of ``R`` trains on samples ``r, r + R, ...``,
every rank runs every scenario and writes ``OUTDIR/<scenario>_rank<r>.pt`` with the *full* parameters (the
shards gathered on every rank) before training and after every batch, the counters and the error, if any.
"""

from __future__ import annotations

import os
import sys
import traceback
from datetime import timedelta
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from grain_lightning import GrainConfig, GrainFSDPStrategy, GrainMixin, PerSample  # noqa: E402
from tests.grain_lightning.distributed import ddp_worker as W  # noqa: E402

VOCAB, SEQ, GPT_N = 64, 8, 24  # tiny GPT-2: 24 sequences of 8 tokens, batches of 4 per rank


def flat_params(module: torch.nn.Module) -> torch.Tensor:
    """All parameters, full (a collective: every rank calls it at the same point)."""
    return torch.cat(
        [(p.full_tensor() if isinstance(p, DTensor) else p).detach().reshape(-1).clone() for p in module.parameters()]
    )


class Recorder(W.Recorder):
    def on_train_start(self, trainer, pl_module) -> None:
        if not self.params:
            self.params.append(flat_params(pl_module))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.params.append(flat_params(pl_module))


def gpt2_model() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=VOCAB,
        n_positions=SEQ,
        n_embd=32,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    return GPT2LMHeadModel(cfg).double()


def gpt2_data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randint(0, VOCAB, (GPT_N, SEQ), generator=g))


class TinyGPT2(L.LightningModule):
    """A random-config GPT-2 language model (no hub access); its blocks are FSDP units."""

    def __init__(self) -> None:
        super().__init__()
        self.model = gpt2_model()

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        return self.model(input_ids=ids, labels=ids).loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=W.LR)


class Mixin(W.WithMixin):
    """ddp_worker's GrainMixin module (two chunks of each rank's batch are its groups), without the self-check
    unless ``self_check`` is given."""

    def __init__(
        self, self_check=False, accumulate: int = 1, engine: str = "auto", blockwise: bool = False, **kw
    ) -> None:
        super().__init__(accumulate=accumulate, **kw)
        self.grain_config.self_check = self_check
        self.grain_config.engine = engine
        self.grain_config.blockwise = blockwise


class GPT2Mixin(GrainMixin, L.LightningModule):
    """The tiny GPT-2 with per-sample groups (each sequence's mean token loss is one group)."""

    def __init__(self) -> None:
        super().__init__(grain=GrainConfig(grouping=PerSample(), log_loss_as=None, self_check=False))
        self.model = gpt2_model()

    def grain_losses(self, batch, batch_idx):
        (ids,) = batch
        logits = self.model(input_ids=ids).logits[:, :-1]
        tokens = F.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1), reduction="none")
        return tokens.view(ids.shape[0], -1).mean(1)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=W.LR)


class ShardsItself(W.Plain):
    """Shards its Linear layers and its net in ``configure_model``, as ModelParallelStrategy asks."""

    def configure_model(self) -> None:
        from torch.distributed.fsdp import FSDPModule, fully_shard

        if isinstance(self.net, FSDPModule):
            return
        mesh = self.device_mesh["data_parallel"]
        fully_shard(self.net[0], mesh=mesh)
        fully_shard(self.net[2], mesh=mesh)
        fully_shard(self.net, mesh=mesh)


def fsdp(**kw) -> GrainFSDPStrategy:
    return GrainFSDPStrategy(timeout=timedelta(seconds=60), **kw)


LINEAR = dict(wrap=("Linear",))  # the net's two Linear layers are two FSDP units (two exchanges per step)
SCENARIOS = {
    "sharded": dict(strategy=dict(**LINEAR)),
    "blockwise": dict(strategy=dict(mode="blockwise", **LINEAR)),
    "root_only": dict(strategy=dict()),  # no ModuleList: the net is one FSDP unit
    "configure_model": dict(strategy=dict(), shards_itself=True),
    "step_norm": dict(strategy=dict(step_norm="mean", **LINEAR)),
    "ddp": dict(ddp=True),
    "accum_clip": dict(
        strategy=dict(**LINEAR),
        batch_size=W.BATCH // 2,
        trainer=dict(accumulate_grad_batches=2, gradient_clip_val=0.05),
    ),
    "nonfinite_skip": dict(strategy=dict(on_nonfinite="skip", **LINEAR), module=dict(nan_at=(1, 1))),
    "nonfinite_raise": dict(strategy=dict(**LINEAR), module=dict(nan_at=(1, 1))),
    "mixin": dict(strategy=dict(**LINEAR), mixin=True),  # each Linear an FSDP unit (FSDPLinear)
    "mixin_root": dict(strategy=dict(), mixin=True),  # the net one unit: its Linears run unsharded in backward
    "mixin_blockwise": dict(strategy=dict(mode="blockwise", reshard_after_forward=False, **LINEAR), mixin=True),
    "mixin_ddp": dict(ddp=True, mixin=True),
    "mixin_mean": dict(strategy=dict(**LINEAR), mixin=True, module=dict(aggregation="mean")),
    "mixin_nonfinite_skip": dict(strategy=dict(on_nonfinite="skip", **LINEAR), mixin=True, module=dict(nan_at=(1, 1))),
    # one backward per group, every group's gradient exchanged (global groups, reference engine, accumulation)
    "mixin_global": dict(strategy=dict(mixin_groups="global", **LINEAR), mixin=True),
    "mixin_global_ddp": dict(ddp=True, strategy=dict(mixin_groups="global"), mixin=True),
    "mixin_global_accumulate": dict(
        strategy=dict(mixin_groups="global", **LINEAR), mixin=True, batch_size=W.BATCH // 2, module=dict(accumulate=2)
    ),
    "mixin_accumulate": dict(strategy=dict(**LINEAR), mixin=True, batch_size=W.BATCH // 2, module=dict(accumulate=2)),
    "mixin_mean_accumulate": dict(
        strategy=dict(**LINEAR), mixin=True, batch_size=W.BATCH // 2, module=dict(accumulate=2, aggregation="mean")
    ),
    "mixin_reference": dict(strategy=dict(), mixin=True, module=dict(engine="reference")),
    "mixin_self_check": dict(strategy=dict(**LINEAR), mixin=True, module=dict(self_check="first")),
    # GrainConfig(blockwise=True): one min-norm problem per module (Linear), every group exchanged as shards
    "mixin_module_blocks": dict(strategy=dict(**LINEAR), mixin=True, module=dict(blockwise=True)),
    "mixin_module_blocks_ddp": dict(ddp=True, mixin=True, module=dict(blockwise=True)),
    "mixin_module_blocks_global": dict(
        strategy=dict(mixin_groups="global", **LINEAR), mixin=True, module=dict(blockwise=True)
    ),
    "mixin_module_blocks_by_parameter": dict(strategy=dict(mode="blockwise"), mixin=True, module=dict(blockwise=True)),
    "mixin_module_blocks_global_ddp_refused": dict(
        ddp=True, strategy=dict(mixin_groups="global"), mixin=True, module=dict(blockwise=True)
    ),
    "gpt2_mixin": dict(strategy=dict(), gpt2_mixin=True),
    "gpt2_mixin_ddp": dict(ddp=True, gpt2_mixin=True),
    "gpt2": dict(strategy=dict(), gpt2=True),
    "gpt2_ddp": dict(ddp=True, gpt2=True),
}


def run_scenario(name: str, out: Path) -> None:
    if name == "resume":
        return run_resume(out)
    if name == "load":
        return run_load(out)
    spec = SCENARIOS.get(name)
    if spec is None:
        raise SystemExit(f"unknown scenario {name!r}; known: {sorted(SCENARIOS) + ['resume', 'load']}")
    if spec.get("gpt2") or spec.get("gpt2_mixin"):
        module: L.LightningModule = GPT2Mixin() if spec.get("gpt2_mixin") else TinyGPT2()
        data = DataLoader(gpt2_data(), batch_size=4, sampler=W.RankSamples(GPT_N))
    else:
        cls = Mixin if spec.get("mixin") else ShardsItself if spec.get("shards_itself") else W.Plain
        module = cls(**spec.get("module", {}))
        data = W.make_loader(spec.get("batch_size", W.BATCH))
    strat = W.strategy(**spec.get("strategy", {})) if spec.get("ddp") else fsdp(**spec["strategy"])
    rec = Recorder()
    trainer = W.make_trainer(strat, [rec], **spec.get("trainer", {}))
    error = None
    try:
        trainer.fit(module, data)
    except (FloatingPointError, ValueError, TypeError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    save(out, name, trainer, strat, rec.params, error)


def run_resume(out: Path) -> None:
    """Two epochs straight vs one epoch, a sharded checkpoint, and a resumed second epoch (SGD, momentum)."""
    straight, strat = Recorder(), fsdp(**LINEAR)
    trainer = W.make_trainer(strat, [straight], max_epochs=2)
    trainer.fit(W.Plain(momentum=0.9), W.make_loader())
    trainer.save_checkpoint(out / "final.ckpt")  # for "load": another world size reads it
    first = W.make_trainer(fsdp(**LINEAR), [], max_epochs=1)
    first.fit(W.Plain(momentum=0.9), W.make_loader())
    first.save_checkpoint(out / "epoch1.ckpt")
    resumed_rec, resumed_strat = Recorder(), fsdp(**LINEAR)
    resumed = W.make_trainer(resumed_strat, [resumed_rec], max_epochs=2)
    resumed.fit(W.Plain(momentum=0.9), W.make_loader(), ckpt_path=str(out / "epoch1.ckpt"))
    save(out, "resume", resumed, resumed_strat, resumed_rec.params, None, straight=straight.params)


def run_load(out: Path) -> None:
    """Resume ``final.ckpt`` (written by ``resume``, possibly at another world size) for one more epoch."""
    rec, strat = Recorder(), fsdp(**LINEAR)
    trainer = W.make_trainer(strat, [rec], max_epochs=3)
    trainer.fit(W.Plain(momentum=0.9), W.make_loader(), ckpt_path=str(Path(os.environ["GRAIN_TEST_CKPT"])))
    save(out, "load", trainer, strat, rec.params, None)


def save(out: Path, name: str, trainer: L.Trainer, strat, params, error, **extra) -> None:
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("grain")}
    record = dict(
        params=params,
        bytes_sent=strat.bytes_sent,
        calls=dict(strat.comm.calls),
        num_combines=strat.num_combines,
        skipped_steps=strat.skipped_steps,
        policy_steps=strat.policy.steps,
        metrics=metrics,
        error=error,
        rank=trainer.global_rank,
        **extra,
    )
    torch.save(record, out / f"{name}_rank{trainer.global_rank}.pt")


def main(argv: list[str]) -> None:
    out = Path(argv[0])
    for name in argv[1:]:
        try:
            run_scenario(name, out)
        except Exception:  # record and go on: the other ranks do the same, or the process group times out
            (out / f"{name}_rank{os.environ.get('LOCAL_RANK', '0')}.err").write_text(traceback.format_exc())
            raise


if __name__ == "__main__":
    main(sys.argv[1:])
