"""Causal language modelling in the ``grain`` command: batches, GRAIN exact on GPT-2, perplexity, fit, sweep."""

from __future__ import annotations

import json
import math
import warnings

import lightning as L
import pandas as pd
import pytest
import torch
import yaml

from grain_lightning import GrainConfig
from grain_lightning.cli import main as grain_main
from grain_lightning.text import TextDataModule, TextModel, monitor_of
from tests.grain_lightning.text.fixtures import reviews_csv, tiny_gpt2_dir

QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


@pytest.fixture
def setting(tmp_path, monkeypatch):
    monkeypatch.setenv("GRAIN_CACHE", str(tmp_path / "cache"))
    csv = reviews_csv(tmp_path)
    text_only = tmp_path / "text_only.csv"
    pd.read_csv(csv)[["text", "size"]].to_csv(text_only, index=False)  # no label column: none is needed
    return tiny_gpt2_dir(tmp_path), text_only


def _data(model_dir, csv, **kw) -> TextDataModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the 2 blank texts dropped
        return TextDataModule(path=str(csv), tokenizer=str(model_dir), task="causal_lm", **kw)


def _trainer(**kw) -> L.Trainer:
    return L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, **kw)  # fmt: skip


def test_batches_label_every_token_and_mask_padding(setting):
    model_dir, csv = setting
    dm = _data(model_dir, csv, pad_to_multiple_of=1, where={"size": ["small"]})
    assert dm.num_labels == 0
    frame = pd.read_csv(csv).dropna()
    assert sum(dm.split_sizes().values()) == int((frame["size"] == "small").sum())  # only the rows kept by `where`
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert labels.shape == ids.shape and labels.dtype == torch.int64
    assert torch.equal(labels[mask == 1], ids[mask == 1]) and (labels[mask == 0] == -100).all()
    assert (mask == 0).any()  # texts of different lengths: some padding to mask
    lengths = mask.sum(1)
    assert (ids[:, 0] == 1).all() and (ids[torch.arange(len(ids)), lengths - 1] == 1).all()  # <|endoftext|> around
    with pytest.raises(ValueError, match=r"where=\{'size': \['huge'\]\} keeps no row; values of that column"):
        _data(model_dir, csv, where={"size": ["huge"]})


def test_perplexity_is_exp_of_the_token_mean_loss_over_the_split(setting):
    """``val_ppl`` against Hugging Face's own shifted loss, one unpadded text at a time; ``val_loss`` is the mean of
    the per-text token-mean losses."""
    model_dir, csv = setting
    dm = _data(model_dir, csv, eval_batch_size=4, val_fraction=0.3)
    torch.manual_seed(0)
    model = TextModel(str(model_dir), task="causal_lm")
    got = _trainer().validate(model, datamodule=dm, verbose=False)[0]
    nll_sum, tokens, per_text = 0.0, 0, []
    model.eval()
    with torch.no_grad():
        for ids, mask in ((b["input_ids"], b["attention_mask"]) for b in dm.val_dataloader()):
            for row, m in zip(ids, mask):
                x = row[m.bool()][None]  # one text, no padding
                loss = float(model.model(input_ids=x, labels=x).loss.double())  # HF: token-mean over T - 1 tokens
                nll_sum, tokens = nll_sum + loss * (x.shape[1] - 1), tokens + x.shape[1] - 1
                per_text.append(loss)
    assert len(per_text) == dm.split_sizes()["val"]
    assert any((b["attention_mask"] == 0).any() for b in dm.val_dataloader())  # padded batches were evaluated
    assert got["val_ppl"] == pytest.approx(math.exp(nll_sum / tokens), rel=1e-5)
    assert got["val_loss"] == pytest.approx(sum(per_text) / len(per_text), rel=1e-5)
    # the two definitions differ by more than the tolerance above, so val_ppl is token-weighted, not per text
    assert math.exp(nll_sum / tokens) != pytest.approx(math.exp(sum(per_text) / len(per_text)), rel=2e-5)
    assert monitor_of(model.task) == ("val_ppl", "min")


