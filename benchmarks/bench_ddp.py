"""Two CPU ranks (gloo): step time, bytes sent and peak memory of DDP vs grain_ddp (allgather, sharded).

    .venv/bin/python benchmarks/bench_ddp.py [--width 2048 --depth 4 --batch 32 --steps 10 --rounds 3]

Model: an MLP 512 -> width (x depth, ReLU) -> 10 (13.7 M parameters by default), SGD, batch ``--batch``
per rank, ``Trainer(accelerator="cpu", devices=2)`` with Lightning's popen launcher (one torch thread
per rank on a 2-core machine).

- step time: wall time of a training batch on rank 0 (forward, backward, communication, optimizer step).
  All configurations run in the same two processes, ``--rounds`` fits each in rotating order, so that
  load changes on a shared machine hit every configuration; median and minimum over all timed steps.
  DDP runs as Lightning builds it (no comm hook).
- bytes sent per rank per step, counted in separate fresh processes per configuration: for DDP a comm
  hook wraps its all-reduce (the default ``allreduce_hook``) and adds the ring volume ``2 (R-1)/R`` of
  every bucket; for grain_ddp the strategy's own counter (``cross_rank.CommCounter``). Cross-check: the
  loopback interface's transmitted bytes (``/proc/net/dev``: both ranks and anything else on the
  machine, so an upper bound) per rank per step;
- peak memory, in the same fresh processes: each rank's peak resident set size (``ru_maxrss``), and its
  growth over the resident size after set-up (model, optimizer, data: the same for every configuration).

Prints one table with the ratios against DDP from the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from grain_lightning import GrainDDPStrategy  # noqa: E402

CONFIGS = ("ddp", "grain_ddp allgather", "grain_ddp sharded")


def make_model(width: int, depth: int) -> nn.Module:
    layers, d = [], 512
    for _ in range(depth):
        layers += [nn.Linear(d, width), nn.ReLU()]
        d = width
    return nn.Sequential(*layers, nn.Linear(d, 10))


class Classifier(L.LightningModule):
    def __init__(self, width: int, depth: int):
        super().__init__()
        torch.manual_seed(0)
        self.net = make_model(width, depth)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _lo_tx_bytes() -> int:
    with open("/proc/net/dev") as f:
        for line in f:
            if line.strip().startswith("lo:"):
                return int(line.split(":", 1)[1].split()[8])
    return 0


class Meter(L.Callback):
    """Per-batch wall times, bytes counted by the strategy or the DDP hook, loopback bytes, memory."""

    def __init__(self, warmup: int, count_ddp_bytes: bool) -> None:
        self.warmup, self.count_ddp_bytes, self.times, self.hook_bytes = warmup, count_ddp_bytes, [], 0.0
        self.t0 = self.bytes0 = self.lo0 = 0.0
        self.rss_setup = 0

    def on_fit_start(self, trainer, pl_module) -> None:
        model = trainer.strategy.model
        if self.count_ddp_bytes and isinstance(model, nn.parallel.DistributedDataParallel):
            from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

            world = trainer.world_size

            def counting_allreduce(state, bucket):
                buf = bucket.buffer()
                self.hook_bytes += 2 * (world - 1) / world * buf.numel() * buf.element_size()
                return allreduce_hook(state, bucket)

            model.register_comm_hook(None, counting_allreduce)

    def _bytes(self, trainer) -> float:
        strategy = trainer.strategy
        return strategy.bytes_sent if isinstance(strategy, GrainDDPStrategy) else self.hook_bytes

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 0:
            self.rss_setup = _rss_bytes()
        if batch_idx == self.warmup:
            self.bytes0, self.lo0 = self._bytes(trainer), _lo_tx_bytes()
        self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx >= self.warmup:
            self.times.append(1e3 * (time.perf_counter() - self.t0))


def _strategy(config: str):
    if config == "ddp":
        return L.pytorch.strategies.DDPStrategy(timeout=timedelta(seconds=120))
    return GrainDDPStrategy(mode=config.split()[1], timeout=timedelta(seconds=120), log_every_n_steps=0)


def _fit(config: str, args: argparse.Namespace, steps: int, count_ddp_bytes: bool) -> tuple[L.Trainer, Meter]:
    n = args.batch * (args.warmup + steps) * 2
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(n, 512, generator=g), torch.randint(0, 10, (n,), generator=g))
    meter = Meter(args.warmup, count_ddp_bytes)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=_strategy(config),
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[meter],
    )
    trainer.fit(Classifier(args.width, args.depth), DataLoader(data, batch_size=args.batch))
    return trainer, meter


def run_timing(args: argparse.Namespace, out: Path) -> None:
    """All configurations in the same two processes, ``--rounds`` times in rotating order (load drifts hit all)."""
    times: dict[str, list[float]] = {c: [] for c in CONFIGS}
    for rnd in range(args.rounds):
        for i in range(len(CONFIGS)):
            config = CONFIGS[(i + rnd) % len(CONFIGS)]
            trainer, meter = _fit(config, args, args.steps, count_ddp_bytes=False)
            times[config] += meter.times
    (out.parent / f"{out.name}.rank{trainer.global_rank}.json").write_text(json.dumps(times))


def run_memory(config: str, args: argparse.Namespace, out: Path) -> None:
    """One configuration in fresh processes: bytes per step and peak memory."""
    steps = 5
    trainer, meter = _fit(config, args, steps, count_ddp_bytes=True)
    result = dict(
        params=sum(p.numel() for p in trainer.lightning_module.parameters()),
        bytes_per_step=(meter._bytes(trainer) - meter.bytes0) / steps,
        lo_bytes_per_rank_step=(_lo_tx_bytes() - meter.lo0) / trainer.world_size / steps,
        peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        rss_setup=meter.rss_setup,
    )
    (out.parent / f"{out.name}.rank{trainer.global_rank}.json").write_text(json.dumps(result))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(run: str, args: argparse.Namespace, out: Path) -> list[dict]:
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    cmd = [sys.executable, __file__, "--run", run, "--out", str(out)]
    for key in ("width", "depth", "batch", "steps", "warmup", "rounds"):
        cmd += [f"--{key}", str(getattr(args, key))]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{run} failed:\n{proc.stderr[-3000:]}")
    return [json.loads((out.parent / f"{out.name}.rank{r}.json").read_text()) for r in range(2)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per fit")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="fits of every configuration, in rotating order")
    ap.add_argument("--run", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.run == "timing":
        return run_timing(args, args.out)
    if args.run:
        return run_memory(args.run, args, args.out)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        timing = _launch("timing", args, Path(tmp) / "timing")[0]
        memory = {c: _launch(c, args, Path(tmp) / f"mem{i}") for i, c in enumerate(CONFIGS)}
    base_t, base = statistics.median(timing["ddp"]), memory["ddp"][0]
    base_min = min(timing["ddp"])
    print(
        f"model: MLP 512-{args.width}x{args.depth}-10, {base['params'] / 1e6:.2f} M parameters "
        f"({base['params'] * 4 / 2**20:.1f} MiB of float32 gradient); 2 ranks, gloo, batch {args.batch} per rank; "
        f"step times over {len(timing['ddp'])} steps per configuration ({args.rounds} interleaved fits of "
        f"{args.steps} after {args.warmup} warm-up steps)"
    )
    print(
        f"{'config':20s} {'median ms':>9s} {'x ddp':>6s} {'min ms':>7s} {'x ddp':>6s} {'MB sent/rank/step':>17s} "
        f"{'x ddp':>6s} {'lo MB/rank/step':>15s} {'peak RSS MiB r0/r1':>18s} {'growth MiB r0':>13s}"
    )
    for config in CONFIGS:
        t, (r0, r1) = timing[config], memory[config]
        med, low = statistics.median(t), min(t)
        print(
            f"{config:20s} {med:9.1f} {med / base_t:6.2f} {low:7.1f} {low / base_min:6.2f} "
            f"{r0['bytes_per_step'] / 1e6:17.2f} {r0['bytes_per_step'] / base['bytes_per_step']:6.3f} "
            f"{r0['lo_bytes_per_rank_step'] / 1e6:15.2f} {r0['peak_rss'] / 2**20:8.0f}/{r1['peak_rss'] / 2**20:<9.0f} "
            f"{(r0['peak_rss'] - r0['rss_setup']) / 2**20:13.0f}"
        )


if __name__ == "__main__":
    main()
