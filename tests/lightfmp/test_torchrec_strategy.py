"""The ``torchrec`` strategy (TorchRec DistributedModelParallel under Lightning) on CPU with gloo: fused updates of
sharded tables equal a plain update on the global batch, checkpoints hold whole tables in any world size, and the
three stages on 2 ranks equal one process at the global batch."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lightning.pytorch.strategies import StrategyRegistry
from torch import nn
from torch.utils.data import DataLoader
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from lightfmp import staging
from lightfmp.cli import run_cli
from lightfmp.saved_run import load_run
from lightfmp.torchrec_strategy import (  # importing lightfmp registers the strategy
    FUSED_STATE_KEY,
    TorchRecStrategy,
    fused_optimizer_state,
    gather_fused_state,
    gather_state_dict,
    load_full_state_dict,
    load_sharded,
    save_sharded,
    shard_embeddings,
    sharding_constraints,
)
from tests.conftest import free_port
from tests.lightfmp.test_ddp import PIPELINE, lightfmp

STAGE = [a for a in PIPELINE[1:-2]]  # PIPELINE without the subcommand and its --top_k
assert PIPELINE[0] == "pipeline" and PIPELINE[-2] == "--top_k"

FEATURES = ["a", "b", "c"]
LR = 0.1


def test_registered_and_options_checked():
    assert "torchrec" in StrategyRegistry
    assert isinstance(StrategyRegistry.get("torchrec"), TorchRecStrategy)
    with pytest.raises(ValueError, match="needs CUDA"):
        sharding_constraints({"ebc": _collection(4)}, "row_wise", None, "cpu")
    assert len(sharding_constraints({"ebc": _collection(4)}, "table_wise", {"pruned": "column_wise"}, "cpu")) == 3
    with pytest.raises(ValueError, match="unknown fused_optimizer"):
        TorchRecStrategy(fused_optimizer="lbfgs")
    with pytest.raises(ValueError, match="popen"):
        TorchRecStrategy(start_method="spawn")
    kinds = sharding_constraints(
        {"ebc": _collection(4)}, "table_wise", {"a": "data_parallel", "t_b": "column_wise"}, "cpu"
    )
    assert [(c.sharding_types, c.compute_kernels) for c in kinds.values()] == [
        (["data_parallel"], ["dense"]),
        (["column_wise"], ["fused"]),
        (["table_wise"], ["fused"]),
    ]


def _collection(dim: int) -> EmbeddingBagCollection:
    tables = [
        EmbeddingBagConfig(name=f"t_{f}", embedding_dim=dim, num_embeddings=10 + i, feature_names=[f])
        for i, f in enumerate(FEATURES)
    ]
    return EmbeddingBagCollection(tables=tables)


def _model(dim: int) -> nn.ModuleDict:
    torch.manual_seed(0)
    return nn.ModuleDict({"ebc": _collection(dim), "head": nn.Linear(len(FEATURES) * dim, 1)})


def _rows(batch: int, rows: list[int], seed: int = 1) -> tuple[KeyedJaggedTensor, torch.Tensor]:
    """Rows ``rows`` of a fixed random batch (``seed``): ids (0-2 per field) and targets."""
    g = torch.Generator().manual_seed(seed)
    ids = [
        [torch.randint(0, 10, (int(n),), generator=g) for n in torch.randint(0, 3, (3,), generator=g)]
        for _ in range(batch)
    ]
    y = torch.rand(batch, generator=g)
    values = [ids[r][f] for f in range(len(FEATURES)) for r in rows]
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=FEATURES, values=torch.cat(values), lengths=torch.tensor([len(v) for v in values])
    )
    return kjt, y[rows]


def _loss(model: nn.ModuleDict, kjt: KeyedJaggedTensor, y: torch.Tensor) -> torch.Tensor:
    pooled = model["ebc"](kjt).to_dict()
    emb = torch.cat([pooled[f] for f in FEATURES], dim=1)
    return ((model["head"](emb).squeeze(-1) - y) ** 2).mean()


def _reference_update(weight: torch.Tensor, grad: torch.Tensor, optimizer: str) -> torch.Tensor:
    if optimizer == "sgd":
        return weight - LR * grad
    state = (grad * grad).mean(1, keepdim=True)  # row-wise Adagrad, first step
    return weight - LR * grad / (state.sqrt() + 1e-8)


CASES = [  # (sharding_type, embedding_dim, column_shard_dim, fused optimizer)
    ("table_wise", 4, None, "sgd"),
    ("table_wise", 4, None, "rowwise_adagrad"),
    ("column_wise", 8, 4, "sgd"),  # each table split in two 4-column shards, one per rank
    ("data_parallel", 4, None, "sgd"),  # dense kernel: DDP-averaged gradient, no fused update
]


def _worker(rank: int, port: int, results: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    batch, out = 8, {}
    try:
        for sharding, dim, column_dim, optimizer in CASES:
            model, reference = _model(dim), _model(dim)
            dmp = shard_embeddings(
                model, sharding_type=sharding, column_shard_dim=column_dim, fused_optimizer=optimizer, fused_lr=LR
            )
            shards = str(dmp.sharding_plan).count("rank:1/cpu")
            mine = list(range(rank * batch // 2, (rank + 1) * batch // 2))
            _loss(model, *_rows(batch, mine)).backward()  # each rank half of the batch
            _loss(reference, *_rows(batch, list(range(batch)))).backward()  # the global batch, one process
            after = gather_state_dict(model["ebc"])
            case: dict = {"shards_on_rank_1": shards}
            for name, p in reference["ebc"].named_parameters():
                if sharding == "data_parallel":  # stepped by the dense optimizer: compare the averaged gradient
                    grad = dict(model["ebc"].named_parameters())[name].grad
                    case[name] = float((grad - p.grad).abs().max())
                elif rank == 0:
                    case[name] = float((after[name] - _reference_update(p.detach(), p.grad, optimizer)).abs().max())
            # 1 -> 2: whole tables loaded into the sharded module come back whole; 2 -> 1: into a plain collection
            fresh = {k: torch.randn_like(v) for k, v in reference["ebc"].state_dict().items()}
            load_full_state_dict(model["ebc"], fresh)
            back = gather_state_dict(model["ebc"])
            if rank == 0:
                case["round_trip"] = max(float((back[k] - fresh[k]).abs().max()) for k in fresh)
                plain = _collection(dim)
                plain.load_state_dict(back)
                case["plain"] = max(float((plain.state_dict()[k] - fresh[k]).abs().max()) for k in fresh)
            out[f"{sharding}/{optimizer}"] = case
        results[rank] = out
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_fused_updates_equal_a_plain_update_on_the_global_batch_and_checkpoints_hold_whole_tables():
    """2 ranks, each with half of a batch: after one step, the fused table-wise (SGD, row-wise Adagrad) and
    column-wise updates equal the textbook update with the gradient of the mean loss over the whole batch, and
    data_parallel tables get that gradient (averaged by DDP) for the dense optimizer. Whole tables loaded into the
    shards gather back unchanged and load into an unsharded collection."""
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(free_port(), results), nprocs=2, join=True)
    for case, values in results[0].items():
        shards = values.pop("shards_on_rank_1")
        assert shards == (3 if case.startswith("column_wise") else 1 if case.startswith("table_wise") else 0), case
        for key, diff in values.items():
            assert diff < 1e-6, (case, key, diff)
    for case, values in results[1].items():
        for key, diff in values.items():
            if key != "shards_on_rank_1":
                assert diff < 1e-6, (case, key, diff)


SHARDED = [
    "--trainer.strategy", "TorchRecStrategy", "--trainer.accelerator", "cpu",
    "--trainer.strategy.column_shard_dim", "2",
    "--trainer.strategy.table_sharding", '{"C1": "column_wise", "C2": "data_parallel", "C3": "column_wise"}',
]  # fmt: skip
SCORES = ("auc", "logloss", "test_samples", "fields", "parameters", "train_samples", "expected_fields")


def _same_scores(a: dict, b: dict, stages: tuple[str, ...]) -> None:
    for stage in stages:
        for key in SCORES:
            if key in b[stage]:
                assert a[stage][key] == pytest.approx(b[stage][key], rel=1e-5, abs=1e-6), (stage, key)


def _prune_worker(rank: int, port: int, argv: list[str]) -> None:
    """``lightfmp prune ARGV`` on rank ``rank`` of 2 (a process group as the pipeline's prune has)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        run_cli(["prune", *argv])
    finally:
        dist.destroy_process_group()


def _distcp(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("*.distcp"))


@pytest.mark.slow
def test_sharded_pipeline_on_two_ranks_equals_one_process_and_stage_checkpoints_cross_world_sizes(tmp_path):
    """Tables table-wise, column-wise (two shards) and data-parallel in one model, ``checkpoint_format dcp``: 2 ranks
    x batch 32 give every stage's scores and the kept fields of 1 process x batch 64 under the same strategy (same
    fused optimizer); each stage checkpoint is a DCP directory, one shard file per rank. Then the stages read them
    at the other world size and the scores do not change: prune on 1 process reads the 2-rank pretrain directory
    (2 -> 1) and writes a single file, finetune on 2 ranks reads it and writes a gathered file; prune on 2 ranks
    reads the 1-process pretrain directory (1 -> 2) and writes a 2-rank directory, which finetune on 1 process
    reads (2 -> 1). Each replaces a directory by a file, or the reverse, in the output directory."""
    one, two = tmp_path / "one", tmp_path / "two"
    dcp = [*SHARDED, "--trainer.strategy.checkpoint_format", "dcp"]
    file = [*SHARDED, "--trainer.strategy.checkpoint_format", "file"]
    on_one, on_two = (
        ["--data.batch_size", "64", "--trainer.devices", "1"],
        ["--data.batch_size", "32", "--trainer.devices", "2"],
    )
    lightfmp("pipeline", *STAGE, "--top_k", "7", *dcp, *on_one, "--output_dir", str(one))
    done = lightfmp("pipeline", *STAGE, "--top_k", "7", *dcp, *on_two, "--output_dir", str(two))
    plan = done.stdout + done.stderr
    assert "column_wise" in plan and "data_parallel" in plan and "rank:1/cpu" in plan
    single, ranks = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    assert list(ranks) == ["pretrain", "prune", "finetune"]
    assert ranks["prune"]["kept_fields"] == single["prune"]["kept_fields"]
    _same_scores(ranks, single, ("pretrain", "prune", "finetune"))
    assert not list(two.glob(".staging-*"))
    assert _distcp(two / "pretrain.ckpt") == _distcp(two / "finetune.ckpt") == ["__0_0.distcp", "__1_0.distcp"]
    assert _distcp(one / "pretrain.ckpt") == ["__0_0.distcp"] and (one / "pruned.ckpt").is_dir()
    saved = load_run(two)  # what predict and export read: the 2-rank finetune directory, whole
    assert saved.stage == "finetune" and saved.module.num_parameters() == ranks["finetune"]["parameters"]
    # 2 -> 1: prune on one process from the 2-rank directory, a single-file pruned.ckpt, finetuned on 2 ranks
    down = tmp_path / "down"
    shutil.copytree(two, down)
    lightfmp("prune", *STAGE, "--top_k", "7", *file, *on_one, "--output_dir", str(down))
    assert (down / "pruned.ckpt").is_file() and not (down / "finetune.ckpt").exists()
    lightfmp("finetune", *STAGE, *file, *on_two, "--output_dir", str(down))
    assert (down / "finetune.ckpt").is_file()
    # 1 -> 2: prune on 2 ranks from the 1-process directory, a 2-rank pruned.ckpt, finetuned on one process
    up = tmp_path / "up"
    shutil.copytree(one, up)
    argv = [*STAGE, "--top_k", "7", *dcp, *on_one, "--output_dir", str(up)]
    mp.spawn(_prune_worker, args=(free_port(), argv), nprocs=2, join=True)
    assert _distcp(up / "pruned.ckpt") == ["__0_0.distcp", "__1_0.distcp"]
    lightfmp("finetune", *STAGE, *file, *on_one, "--output_dir", str(up))
    assert (up / "finetune.ckpt").is_file()
    for again in (down, up):
        metrics = json.loads((again / "metrics.json").read_text())
        assert metrics["prune"]["kept_fields"] == single["prune"]["kept_fields"]
        _same_scores(metrics, single, ("pretrain", "prune", "finetune"))
        assert not list(again.glob(".staging-*"))


def _dcp_worker(rank: int, world: int, port: int, directory: str, save: bool, sharding: str, results: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = _model(8)
        shard_embeddings(model, sharding_type=sharding, column_shard_dim=4, fused_optimizer="sgd", fused_lr=LR)
        if save:
            torch.manual_seed(5)  # the same whole tables on every rank, copied into this rank's shards
            load_full_state_dict(model, {k: torch.randn(v.size()) for k, v in _model(8).state_dict().items()})
            save_sharded(model.state_dict(), Path(directory), {"note": f"{world} ranks"})
        else:
            rest = load_sharded(model, Path(directory))
            results["note"] = rest["note"]
        state = gather_state_dict(model)
        if rank == 0:
            results["state"] = {k: v.clone() for k, v in state.items()}
    finally:
        dist.destroy_process_group()


def _spawn_dcp(world: int, directory: Path, save: bool, sharding: str) -> dict:
    results = mp.Manager().dict()
    mp.spawn(_dcp_worker, args=(world, free_port(), str(directory), save, sharding, results), nprocs=world, join=True)
    return dict(results)


@pytest.mark.slow
def test_sharded_checkpoint_directories_load_with_another_world_size(tmp_path):
    """``torch.distributed.checkpoint`` directories (each rank writes its shards): written by 2 ranks
    (table-wise) and read by 1 (2 -> 1), written by 1 and read by 2 ranks column-wise (1 -> 2): the whole tables
    are the ones saved; the non-tensor part comes back from ``lightning.pt``."""
    two = _spawn_dcp(2, tmp_path / "two", save=True, sharding="table_wise")
    assert sorted(p.name for p in (tmp_path / "two").iterdir() if p.suffix == ".distcp") == [
        "__0_0.distcp",
        "__1_0.distcp",
    ]
    read_by_one = _spawn_dcp(1, tmp_path / "two", save=False, sharding="table_wise")
    assert read_by_one["note"] == "2 ranks"
    one = _spawn_dcp(1, tmp_path / "one", save=True, sharding="table_wise")
    read_by_two = _spawn_dcp(2, tmp_path / "one", save=False, sharding="column_wise")
    for saved, read in ((two, read_by_one), (one, read_by_two)):
        assert saved["state"].keys() == read["state"].keys()
        for key, value in saved["state"].items():
            assert torch.equal(read["state"][key], value), key


@pytest.mark.slow
def test_pretrain_resumes_on_one_process_from_a_two_rank_dcp_checkpoint(tmp_path):
    """``checkpoint_format dcp``: a ModelCheckpoint of a 2-rank pretrain fit is a directory with one shard file per
    rank; ``pretrain --ckpt_path`` on 1 process restores it and trains the remaining epoch; the stage checkpoint
    ``pretrain.ckpt`` is a DCP directory too, of the resumed run's one rank."""
    dcp = [*SHARDED, "--trainer.strategy.checkpoint_format", "dcp"]
    ckpts = tmp_path / "ckpts"
    lightfmp(
        "pretrain", *STAGE, *dcp, "--trainer.max_epochs", "1", "--trainer.devices", "2", "--data.batch_size", "32",
        "--trainer.enable_checkpointing", "true", "--trainer.callbacks+", "ModelCheckpoint",
        "--trainer.callbacks.dirpath", str(ckpts), "--output_dir", str(tmp_path / "first"),
    )  # fmt: skip
    (saved,) = list(ckpts.iterdir())
    assert saved.is_dir() and sorted(p.name for p in saved.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    done = lightfmp(
        "pretrain", *STAGE, *dcp, "--trainer.max_epochs", "2", "--trainer.devices", "1", "--data.batch_size", "64",
        "--ckpt_path", str(saved), "--output_dir", str(tmp_path / "resumed"),
    )  # fmt: skip
    assert "Restored all states" in done.stdout + done.stderr
    entry = json.loads((tmp_path / "resumed" / "metrics.json").read_text())["pretrain"]
    first = json.loads((tmp_path / "first" / "metrics.json").read_text())["pretrain"]
    assert entry["train_samples"] == first["train_samples"]  # one more epoch of the same rows
    assert _distcp(tmp_path / "resumed" / "pretrain.ckpt") == ["__0_0.distcp"]


class _Tiny(L.LightningModule):
    """Three tables (``t_a`` table-wise, ``t_b`` column-wise in two shards, ``t_c`` data-parallel) and a linear
    head; the dense part (head and ``t_c``) under Adagrad, the fused tables under row-wise Adagrad."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.ebc, self.head, self.lr = _collection(8), nn.Linear(len(FEATURES) * 8, 1), LR

    def training_step(self, batch: tuple[KeyedJaggedTensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return _loss(self, *batch)  # type: ignore[arg-type]

    def __getitem__(self, name: str) -> nn.Module:
        return getattr(self, name)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adagrad(self.parameters(), lr=LR)


STEPS, BATCH = 4, 8  # steps per epoch, global batch


def _rank_batch(step: int) -> tuple[KeyedJaggedTensor, torch.Tensor]:
    """This rank's rows of the global batch ``step`` (every world size splits the same global batches)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    per = BATCH // world
    return _rows(BATCH, list(range(rank * per, (rank + 1) * per)), seed=100 + step)


def _fit(world: int, epochs: int, fmt: str, ckpt_path: Optional[str]) -> L.Trainer:
    strategy = TorchRecStrategy(
        table_sharding={"b": "column_wise", "c": "data_parallel"},
        column_shard_dim=4,
        fused_optimizer="rowwise_adagrad",
        fused_lr=LR,
        checkpoint_format=fmt,
    )
    trainer = L.Trainer(
        accelerator="cpu", devices=world, strategy=strategy, max_epochs=epochs, use_distributed_sampler=False,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    data = DataLoader(range(STEPS), batch_size=None, collate_fn=_rank_batch)
    trainer.fit(_Tiny(), train_dataloaders=data, ckpt_path=ckpt_path)
    return trainer


def _resume_worker(rank: int, world: int, port: int, tasks: list, results: dict) -> None:
    """Each task ``(name, epochs, ckpt_path, saves)``: a fresh module and trainer fit to ``epochs`` (resumed from
    ``ckpt_path``), then ``saves`` (``[(format, path)]``) written; rank 0 records the whole tables and fused
    optimizer state. A task ``("drop", path, out)``: rank 0 copies the file checkpoint without the fused state."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank), NODE_RANK="0", WORLD_SIZE=str(world)
    )
    for task in tasks:
        if task[0] == "drop":
            if rank == 0:
                checkpoint = torch.load(task[1], weights_only=False)
                del checkpoint[FUSED_STATE_KEY]
                torch.save(checkpoint, task[2])
            dist.barrier()
            continue
        name, epochs, ckpt_path, saves = task
        trainer = _fit(world, epochs, "file", ckpt_path)
        strategy = trainer.strategy
        assert isinstance(strategy, TorchRecStrategy)
        for fmt, path in saves:
            strategy.checkpoint_format = fmt
            trainer.save_checkpoint(path)
        tables = gather_state_dict(trainer.lightning_module)
        fused = gather_fused_state(fused_optimizer_state(strategy.fused_embedding_optimizer))
        if rank == 0:
            results[name] = ({k: v.clone() for k, v in tables.items()}, fused)
    dist.destroy_process_group()


def _spawn_resume(world: int, tasks: list) -> dict:
    results = mp.Manager().dict()
    mp.spawn(_resume_worker, args=(world, free_port(), tasks, results), nprocs=world, join=True)
    return dict(results)


def _max_difference(a: tuple[dict, dict], b: tuple[dict, dict]) -> float:
    assert a[0].keys() == b[0].keys() and a[1].keys() == b[1].keys()
    return max(float((x[k] - y[k]).abs().max()) for x, y in zip(a, b) for k in x)


@pytest.mark.slow
def test_resume_restores_the_fused_optimizer_state_at_any_world_size(tmp_path):
    """2 ranks x 2 epochs uninterrupted equal 1 epoch + checkpoint + resume to 2 epochs: tables and the fused
    row-wise Adagrad accumulators (table-wise and column-wise tables), from a single-file checkpoint on 2 ranks, a
    2-rank DCP directory on 1 rank and a 1-rank DCP directory on 2 ranks. The same file without the fused state
    resumes (with a warning) to different tables: the accumulators matter."""
    f2, d2, d1, dropped = (str(tmp_path / n) for n in ("two.ckpt", "two-dcp", "one-dcp", "dropped.ckpt"))
    two = _spawn_resume(
        2,
        [
            ("straight", 2, None, []),
            ("first", 1, None, [("file", f2), ("dcp", d2)]),
            ("drop", f2, dropped),
            ("file 2->2", 2, f2, []),
            ("no fused state", 2, dropped, []),
        ],
    )
    one = _spawn_resume(1, [("dcp 2->1", 2, d2, []), ("first on one", 1, None, [("dcp", d1)])])
    again = _spawn_resume(2, [("dcp 1->2", 2, d1, [])])
    straight = two["straight"]
    assert set(straight[1]) == {
        "ebc.embedding_bags.t_a.weight/t_a.momentum1",
        "ebc.embedding_bags.t_b.weight/t_b.momentum1",
    }
    assert straight[1]["ebc.embedding_bags.t_b.weight/t_b.momentum1"].shape == (22,)  # 11 rows x 2 column shards
    assert all(float(v.max()) > 0 for v in straight[1].values())  # accumulated squared gradients
    assert _max_difference(one["first on one"], two["first"]) < 1e-5  # 1 rank x batch 8 == 2 ranks x batch 4
    for resumed in (two["file 2->2"], one["dcp 2->1"], again["dcp 1->2"]):
        assert _max_difference(resumed, straight) < 1e-5
    assert _max_difference(two["no fused state"], straight) > 1e-3


def _entry(auc: float) -> dict:
    return {"auc": auc, "logloss": 0.5, "fields": 3, "parameters": 10}


def _checkpoint_directory(path: Path, text: str) -> None:
    path.mkdir()
    (path / "__0_0.distcp").write_text(text)
    (path / ".metadata").write_text("written last")


def test_a_committed_checkpoint_directory_replaces_a_file_and_the_reverse(tmp_path, monkeypatch):
    """Staging with sharded (directory) stage checkpoints: a directory counts as written only with DCP's
    ``.metadata``; committed, it replaces a file of that name (and a file replaces a directory), later stages'
    directories are removed, and a commit cut short between the renames is finished by ``recover``."""
    out = tmp_path / "out"
    with staging.staged_outputs(out, "pretrain") as staged:
        staged.path("pretrain.ckpt").write_text("file")
        staged.path("preprocessor.json").write_text("{}")
        staged.commit(_entry(0.5))
    _checkpoint_directory(out / "finetune.ckpt", "later stage")
    with staging.staged_outputs(out, "pretrain") as staged:
        staged.path("pretrain.ckpt").mkdir()
        staged.path("preprocessor.json").write_text("{}")
        with pytest.raises(RuntimeError, match=r"did not write \['pretrain.ckpt'\]"):
            staged.commit(_entry(0.6))  # no .metadata: a directory DCP has not finished
    assert (out / "pretrain.ckpt").read_text() == "file"
    real_replace = Path.replace

    def cut_short(self: Path, target: Path) -> Path:
        if self.name == "pretrain.ckpt" and self.is_dir():
            raise KeyboardInterrupt("killed between the renames")
        return real_replace(self, target)

    with staging.staged_outputs(out, "pretrain") as staged:
        _checkpoint_directory(staged.path("pretrain.ckpt"), "shards")
        staged.path("preprocessor.json").write_text("{}")
        monkeypatch.setattr(staging.Path, "replace", cut_short)
        with pytest.raises(KeyboardInterrupt):
            staged.commit(_entry(0.7))
        monkeypatch.undo()
    assert not (out / "pretrain.ckpt").exists() and not (out / "finetune.ckpt").exists()
    assert json.loads((out / "metrics.json").read_text()) == {}
    with staging.locked(out):
        assert staging.recover(out) == ["pretrain"]
    assert (out / "pretrain.ckpt" / "__0_0.distcp").read_text() == "shards"
    assert json.loads((out / "metrics.json").read_text()) == {"pretrain": _entry(0.7)}
    with staging.staged_outputs(out, "pretrain") as staged:
        staged.path("pretrain.ckpt").write_text("file again")
        staged.path("preprocessor.json").write_text("{}")
        staged.commit(_entry(0.8))
    assert (out / "pretrain.ckpt").read_text() == "file again" and not staging.staging_directories(out)
