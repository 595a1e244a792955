"""Sharded embedding tables (lightfmp's ``torchrec`` strategy, TorchRec DMP) on CPU with gloo: per-rank
embedding memory and step time with 1 and 2 ranks.

    .venv/bin/python benchmarks/bench_dmp.py [--tables 26 --rows 10000000 --dim 16 --batch 1024 --steps 20]
        [--sharding table_wise] [--optimizer rowwise_adagrad] [--ranks 1 2]

Model: ``--tables`` tables of ``--rows / --tables`` rows each (equal sizes, so that table-wise sharding can split
them evenly) and ``--dim`` columns, one id per field and row (uniform), pooled and fed to a 2-layer MLP; the
collection is built on the ``meta`` device and sharded by :func:`lightfmp.torchrec_strategy.shard_embeddings`
(the strategy's own code), so no rank ever holds a table it does not own. Each rank trains on ``--batch`` rows
per step (the global batch grows with the ranks), one torch thread per rank.

Per rank:

- table bytes: the local shards' entries (``ShardedTensor.local_shards``) times 4 bytes, plus data-parallel
  tables whole;
- resident memory: the RSS after sharding minus the RSS before building the model, and the peak RSS
  (``ru_maxrss``) of the whole run (fused optimizer state and buffers included);
- step time: median wall time of forward, backward (with the fused update) and the dense optimizer step,
  after 3 warm-up steps.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Net(nn.Module):
    """Pooled embeddings of every field, concatenated, into an MLP."""

    def __init__(self, ebc: nn.Module, features: list[str], dim: int) -> None:
        super().__init__()
        self.ebc, self.features = ebc, features
        self.mlp = nn.Sequential(nn.Linear(len(features) * dim, 256), nn.ReLU(), nn.Linear(256, 1))

    def forward(self, kjt) -> torch.Tensor:  # type: ignore[no-untyped-def]
        pooled = self.ebc(kjt).to_dict()
        return self.mlp(torch.cat([pooled[f] for f in self.features], 1)).squeeze(-1)


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, results: dict) -> None:
    from torch.distributed._shard.sharded_tensor import ShardedTensor
    from torchrec.modules.embedding_configs import EmbeddingBagConfig
    from torchrec.modules.embedding_modules import EmbeddingBagCollection
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from lightfmp.torchrec_strategy import shard_embeddings

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    features = [f"f{i}" for i in range(args.tables)]
    rows = args.rows // args.tables
    before = _rss()
    tables = [
        EmbeddingBagConfig(name=f"t_{f}", embedding_dim=args.dim, num_embeddings=rows, feature_names=[f])
        for f in features
    ]
    model = Net(EmbeddingBagCollection(tables=tables, device=torch.device("meta")), features, args.dim)
    dmp = shard_embeddings(model, sharding_type=args.sharding, fused_optimizer=args.optimizer, fused_lr=0.01)
    sharded = _rss()
    table_bytes = 0
    for value in model.ebc.state_dict().values():
        if isinstance(value, ShardedTensor):
            table_bytes += sum(s.tensor.numel() * s.tensor.element_size() for s in value.local_shards())
        else:
            table_bytes += value.numel() * value.element_size()
    dense = torch.optim.Adam(model.mlp.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(rank)
    times = []
    for step in range(args.steps + 3):
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=features,
            values=torch.randint(0, rows, (args.tables * args.batch,), generator=g),
            lengths=torch.ones(args.tables * args.batch, dtype=torch.long),
        )
        y = torch.randint(0, 2, (args.batch,), generator=g).float()
        start = time.perf_counter()
        logits = dmp(kjt)
        loss = nn.functional.binary_cross_entropy_with_logits(logits, y)
        dense.zero_grad()
        loss.backward()
        dense.step()
        if step >= 3:
            times.append(time.perf_counter() - start)
    results[rank] = {
        "table_MiB": table_bytes / 2**20,
        "rss_growth_MiB": (sharded - before) / 2**20,
        "peak_rss_MiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "step_ms": 1000 * statistics.median(times),
        "plan_ranks": str(dmp.sharding_plan).count(f"rank:{rank}/cpu"),
    }
    dist.destroy_process_group()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tables", type=int, default=26)
    parser.add_argument("--rows", type=int, default=10_000_000, help="rows of all tables together")
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--batch", type=int, default=1024, help="rows per rank and step")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--sharding", default="table_wise")
    parser.add_argument("--optimizer", default="rowwise_adagrad")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    print(
        f"{args.tables} tables x {args.rows // args.tables} rows x {args.dim} columns "
        f"({args.tables * (args.rows // args.tables) * args.dim * 4 / 2**20:.0f} MiB of fp32 weights), "
        f"{args.sharding}, fused {args.optimizer}, batch {args.batch} per rank, {args.steps} timed steps"
    )
    print(f"{'ranks':>5} {'rank':>4} {'shards':>6} {'table MiB':>9} {'RSS growth MiB':>14} ", end="")
    print(f"{'peak RSS MiB':>12} {'step ms':>8}")
    summary = []
    for world in args.ranks:
        results = mp.Manager().dict()
        mp.spawn(_worker, args=(world, _port(), args, results), nprocs=world, join=True)
        for rank in range(world):
            r = results[rank]
            print(
                f"{world:>5} {rank:>4} {r['plan_ranks']:>6} {r['table_MiB']:>9.1f} {r['rss_growth_MiB']:>14.1f} "
                f"{r['peak_rss_MiB']:>12.1f} {r['step_ms']:>8.1f}"
            )
            summary.append({"ranks": world, "rank": rank, **r})
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