@pytest.mark.parametrize("grouping", ["sample", 3])
def test_grain_on_gpt2_matches_the_reference_engine(setting, grouping):
    """The one-backward engine on a causal LM (GPT-2: Conv1D, tied ``wte``/``lm_head``, ``wpe`` called with broadcast
    position ids, right padding): the direction it sets before the optimizer step equals the reference engine's
    (one backward per group), in float64, on every step."""
    model_dir, csv = setting

    class Directions(L.Callback):
        def __init__(self):
            self.grads = []

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            self.grads.append({n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None})

    runs = {}
    for engine in ("ghost", "reference"):
        dm = _data(model_dir, csv, train_size=24, batch_size=8, subset_seed=0, pad_to_multiple_of=1)
        torch.manual_seed(0)
        cfg = GrainConfig(grouping=grouping, engine=engine, unsupported="raise", self_check=False)
        model = TextModel(str(model_dir), task="causal_lm", lr=1e-2, grain=cfg)
        directions = Directions()
        L.seed_everything(1)  # the same data order in both runs
        _trainer(max_epochs=1, precision="64-true", callbacks=[directions], num_sanity_val_steps=0).fit(model, dm)
        if engine == "ghost":
            assert model.grain_engine is not None and model.grain_engine.unsupported_modules == []
        runs[engine] = directions.grads
    assert len(runs["ghost"]) == len(runs["reference"]) == 3
    for ghost, reference in zip(runs["ghost"], runs["reference"]):
        assert ghost.keys() == reference.keys() and "model.transformer.wte.weight" in ghost
        for name in ghost:
            torch.testing.assert_close(ghost[name], reference[name], rtol=1e-9, atol=1e-12, msg=name)


def test_grain_fit_causal_lm_writes_perplexity_to_result_json(setting, tmp_path):
    model_dir, csv = setting
    out = tmp_path / "run"
    grain_main([
        "fit", "--model.pretrained", str(model_dir), "--data.path", str(csv), "--data.task", "causal_lm",
        "--data.train_size", "32", "--trainer.max_epochs", "2", "--trainer.default_root_dir", str(out),
        "--result_json", str(out / "result.json"), "--seed_everything", "3", "--model.grain.grouping", "4",
        "--model.lr", "1e-2", "--data.where", '{"size": [small, large]}', *QUIET,  # `where` parses (keeps all)
    ])  # fmt: skip
    result = json.loads((out / "result.json").read_text())
    assert (result["monitor"], result["mode"], result["test_metric"]) == ("val_ppl", "min", "test_ppl")
    assert set(result["val"]) == {"val_ppl", "val_loss"} and set(result["test"]) == {"test_ppl", "test_loss"}
    assert result["steps"] == 4 and 1.0 < result["test"]["test_ppl"] < 1e3
    assert result["curve"][0]["val_ppl"] > result["curve"][-1]["val_ppl"]  # it learns: the words are few


def test_sweep_reports_perplexity_lower_is_better(setting, tmp_path):
    """``grain sweep`` with the real worker (``grain fit`` processes) on the tiny GPT-2, 2 seeds."""
    from grain_lightning.sweep import main as sweep_main

    model_dir, csv = setting
    config = tmp_path / "lm.yaml"
    config.write_text(yaml.safe_dump({
        "trainer": {"max_epochs": 1, "accelerator": "cpu", "enable_checkpointing": False, "logger": False,
                    "enable_progress_bar": False, "enable_model_summary": False},
        "model": {"pretrained": str(model_dir)},
        "data": {"path": str(csv), "task": "causal_lm", "train_size": 16, "batch_size": 8},
    }))  # fmt: skip
    out = tmp_path / "sweep"
    argv = ["--config", str(config), "--seeds", "2", "--methods", "mean,grain-sample", "--lrs", "1e-2", "--jobs", "2"]
    assert sweep_main([*argv, "--output_dir", str(out), "--quiet"]) == 0
    runs = pd.read_csv(out / "runs.csv")
    assert len(runs) == 4 and runs["test_ppl"].between(1.0, 1e3).all()
    summary = pd.read_csv(out / "summary.csv").set_index("method")
    assert summary.loc["mean", "worst"] == runs.loc[runs["method"] == "mean", "test_ppl"].max()  # worst = highest
    assert "test_ppl (lower is better)" in (out / "summary.md").read_text()


def test_lora_on_a_causal_lm_trains_only_adapters_on_the_one_backward_engine(setting):
    """``lora_r`` with ``causal_lm``: peft's default targets for GPT-2 (``c_attn``), the tied embedding / LM head
    frozen; the engine's self-check compares it with autograd on every step."""
    model_dir, csv = setting
    dm = _data(model_dir, csv, train_size=24, batch_size=8)
    torch.manual_seed(0)
    cfg = GrainConfig(engine="ghost", unsupported="raise", self_check=1)
    model = TextModel(str(model_dir), task="causal_lm", lr=1e-2, lora_r=4, grain=cfg)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and "c_attn" in n for n in trainable)
    _trainer(max_epochs=1, num_sanity_val_steps=0).fit(model, dm)
    assert model.grain_self_check_passed == 3
