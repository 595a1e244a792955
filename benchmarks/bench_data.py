"""Light-FMP data pipeline throughput, and vectorised collation against a per-row baseline.

    .venv/bin/python benchmarks/bench_data.py [--rows 1000000] [--batch-size 4096] [--batches 50]

Draws a synthetic Criteo-layout table (13 dense, 26 sparse fields) plus one multi-valued field of 0-5 tags,
writes it as a TSV, then times: generation, reading (``read_frame``), ``Preprocessor.fit`` on 80 % of the
rows, ``transform`` of all rows, and batch collation. Collation is timed side by side in one process:
``EncodedFrame.batch`` (tensor indexing, the datamodule's path) against the usual per-row approach (a
Dataset returning one row, a collate function looping over rows and keys, ``from_lengths_sync``), both
producing the same KeyedJaggedTensor (checked).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lightfmp.data import FieldSpec, Preprocessor, read_frame
from lightfmp.data.preprocess import EncodedFrame
from lightfmp.data.synthetic import SyntheticCTR
from lightfmp.inputs import CTRBatch, make_sparse


def per_row_collate(encoded: EncodedFrame, rows: list[int]) -> CTRBatch:
    """Baseline: fetch each row as Python lists, then build the key-major lengths/values row by row."""
    items = []
    for r in rows:  # what Dataset.__getitem__(r) + a list-collating collate_fn do
        sparse = {}
        for feat in encoded.spec.sparse:
            if feat.multi_valued:
                offsets, values = encoded.multi[feat.name]
                sparse[feat.name] = values[int(offsets[r]) : int(offsets[r + 1])].tolist()
            else:
                sparse[feat.name] = [int(encoded.sparse[r, encoded._single_col[feat.name]])]
        items.append((encoded.dense[r], sparse, encoded.labels[r]))
    lengths, values = [], []
    for name in encoded.spec.sparse_names:
        for _, sparse, _ in items:
            lengths.append(len(sparse[name]))
            values.extend(sparse[name])
    kjt = make_sparse(encoded.spec.sparse_names, lengths=torch.tensor(lengths), values=torch.tensor(values))
    return CTRBatch(torch.stack([d for d, _, _ in items]), kjt, torch.stack([y for _, _, y in items]))


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--batches", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(1)

    gen = SyntheticCTR(num_rows=args.rows, seed=0)
    frame, t_gen = timed(gen.generate)
    rng = np.random.default_rng(0)
    tags = rng.integers(0, 50, size=(args.rows, 5)).astype(str)
    n_tags = rng.integers(0, 6, size=args.rows)
    frame["tags"] = ["|".join(t[:k]) for t, k in zip(tags, n_tags)]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train.tsv"
        gen.write_criteo_tsv(path, frame.drop(columns=["tags"]))
        size_mb = path.stat().st_size / 1e6
        (read, schema), t_read = timed(read_frame, "criteo", path)
    read["tags"] = frame["tags"]
    schema = schema.replace_fields(schema.fields + (FieldSpec("tags", kind="multi"),))
    prep = Preprocessor(schema, min_count=2)
    _, t_fit = timed(prep.fit, read.iloc[: int(0.8 * args.rows)])
    encoded, t_transform = timed(prep.transform, read)
    print(f"rows {args.rows:,}, TSV {size_mb:.0f} MB, torch threads 1")
    for what, t in (
        ("generate", t_gen),
        ("read_frame criteo", t_read),
        ("fit (80 %)", t_fit),
        ("transform", t_transform),
    ):
        print(f"  {what:<18} {t:7.2f} s   {args.rows / t / 1e6:6.2f} M rows/s")

    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, args.rows, (args.batch_size,), generator=g) for _ in range(args.batches)]
    ref, fast = per_row_collate(encoded, batches[0].tolist()), encoded.batch(batches[0])
    assert torch.equal(ref.sparse.values(), fast.sparse.values()) and torch.equal(
        ref.sparse.lengths(), fast.sparse.lengths()
    )
    assert torch.equal(ref.dense, fast.dense) and torch.equal(ref.labels, fast.labels)
    t_fast = statistics.median(timed(encoded.batch, b)[1] for b in batches)
    t_ref = statistics.median(
        timed(per_row_collate, encoded, b.tolist())[1] for b in batches[: max(3, args.batches // 10)]
    )
    print(f"collation, batch {args.batch_size} (13 dense, 26 sparse, 1 multi-valued field), median per batch:")
    print(f"  per-row baseline   {t_ref * 1e3:8.2f} ms")
    print(f"  EncodedFrame.batch {t_fast * 1e3:8.2f} ms   speed-up x{t_ref / t_fast:.0f}")


if __name__ == "__main__":
    main()
