"""CTRDataModule: subsets, loaders, preprocessor reuse and checkpoints, command-line arguments."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from lightfmp.data.datamodule import CTRDataModule
from tests.lightfmp.data.files import ml100k_dir, write


def test_datamodule_subsets_cover_train_split_and_loaders():
    dm = CTRDataModule(
        format="synthetic",
        synthetic_rows=4000,
        subset="pretrain",
        batch_size=256,
        eval_batch_size=1000,
        pretrain_fraction=0.25,
        seed=3,
    )
    dm.setup("fit")
    assert dm.num_train_samples == 800  # 0.25 of the 3200 training rows
    fine = dm.for_subset("finetune")
    fine.setup("fit")
    assert fine.preprocessor is dm.preprocessor
    pre_rows, fine_rows = dm.train_indices, fine.train_indices
    assert len(np.intersect1d(pre_rows, fine_rows)) == 0
    assert np.array_equal(np.sort(np.concatenate([pre_rows, fine_rows])), dm.splits.train)
    assert np.array_equal(fine.splits.val, dm.splits.val) and np.array_equal(fine.splits.test, dm.splits.test)
    loader = dm.train_dataloader()
    positions = list(loader.batch_sampler)  # one epoch of position batches
    rows = loader.dataset.indices[torch.as_tensor(sum(positions, []))]
    assert sorted(rows.tolist()) == pre_rows.tolist()  # every pretrain row once per epoch
    loader.sampler.set_epoch(1)  # as Lightning does each epoch
    batches = list(loader)  # the next epoch: a new permutation
    assert [len(b) for b in batches] == [256, 256, 256, 32]
    first = dm.encoded.batch(loader.dataset.indices[torch.as_tensor(positions[0])])
    assert not torch.equal(batches[0].labels, first.labels) or not torch.equal(batches[0].dense, first.dense)
    again = CTRDataModule(
        format="synthetic", synthetic_rows=4000, subset="pretrain", batch_size=256, seed=3, pretrain_fraction=0.25
    )
    again.setup()
    expected = next(iter(dm.train_dataloader())).dense  # a new loader starts again at the first epoch
    assert torch.equal(next(iter(again.train_dataloader())).dense, expected)  # same seed, same first epoch
    val = list(dm.val_dataloader())
    assert [len(b) for b in val] == [400] and torch.equal(
        val[0].labels, dm.encoded.labels[torch.as_tensor(dm.splits.val)]
    )
    assert val[0].sparse.keys() == list(dm.feature_spec.sparse_names)


def test_datamodule_kept_fields_reuse_vocabulary(tmp_path):
    dm = CTRDataModule(format="adult", batch_size=512, max_rows=5000)
    dm.setup()
    path = tmp_path / "prep.json"
    dm.preprocessor.save(path)
    keep = ["age", "education", "occupation"]
    stage3 = CTRDataModule(
        format="adult", batch_size=512, max_rows=5000, subset="finetune", fields=keep, preprocessor=str(path)
    )
    stage3.setup()
    assert stage3.feature_spec == dm.feature_spec.select(keep)
    assert set(stage3.encoded.spec.names) == set(keep)
    full = dm.val_dataloader().dataset[torch.arange(50)]
    kept = stage3.val_dataloader().dataset[torch.arange(50)]
    assert torch.equal(kept.dense[:, 0], full.dense[:, 0])
    for name in ("education", "occupation"):
        assert torch.equal(kept.sparse[name].values(), full.sparse[name].values())
    with pytest.raises(KeyError, match="salary"):
        CTRDataModule(format="adult", max_rows=500, fields=["age", "salary"]).setup()


def test_datamodule_state_dict_and_chronological(tmp_path):
    root = ml100k_dir(tmp_path / "ml")
    dm = CTRDataModule(
        format="movielens", path=str(root), split="chronological", val_fraction=0.25, test_fraction=0.25, batch_size=2
    )
    dm.setup()
    times = pd.Series([100, 300, 200, 50])  # u.data timestamps, in file order
    assert list(dm.splits.test) == [1] and list(dm.splits.val) == [2] and sorted(dm.splits.train) == [0, 3]
    assert times[dm.splits.train].max() <= times[dm.splits.val].min()
    state = dm.state_dict()
    other = CTRDataModule(
        format="movielens",
        path=str(root),
        split="chronological",
        val_fraction=0.25,
        test_fraction=0.25,
        batch_size=2,
        min_count=5,
    )  # would fit an all-OOV vocabulary
    other.setup()
    other.load_state_dict(state)
    assert other.preprocessor.state_dict() == dm.preprocessor.state_dict()
    a = dm.train_dataloader().dataset[torch.arange(2)]
    b = other.train_dataloader().dataset[torch.arange(2)]
    assert torch.equal(a.sparse.values(), b.sparse.values()) and torch.equal(a.sparse.lengths(), b.sparse.lengths())
    with pytest.raises(ValueError, match="needs a time column"):
        CTRDataModule(format="adult", split="chronological", max_rows=100).setup()
    with pytest.raises(ValueError, match="unknown data format"):
        CTRDataModule(format="svmlight")


class _TinyCTRModel:
    """A LightningModule factory (Lightning imported lazily): linear model on dense + per-id weights."""

    @staticmethod
    def build(spec):
        import lightning as L
        from torchrec.modules.embedding_configs import EmbeddingBagConfig
        from torchrec.modules.embedding_modules import EmbeddingBagCollection

        class Tiny(L.LightningModule):
            def __init__(self):
                super().__init__()
                self.ebc = EmbeddingBagCollection(
                    tables=[
                        EmbeddingBagConfig(
                            num_embeddings=f.num_embeddings, embedding_dim=2, name=f"t_{f.name}", feature_names=[f.name]
                        )
                        for f in spec.sparse
                    ]
                )
                self.head = torch.nn.Linear(len(spec.dense) + 2 * len(spec.sparse), 1)

            def training_step(self, batch, _):
                x = torch.cat([batch.dense, self.ebc(batch.sparse).values()], 1)
                loss = torch.nn.functional.binary_cross_entropy_with_logits(self.head(x).squeeze(1), batch.labels)
                self.log("loss", loss, batch_size=len(batch))
                return loss

            validation_step = training_step

            def configure_optimizers(self):
                return torch.optim.Adam(self.parameters(), 1e-2)

        return Tiny()


def test_lightning_fit_checkpoint_carries_preprocessor(tmp_path):
    import lightning as L

    kwargs = dict(
        format="synthetic",
        synthetic_rows=3000,
        synthetic_sparse=5,
        synthetic_dense=3,
        synthetic_num_informative=2,
        batch_size=512,
    )
    dm = CTRDataModule(**kwargs)
    dm.setup()
    trainer = L.Trainer(
        max_epochs=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        default_root_dir=tmp_path,
    )
    trainer.fit(_TinyCTRModel.build(dm.feature_spec), datamodule=dm)
    assert trainer.global_step == math.ceil(2400 / 512)
    ckpt_path = trainer.checkpoint_callback.best_model_path
    ckpt = torch.load(ckpt_path, weights_only=False)
    assert ckpt["CTRDataModule"]["preprocessor"] == dm.preprocessor.state_dict()
    fresh = CTRDataModule(**{**kwargs, "min_count": 10_000})  # alone, it would map everything to OOV
    model = _TinyCTRModel.build(dm.feature_spec)
    L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu").validate(
        model, datamodule=fresh, ckpt_path=ckpt_path, verbose=False
    )
    assert fresh.preprocessor.state_dict() == dm.preprocessor.state_dict()
    assert torch.equal(fresh.encoded.sparse, dm.encoded.sparse)


def test_datamodule_arguments_parse_from_command_line():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(CTRDataModule, "data")
    cfg = parser.parse_args(
        [
            "--data.format",
            "criteo",
            "--data.path",
            "train.txt",
            "--data.fields",
            "[I1, C3]",
            "--data.subset",
            "finetune",
            "--data.pretrain_fraction",
            "0.3",
        ]
    )
    dm = CTRDataModule(**cfg.data.as_dict())
    assert dm.hparams.fields == ["I1", "C3"] and dm.subset == "finetune" and dm.hparams.path == "train.txt"
    with pytest.raises(Exception, match="subset"):
        parser.parse_args(["--data.subset", "warmup"])
    # the flag's old name still works, with a deprecation warning
    old = parser.parse_args(["--data.format", "criteo", "--data.stage", "finetune"])
    with pytest.warns(DeprecationWarning, match="subset"):
        assert CTRDataModule(**old.data.as_dict()).subset == "finetune"
    with pytest.raises(Exception, match="stage"):
        parser.parse_args(["--data.stage", "warmup"])


def test_loaders_shard_rows_across_ranks_like_one_process_at_the_global_batch():
    """Training: a plain DistributedSampler over the attached trainer's ranks (one rank without a trainer), epochs
    set by Lightning; the ranks' i-th batches together are one process's i-th batch at the global batch size.
    Evaluation: every row once."""
    from types import SimpleNamespace

    from torch.utils.data import DistributedSampler

    def setup(world: int, rank: int, batch_size: int) -> CTRDataModule:
        dm = CTRDataModule(format="synthetic", synthetic_rows=500, subset="full", batch_size=batch_size, seed=4)
        dm.setup("fit")
        if world > 1:
            dm.trainer = SimpleNamespace(world_size=world, global_rank=rank)  # what Lightning attaches in fit
        return dm

    one = setup(1, 0, 20).train_dataloader()
    assert type(one.sampler) is DistributedSampler and one.sampler.num_replicas == 1
    one.sampler.set_epoch(3)
    single = [b.labels for b in one]
    assert sum(len(b) for b in single) == 400 and len(single) == 20
    shards = []
    for rank in range(2):
        loader = setup(2, rank, 10).train_dataloader()
        loader.sampler.set_epoch(3)
        shards.append([b.dense for b in loader])
    assert len(shards[0]) == len(shards[1]) == 20
    full = setup(1, 0, 20)
    loader = full.train_dataloader()
    loader.sampler.set_epoch(3)
    for i, batch in enumerate(loader):
        assert torch.equal(torch.cat([shards[0][i], shards[1][i]]).sort(dim=0).values, batch.dense.sort(dim=0).values)
    evals = [setup(3, r, 7).test_dataloader() for r in range(3)]
    rows = torch.cat([torch.cat([b.labels for b in loader]) for loader in evals])
    assert len(rows) == len(full.splits.test)  # every test row once, no padding
    attached = setup(3, 1, 7)
    assert len(attached.evaluation_loader("test").dataset) == len(full.splits.test)  # unsharded on request
    assert sum(len(b) for b in attached.evaluation_loader("test")) == len(full.splits.test)


def test_datamodule_parquet_list_valued_field_matches_csv_strings(tmp_path):
    rng = np.random.default_rng(0)
    n = 300
    tag_lists = [list(rng.choice(["a", "b", "c", "d"], size=k, replace=False)) for k in rng.integers(0, 4, n)]
    frame = pd.DataFrame(
        {"x": rng.normal(size=n), "u": rng.integers(0, 9, n).astype(str), "tags": tag_lists, "y": rng.integers(0, 2, n)}
    )
    frame.to_parquet(tmp_path / "d.parquet")
    frame.assign(tags=["|".join(t) for t in tag_lists]).to_csv(tmp_path / "d.csv", index=False)
    write(
        tmp_path / "s.yaml",
        """
        label: y
        fields: [{name: x, kind: dense}, u, {name: tags, kind: multi}]
        """,
    )
    loaders = []
    for fmt in ("parquet", "csv"):
        dm = CTRDataModule(format=fmt, path=str(tmp_path / f"d.{fmt}"), schema=str(tmp_path / "s.yaml"), batch_size=64)
        dm.setup()
        loaders.append(list(dm.val_dataloader()))
    for a, b in zip(*loaders):
        assert torch.equal(a.sparse.values(), b.sparse.values()) and torch.equal(a.sparse.lengths(), b.sparse.lengths())
        torch.testing.assert_close(a.dense, b.dense)
    assert loaders[0][0].sparse["tags"].lengths().sum() > 0
