"""Two CPU ranks (gloo): bytes sent, step time and peak memory of FSDP2 vs grain_fsdp, side by side.

    .venv/bin/python benchmarks/bench_fsdp.py [--width 1024 --depth 8 --batch 32 --steps 8 --rounds 2]

Model: ``--depth`` residual blocks ``x + Linear(width, width)(relu(x))`` on a 512 -> width input and a
10-class head (``depth * width^2`` parameters: 8.9 M by default, fp32; raise ``--width``/``--depth`` for
100M+ where the machine allows), SGD, batch ``--batch`` per rank. Both configurations shard the same way
in ``configure_model`` (``fully_shard`` on each block, then on the network: FSDP2 as Lightning's
``ModelParallelStrategy`` documents it); FSDP runs under ``ModelParallelStrategy``, GRAIN under
``GrainFSDPStrategy`` (which keeps the sharding and replaces the reduce-scatter by its all-to-all).

- bytes sent per rank per step, in the gradient exchange: for FSDP a custom reduce-scatter that calls
  FSDP's own (``reduce_scatter_single``) and adds the ring volume ``(R-1)/R`` of its input; for grain_fsdp
  the strategy's counter (all-to-all ``(R-1)/R`` of the same input, plus the Gram all-reduce). The
  parameter all-gathers are FSDP's in both and are not counted.
- step time: wall time of a training batch on rank 0; both configurations run in the same two processes,
  ``--rounds`` fits each in alternating order; median over the timed steps.
- peak memory: in fresh processes per configuration (glibc ``MALLOC_MMAP_THRESHOLD_=65536`` so that freed
  tensors return to the OS), each rank's peak RSS (``ru_maxrss``) and its growth over the RSS at the first
  training batch (model shards and optimizer set up: the same for both).

Prints one table with the ratios grain_fsdp / FSDP from the same run.
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
from torch.distributed.fsdp import fully_shard
from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultReduceScatter
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from grain_lightning import GrainFSDPStrategy  # noqa: E402

CONFIGS = ("fsdp", "grain_fsdp")


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.linear(torch.relu(x))


class Net(nn.Module):
    def __init__(self, width: int, depth: int) -> None:
        super().__init__()
        self.inp = nn.Linear(512, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class CountingReduceScatter(DefaultReduceScatter):
    """FSDP's reduce-scatter, counting the ring volume ``(R-1)/R`` of its input."""

    def __init__(self) -> None:
        self.bytes_sent = 0.0

    def __call__(self, output_tensor, input_tensor, group, op, async_op=False):  # type: ignore[override]
        world = group.size()
        self.bytes_sent += (world - 1) / world * input_tensor.numel() * input_tensor.element_size()
        return super().__call__(output_tensor, input_tensor, group, op, async_op)


class Classifier(L.LightningModule):
    def __init__(self, width: int, depth: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = Net(width, depth)
        self.counter = CountingReduceScatter()

    def configure_model(self) -> None:
        if any(True for _ in self.net.modules() if hasattr(_, "set_custom_reduce_scatter")):
            return
        mesh = self.device_mesh["data_parallel"]
        for block in self.net.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(self.net, mesh=mesh)
        if not isinstance(self.trainer.strategy, GrainFSDPStrategy):
            for m in self.net.modules():
                if hasattr(m, "set_custom_reduce_scatter") and m._get_fsdp_state()._fsdp_param_groups:
                    m.set_custom_reduce_scatter(self.counter)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Meter(L.Callback):
    def __init__(self, warmup: int) -> None:
        self.warmup, self.times, self.t0, self.bytes0, self.rss_setup = warmup, [], 0.0, 0.0, 0

    @staticmethod
    def bytes(trainer: L.Trainer) -> float:
        s = trainer.strategy
        return float(s.bytes_sent) if isinstance(s, GrainFSDPStrategy) else trainer.lightning_module.counter.bytes_sent

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 0:
            self.rss_setup = _rss_bytes()
        if batch_idx == self.warmup:
            self.bytes0 = self.bytes(trainer)
        self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx >= self.warmup:
            self.times.append(1e3 * (time.perf_counter() - self.t0))


def _fit(config: str, args: argparse.Namespace) -> tuple[L.Trainer, Meter]:
    n = args.batch * (args.warmup + args.steps) * 2
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(n, 512, generator=g), torch.randint(0, 10, (n,), generator=g))
    strategy = (
        GrainFSDPStrategy(timeout=timedelta(seconds=300), log_every_n_steps=0)
        if config == "grain_fsdp"
        else L.pytorch.strategies.ModelParallelStrategy(
            data_parallel_size=2, tensor_parallel_size=1, timeout=timedelta(seconds=300)
        )
    )
    meter = Meter(args.warmup)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
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
    times: dict[str, list[float]] = {c: [] for c in CONFIGS}
    for rnd in range(args.rounds):
        for i in range(len(CONFIGS)):
            config = CONFIGS[(i + rnd) % len(CONFIGS)]
            trainer, meter = _fit(config, args)
            times[config] += meter.times
    (out.parent / f"{out.name}.rank{trainer.global_rank}.json").write_text(json.dumps(times))


def run_memory(config: str, args: argparse.Namespace, out: Path) -> None:
    trainer, meter = _fit(config, args)
    result = dict(
        params=sum(p.numel() for p in trainer.lightning_module.parameters()),
        bytes_per_step=(meter.bytes(trainer) - meter.bytes0) / args.steps,
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
    env.update(MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
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
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--depth", type=int, default=8)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per fit")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--run", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.run is not None:
        out = Path(args.out)
        if args.run == "timing":
            run_timing(args, out)
        else:
            run_memory(args.run, args, out)
        return
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        mem = {c: _launch(c, args, Path(tmp) / c.replace(" ", "_")) for c in CONFIGS}
        timing = _launch("timing", args, Path(tmp) / "timing")[0]
    params = mem["fsdp"][0]["params"]
    print(f"model: {params / 1e6:.1f} M parameters (fp32), 2 ranks (gloo), batch {args.batch} per rank")
    print(f"{'':12s} {'bytes/step/rank':>16s} {'step ms (median)':>17s} {'peak RSS MiB':>13s} {'RSS growth MiB':>15s}")
    rows = {}
    for c in CONFIGS:
        b = statistics.mean(r["bytes_per_step"] for r in mem[c])
        t = statistics.median(timing[c])
        peak = max(r["peak_rss"] for r in mem[c]) / 2**20
        growth = max(r["peak_rss"] - r["rss_setup"] for r in mem[c]) / 2**20
        rows[c] = (b, t, peak, growth)
        print(f"{c:12s} {b:16.0f} {t:17.1f} {peak:13.1f} {growth:15.1f}")
    f, g = rows["fsdp"], rows["grain_fsdp"]
    print(
        f"ratio grain_fsdp / fsdp: bytes {g[0] / f[0]:.4f} (goal <= 1.05), step time {g[1] / f[1]:.3f} "
        f"(goal <= 1.2), peak RSS {g[2] / f[2]:.3f}; RSS growth {g[3] - f[3]:+.1f} MiB against one gradient "
        f"shard of {params * 4 / 2 / 2**20:.1f} MiB"
    )


if __name__ == "__main__":
    main()
