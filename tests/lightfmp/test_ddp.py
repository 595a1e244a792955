"""Light-FMP's three stages under DDP (gloo, 2 CPU processes): the same metrics and decision as one process at the
same global batch, files written once, and rank 0's failures reported on every rank."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from lightfmp.distributed import RankZeroFailed, broadcast, on_rank_zero, world_size
from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[2]
PIPELINE = [
    "pipeline", "--seed_everything", "0", "--data.format", "synthetic", "--data.synthetic_rows", "3000",
    "--data.synthetic_dense", "4", "--data.synthetic_sparse", "6", "--data.synthetic_num_informative", "3",
    "--data.pretrain_fraction", "0.5", "--model.backbone", "dlrm", "--model.embedding_dim", "4",
    "--model.hidden", "[16]", "--trainer.max_epochs", "2", "--trainer.enable_progress_bar", "false", "--top_k", "4",
]  # fmt: skip
SCORES = ("auc", "logloss", "test_samples", "fields", "parameters", "train_samples", "expected_fields")


def lightfmp(*argv: str) -> subprocess.CompletedProcess:
    """``python -m lightfmp.cli ARGV`` in a fresh process (Lightning's DDP launcher re-runs the command per rank)."""
    env = {**os.environ, "MASTER_PORT": str(free_port()), "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-m", "lightfmp.cli", *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return done


@pytest.mark.slow
def test_pipeline_on_two_ranks_equals_one_process_at_the_global_batch(tmp_path):
    """2 ranks x batch 32 vs 1 process x batch 64 (the ranks' batches together are the process's batch and the
    gates' noise is that of the global batch): every stage's test scores agree to float rounding, the same fields
    are kept, the training samples are counted over both ranks, and rank 0 alone wrote the files."""
    lightfmp(*PIPELINE, "--data.batch_size", "64", "--output_dir", str(tmp_path / "one"))
    two = tmp_path / "two"
    lightfmp(
        *PIPELINE, "--data.batch_size", "32", "--trainer.accelerator", "cpu", "--trainer.devices", "2",
        "--trainer.strategy", "ddp", "--output_dir", str(two),
    )  # fmt: skip
    single = json.loads((tmp_path / "one" / "metrics.json").read_text())
    ranks = json.loads((two / "metrics.json").read_text())
    assert list(ranks) == ["pretrain", "prune", "finetune"]
    assert ranks["prune"]["kept_fields"] == single["prune"]["kept_fields"]
    for stage in ranks:
        for key in SCORES:
            if key in single[stage]:
                assert ranks[stage][key] == pytest.approx(single[stage][key], rel=1e-6, abs=1e-6), (stage, key)
    assert sorted(p.name for p in (two / "logs").iterdir()) == ["finetune", "pretrain"]  # one logger, rank 0's
    assert not list(two.glob(".staging-*"))


def _rank_zero_worker(rank: int, port: int, results: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        out = {"world": world_size(), "shared": broadcast(f"from rank {rank}")}
        out["result"] = on_rank_zero(lambda: "done", "a job")
        try:
            on_rank_zero(lambda: 1 / 0, "writing the report")
        except RankZeroFailed as e:
            out["error"] = f"RankZeroFailed: {e}"
        except ZeroDivisionError as e:
            out["error"] = f"ZeroDivisionError: {e}"
        results[rank] = out
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_work_on_rank_zero_is_shared_and_its_failure_raised_on_every_rank():
    results = mp.Manager().dict()
    mp.spawn(_rank_zero_worker, args=(free_port(), results), nprocs=2, join=True)
    assert results[0]["world"] == results[1]["world"] == 2
    assert results[0]["shared"] == results[1]["shared"] == "from rank 0"
    assert results[0]["result"] == "done" and results[1]["result"] is None
    assert results[0]["error"] == "ZeroDivisionError: division by zero"  # rank 0 re-raises its own error
    assert (
        results[1]["error"]
        == "RankZeroFailed: rank 0 failed in writing the report: ZeroDivisionError: division by zero"
    )


@pytest.mark.slow
def test_ranks_share_one_encoding_of_a_file_without_cache_dir(tmp_path):
    """A file read under 2 ranks without --data.cache_dir is encoded once, into <output_dir>/data_cache (rank 0
    builds it before starting rank 1, which maps it), not once per rank in memory; the scores and the kept fields
    equal one process's (in memory) at the same global batch."""
    from tests.lightfmp.data.files import write
    from tests.lightfmp.data.test_cache import criteo_rows

    path = write(tmp_path / "train.txt", "\n".join(criteo_rows(600)) + "\n")
    common = [
        "pipeline", "--seed_everything", "0", "--data.format", "criteo", "--data.path", str(path),
        "--data.pretrain_fraction", "0.5", "--data.progress", "false", "--model.backbone", "dlrm",
        "--model.embedding_dim", "4", "--model.hidden", "[8]", "--trainer.max_epochs", "1",
        "--trainer.enable_progress_bar", "false", "--top_k", "4",
    ]  # fmt: skip
    lightfmp(*common, "--data.batch_size", "64", "--output_dir", str(tmp_path / "one"))
    two = tmp_path / "two"
    lightfmp(
        *common, "--data.batch_size", "32", "--trainer.accelerator", "cpu", "--trainer.devices", "2",
        "--trainer.strategy", "ddp", "--output_dir", str(two),
    )  # fmt: skip
    assert not (tmp_path / "one" / "data_cache").exists()  # one process: in memory, as before
    built = [p for p in (two / "data_cache").iterdir() if p.is_dir()]
    assert [p.name.split("-")[0] for p in built] == ["criteo"]  # one build, no leftover .tmp-*
    encodings = sorted(p.name.split("-")[0] for p in built[0].iterdir() if p.is_dir())
    assert encodings == ["encoded", "encoded", "fit"]  # stage 1's fields, then stage 3's kept ones
    single = json.loads((tmp_path / "one" / "metrics.json").read_text())
    ranks = json.loads((two / "metrics.json").read_text())
    assert ranks["prune"]["kept_fields"] == single["prune"]["kept_fields"]
    for stage in ranks:
        for key in ("auc", "logloss", "test_samples"):
            if key in single[stage]:
                assert ranks[stage][key] == pytest.approx(single[stage][key], rel=1e-5, abs=1e-6), (stage, key)
