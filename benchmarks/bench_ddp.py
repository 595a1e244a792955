"""Two CPU ranks (gloo): step time, bytes sent and peak memory of DDP vs grain_ddp (allgather, sharded).

    .venv/bin/python benchmarks/bench_ddp.py [--width 2048 --depth 4 --batch 32 --steps 20 --warmup 3]

Model: an MLP 512 -> width (x depth, ReLU) -> 10 (13.7 M parameters by default), SGD, batch ``--batch``
per rank, ``Trainer(accelerator="cpu", devices=2)`` with Lightning's popen launcher. Each configuration
runs in two fresh processes, so that the peak memory is its own:

- step time: median wall time of ``--steps`` training batches on rank 0, after ``--warmup``;
- bytes sent per rank per step, counted: for DDP a comm hook wraps its all-reduce (the default
  ``allreduce_hook``) and adds the ring volume ``2 (R-1)/R`` of every bucket; for grain_ddp the strategy's
  own counter (``cross_rank.CommCounter``). Cross-check: the loopback interface's transmitted bytes
  (``/proc/net/dev``, both ranks and anything else on the machine, so an upper bound) per rank per step;
- peak memory: each rank's peak resident set size (``ru_maxrss``), and its growth over the resident size
  after set-up (model, optimizer, data: the same for every configuration).

Prints one table and the ratios against DDP from the same run.
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

    def __init__(self, warmup: int) -> None:
        self.warmup, self.times, self.hook_bytes = warmup, [], 0.0
        self.t0 = self.bytes0 = self.lo0 = 0.0
        self.rss_setup = 0

    def on_fit_start(self, trainer, pl_module) -> None:
        model = trainer.strategy.model
        if isinstance(model, nn.parallel.DistributedDataParallel):
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
            self.times.append(time.perf_counter() - self.t0)


def run_one(config: str, args: argparse.Namespace, out: Path) -> None:
    """Run one configuration as one rank (Lightning re-runs this command as rank 1)."""
    if config == "ddp":
        strategy = L.pytorch.strategies.DDPStrategy(timeout=timedelta(seconds=120))
    else:
        strategy = GrainDDPStrategy(mode=config.split()[1], timeout=timedelta(seconds=120), log_every_n_steps=0)
    n = args.batch * (args.warmup + args.steps) * 2
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(n, 512, generator=g), torch.randint(0, 10, (n,), generator=g))
    meter = Meter(args.warmup)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_epochs=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[meter])
    trainer.fit(Classifier(args.width, args.depth), DataLoader(data, batch_size=args.batch))
    steps = len(meter.times)
    result = dict(
        config=config, rank=trainer.global_rank, steps=steps,
        params=sum(p.numel() for p in trainer.lightning_module.parameters()),
        step_ms=1e3 * statistics.median(meter.times),
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2, help="runs of every configuration, in rotating order")
    ap.add_argument("--run", choices=CONFIGS, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.run:
        return run_one(args.run, args, args.out)
    import tempfile

    runs: dict[str, list] = {c: [] for c in CONFIGS}
    with tempfile.TemporaryDirectory() as tmp:
        for rnd in range(args.rounds):
            for i in range(len(CONFIGS)):
                config = CONFIGS[(i + rnd) % len(CONFIGS)]
                out = Path(tmp) / f"r{rnd}c{i}"
                env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), PYTHONWARNINGS="ignore")
                env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
                cmd = [sys.executable, __file__, "--run", config, "--out", str(out), "--width", str(args.width),
                       "--depth", str(args.depth), "--batch", str(args.batch), "--steps", str(args.steps),
                       "--warmup", str(args.warmup)]
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if proc.returncode != 0:
                    raise SystemExit(f"{config} failed:\n{proc.stderr[-3000:]}")
                runs[config].append([json.loads((Path(tmp) / f"r{rnd}c{i}.rank{r}.json").read_text()) for r in range(2)])
    results = {}
    for config, per_round in runs.items():  # median over rounds of each rank's figures
        results[config] = [{k: (statistics.median(run[r][k] for run in per_round)
                                if isinstance(per_round[0][r][k], (int, float)) else per_round[0][r][k])
                            for k in per_round[0][r]} for r in range(2)]
    base = results["ddp"][0]
    print(f"model: MLP 512-{args.width}x{args.depth}-10, {base['params'] / 1e6:.2f} M parameters "
          f"({base['params'] * 4 / 2**20:.1f} MiB of float32 gradient); 2 ranks, gloo, batch {args.batch} per rank, "
          f"median of {base['steps']:.0f} steps after {args.warmup} warm-up steps; median of {args.rounds} rounds")
    print(f"{'config':22s} {'step ms':>8s} {'x ddp':>6s} {'MB sent/rank/step':>18s} {'x ddp':>6s} "
          f"{'lo MB/rank/step':>16s} {'peak RSS MiB r0/r1':>19s} {'growth MiB r0':>14s}")
    for config, (r0, r1) in results.items():
        print(f"{config:22s} {r0['step_ms']:8.1f} {r0['step_ms'] / base['step_ms']:6.2f} "
              f"{r0['bytes_per_step'] / 1e6:18.2f} {r0['bytes_per_step'] / base['bytes_per_step']:6.3f} "
              f"{r0['lo_bytes_per_rank_step'] / 1e6:16.2f} "
              f"{r0['peak_rss'] / 2**20:9.0f}/{r1['peak_rss'] / 2**20:<9.0f} "
              f"{(r0['peak_rss'] - r0['rss_setup']) / 2**20:14.0f}")


if __name__ == "__main__":
    main()
