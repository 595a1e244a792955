"""Does TorchRec's ``TrainPipelineSparseDist`` run on the CPU (gloo), and does it train like a plain loop?

    .venv/bin/python benchmarks/probe_train_pipeline.py [--steps 6]

Two gloo processes shard a tiny model (three tables: table-wise, column-wise in two shards, data-parallel; a
linear head) with :func:`lightfmp.torchrec_strategy.shard_embeddings` (fused row-wise Adagrad), then train
``--steps`` batches twice from the same weights: a plain loop (zero_grad, forward, backward, step) and
``TrainPipelineSparseDist(dmp, optimizer, cpu).progress(iterator)`` until ``StopIteration``. Prints the modules the
pipeline pipelined (their input distribution started one batch ahead) and the largest difference between the
two runs' whole tables and head. This is a probe of TorchRec, not of the strategy: the ``torchrec`` strategy does
not use the pipeline (see its module docstring for why).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _worker(rank: int, port: int, pipelined: bool, steps: int, results: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
    from torchrec.modules.embedding_configs import EmbeddingBagConfig
    from torchrec.modules.embedding_modules import EmbeddingBagCollection
    from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
    from torchrec.streamable import Pipelineable

    from lightfmp.torchrec_strategy import fused_parameter_ids, gather_state_dict, shard_embeddings

    features = ["a", "b", "c"]

    @dataclass
    class Batch(Pipelineable):
        kjt: KeyedJaggedTensor
        y: torch.Tensor

        def to(self, device: torch.device, non_blocking: bool = False) -> Batch:
            return Batch(self.kjt.to(device, non_blocking=non_blocking), self.y.to(device, non_blocking=non_blocking))

        def record_stream(self, stream: Any) -> None:
            self.kjt.record_stream(stream)
            self.y.record_stream(stream)

        def pin_memory(self) -> Batch:
            return Batch(self.kjt.pin_memory(), self.y.pin_memory())

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            tables = [
                EmbeddingBagConfig(name=f"t_{f}", embedding_dim=8, num_embeddings=10 + i, feature_names=[f])
                for i, f in enumerate(features)
            ]
            self.ebc, self.head = EmbeddingBagCollection(tables=tables), nn.Linear(3 * 8, 1)

        def forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:  # the pipeline's (loss, output)
            pooled = self.ebc(batch.kjt).to_dict()
            prediction = self.head(torch.cat([pooled[f] for f in features], dim=1)).squeeze(-1)
            return ((prediction - batch.y) ** 2).mean(), prediction.detach()

    def batch(step: int) -> Batch:  # this rank's half of global batch `step` (8 rows, 0-2 ids per field)
        g = torch.Generator().manual_seed(100 + step)
        ids = [
            [torch.randint(0, 10, (int(n),), generator=g) for n in torch.randint(0, 3, (3,), generator=g)]
            for _ in range(8)
        ]
        y, rows = torch.rand(8, generator=g), range(rank * 4, rank * 4 + 4)
        values = [ids[r][f] for f in range(3) for r in rows]
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=features, values=torch.cat(values), lengths=torch.tensor([len(v) for v in values])
        )
        return Batch(kjt, y[list(rows)])

    net = Net()
    dmp = shard_embeddings(
        net, table_sharding={"b": "column_wise", "c": "data_parallel"}, column_shard_dim=4, fused_lr=0.1
    )
    fused = fused_parameter_ids(net)
    dense = KeyedOptimizerWrapper(
        {k: p for k, p in dmp.named_parameters() if id(p) not in fused}, lambda ps: torch.optim.SGD(ps, lr=0.1)
    )
    optimizer = CombinedOptimizer([dmp.fused_optimizer, dense])
    batches = [batch(i) for i in range(steps)]
    pipelined_modules: list[str] = []
    if pipelined:
        pipeline = TrainPipelineSparseDist(dmp, optimizer, torch.device("cpu"))
        iterator = iter(batches)
        while True:
            try:
                pipeline.progress(iterator)
            except StopIteration:
                break
        pipelined_modules = [type(m).__name__ for m in pipeline._pipelined_modules]
    else:
        for b in batches:
            optimizer.zero_grad()
            loss, _ = dmp(b)
            loss.backward()
            optimizer.step()
    state = gather_state_dict(net)
    if rank == 0:
        results[pipelined] = ({k: v.clone() for k, v in state.items()}, pipelined_modules)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    results = mp.Manager().dict()
    for pipelined in (False, True):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(_worker, args=(port, pipelined, args.steps, results), nprocs=2, join=True)
    (plain, _), (piped, modules) = results[False], results[True]
    difference = max(float((plain[k] - piped[k]).abs().max()) for k in plain)
    print(f"pipelined modules: {modules}; {args.steps} steps; largest difference to the plain loop: {difference:.3g}")


if __name__ == "__main__":
    main()
