"""``lightfmp predict`` and ``LightFMPModule.predict_step``: scores of new rows equal the model's eager scores,
whatever the chunking and the file format; no label needed; row ids; clear errors; never a half-written file."""

from __future__ import annotations

import logging
import shutil

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch

from lightfmp.cli import main
from lightfmp.data.datamodule import CTRDataModule
from lightfmp.data.unlabeled import feature_chunks
from lightfmp.lightning_module import LightFMPModule
from lightfmp.predict import predict
from tests.lightfmp.finished_run import DENSE, SPARSE, eager_scores, new_rows, stage_model, tiny_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return tiny_run(tmp_path_factory.mktemp("predict") / "run")


@pytest.fixture(scope="module")
def rows():
    return new_rows()


def scores_of(path) -> pd.DataFrame:
    return pd.read_csv(path)


def test_predictions_equal_eager_scores_without_a_label_column(run, rows, tmp_path):
    rows.drop(columns="label").to_csv(tmp_path / "new.csv", index=False)
    out = tmp_path / "scores.csv"
    main(["predict", "--output_dir", str(run), "--data.path", str(tmp_path / "new.csv"), "--data.format", "csv",
          "--predictions", str(out), "--data.chunksize", "70", "--batch_size", "32"])  # fmt: skip
    got = scores_of(out)
    assert list(got.columns) == ["row", "score"]
    assert got.row.tolist() == list(range(len(rows)))
    expected = eager_scores(run / "finetune.ckpt", rows)
    np.testing.assert_allclose(got.score.to_numpy(), expected.numpy(), rtol=1e-6, atol=1e-6)
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_chunked_reading_gives_the_same_output_as_one_chunk(run, rows, tmp_path):
    rows.to_csv(tmp_path / "new.csv", index=False)  # a label column is there and ignored
    for name, chunksize, batch_size in (("one.csv", 10**6, 10**6), ("many.csv", 37, 11)):
        predict(run, tmp_path / "new.csv", tmp_path / name, "csv", chunksize=chunksize, batch_size=batch_size)
    one, many = scores_of(tmp_path / "one.csv"), scores_of(tmp_path / "many.csv")
    assert one.row.tolist() == many.row.tolist() == list(range(len(rows)))
    # batches of other sizes may differ in the last float32 bit (another summation order in the matmuls)
    np.testing.assert_allclose(one.score, many.score, rtol=1e-6, atol=1e-7)


def test_new_rows_are_read_in_chunks_of_bounded_size(run, rows, tmp_path):
    """The reader yields chunks of at most ``chunksize`` rows (the file is never read whole), row ids continuing."""
    rows.to_csv(tmp_path / "new.csv", index=False)
    _, preprocessor = stage_model(run / "finetune.ckpt")
    chunks = list(feature_chunks("csv", tmp_path / "new.csv", preprocessor.schema, chunksize=128))
    assert [len(frame) for frame, _ in chunks] == [128, 128, 44]
    assert np.concatenate([ids for _, ids in chunks]).tolist() == list(range(300))
    assert list(chunks[0][0].columns) == list(preprocessor.schema.names)  # only the kept fields, no label


def test_id_column_names_the_rows(run, rows, tmp_path):
    frame = rows.drop(columns="label")
    frame.insert(0, "user", [f"u{i * 3}" for i in range(len(frame))])
    frame.to_csv(tmp_path / "new.csv", index=False)
    predict(run, tmp_path / "new.csv", tmp_path / "scores.csv", "csv", id_column="user", chunksize=100)
    got = scores_of(tmp_path / "scores.csv")
    assert list(got.columns) == ["user", "score"] and got.user.tolist() == frame.user.tolist()
    with pytest.raises(ValueError, match=r"lacks the id column\(s\) \['nope'\]"):
        predict(run, tmp_path / "new.csv", tmp_path / "scores.csv", "csv", id_column="nope")


def test_every_streamed_format_gives_the_same_scores(run, rows, tmp_path):
    """criteo TSV with and without its label column (the default for a run on synthetic data, whose layout is
    Criteo's) and Parquet score like CSV."""
    from lightfmp.data.synthetic import write_criteo_tsv

    rows.drop(columns="label").to_csv(tmp_path / "new.csv", index=False)
    predict(run, tmp_path / "new.csv", tmp_path / "csv.csv", "csv")
    reference = scores_of(tmp_path / "csv.csv")
    write_criteo_tsv(rows, tmp_path / "labelled.tsv")
    write_criteo_tsv(rows.drop(columns="label"), tmp_path / "unlabelled.tsv")
    rows.drop(columns="label").to_parquet(tmp_path / "new.parquet")
    runs = {
        "labelled.tsv": None, "unlabelled.tsv": "criteo", "new.parquet": "parquet",
    }  # fmt: skip
    for name, data_format in runs.items():
        result = predict(run, tmp_path / name, tmp_path / f"{name}.csv", data_format, chunksize=64)
        assert result.rows == len(rows)
        got = scores_of(tmp_path / f"{name}.csv")
        np.testing.assert_allclose(got.score, reference.score, rtol=1e-6, atol=1e-7, err_msg=name)


def test_unknown_categories_score_as_out_of_vocabulary(run, rows, tmp_path):
    """A category never seen in training gets the out-of-vocabulary id 0, like a missing one: same score."""
    _, preprocessor = stage_model(run / "finetune.ckpt")
    sparse = [f.name for f in preprocessor.schema.fields if f.kind == "sparse"]
    assert sparse, "the kept fields should include a categorical one"
    frame = rows.drop(columns="label").iloc[:2].copy()
    frame = pd.concat([frame.iloc[[0]], frame.iloc[[0]]], ignore_index=True).astype(object)
    frame.loc[0, sparse] = "never-seen-in-training"
    frame.loc[1, sparse] = None
    frame.to_csv(tmp_path / "new.csv", index=False)
    predict(run, tmp_path / "new.csv", tmp_path / "scores.csv", "csv")
    got = scores_of(tmp_path / "scores.csv")
    assert got.score[0] == pytest.approx(got.score[1], abs=1e-7)


def test_a_run_without_finetune_uses_its_latest_stage(run, rows, tmp_path, caplog, monkeypatch):
    caplog.set_level(logging.INFO)
    # Lightning stops its records at "lightning.pytorch" (propagate False) when imported before logging is set up,
    # which depends on the test order: let them reach caplog's handler whatever the order
    monkeypatch.setattr(logging.getLogger("lightning.pytorch"), "propagate", True)
    rows.drop(columns="label").to_csv(tmp_path / "new.csv", index=False)
    for stage, files in (("prune", ("pretrain.ckpt", "pruned.ckpt")), ("pretrain", ("pretrain.ckpt",))):
        partial = tmp_path / stage
        partial.mkdir()
        for name in (*files, "preprocessor.json"):
            shutil.copy(run / name, partial / name)
        result = predict(partial, tmp_path / "new.csv", tmp_path / f"{stage}.csv", "csv")
        assert result.stage == stage and result.checkpoint == partial / files[-1]
        got = scores_of(tmp_path / f"{stage}.csv").score.to_numpy()
        np.testing.assert_allclose(got, eager_scores(partial / files[-1], rows).numpy(), rtol=1e-6, atol=1e-6)
    assert "with stage 'prune'" in caplog.text and "with stage 'pretrain'" in caplog.text  # the log says which
    result = predict(run, tmp_path / "new.csv", tmp_path / "chosen.csv", "csv", stage="pretrain")
    assert result.stage == "pretrain"


def test_missing_run_stage_file_or_column_is_named(run, rows, tmp_path):
    rows.drop(columns="label").to_csv(tmp_path / "new.csv", index=False)
    new, out = tmp_path / "new.csv", tmp_path / "scores.csv"
    with pytest.raises(FileNotFoundError, match="output_dir '.*nowhere' does not exist"):
        predict(tmp_path / "nowhere", new, out, "csv")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no stage checkpoint.*finetune.ckpt, pruned.ckpt, pretrain.ckpt"):
        predict(tmp_path / "empty", new, out, "csv")
    shutil.copy(run / "pretrain.ckpt", tmp_path / "empty" / "pretrain.ckpt")
    with pytest.raises(FileNotFoundError, match="no finetune.ckpt in .*stage 'finetune' has not run"):
        predict(tmp_path / "empty", new, out, "csv", stage="finetune")
    with pytest.raises(FileNotFoundError, match="data file .*absent.csv' does not exist"):
        predict(run, tmp_path / "absent.csv", out, "csv")
    _, preprocessor = stage_model(run / "finetune.ckpt")
    dropped = preprocessor.schema.names[0]
    rows.drop(columns=["label", dropped]).to_csv(tmp_path / "short.csv", index=False)
    with pytest.raises(ValueError, match=rf"lacks the field column\(s\) \['{dropped}'\] that the model needs"):
        predict(run, tmp_path / "short.csv", out, "csv")
    with pytest.raises(FileNotFoundError, match="directory of --predictions"):
        predict(run, new, tmp_path / "no_dir" / "scores.csv", "csv")
    with pytest.raises(ValueError, match="cannot read new rows of format 'movielens'"):
        predict(run, new, out, "movielens")
    assert not out.exists()


def test_a_failure_midway_leaves_no_half_written_output(rows, tmp_path):
    """A non-numeric value in a dense field after several chunks have been scored: the error names the value,
    field, file and line; the previous output is untouched and no temporary file is left."""
    run = tiny_run(tmp_path / "run", top_k=DENSE + SPARSE)  # every field kept, dense ones included
    _, preprocessor = stage_model(run / "finetune.ckpt")
    dense = [f.name for f in preprocessor.schema.fields if f.kind == "dense"]
    assert dense, "the kept fields should include a dense one"
    frame = rows.drop(columns="label").astype(object)
    frame.loc[250, dense[0]] = "oops"  # in the 6th chunk of 50 rows
    frame.to_csv(tmp_path / "bad.csv", index=False)
    out = tmp_path / "scores.csv"
    out.write_text("previous output\n")
    with pytest.raises(
        ValueError, match=f"malformed value 'oops' in numeric field '{dense[0]}' of .*bad.csv' at line 252"
    ):
        predict(run, tmp_path / "bad.csv", out, "csv", chunksize=50, batch_size=20)
    assert out.read_text() == "previous output\n"
    assert not (tmp_path / "scores.csv.tmp").exists()
    lines = (tmp_path / "bad.csv").read_text().splitlines()
    lines[100] += ",1"  # a line with one field too many: refused before anything is scored
    (tmp_path / "wide.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="malformed row in .*wide.csv' at line 101: it has 11 fields, expected 10"):
        predict(run, tmp_path / "wide.csv", out, "csv")
    assert out.read_text() == "previous output\n"


def test_predict_step_returns_probabilities():
    dm = CTRDataModule(
        format="synthetic",
        synthetic_rows=400,
        synthetic_dense=2,
        synthetic_sparse=3,
        synthetic_num_informative=2,
        batch_size=64,
    )
    dm.setup()
    module = LightFMPModule(backbone="mlp", embedding_dim=4, hidden=(8,), feature_spec=dm.feature_spec.to_dict())
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    got = torch.cat(trainer.predict(module, dataloaders=dm.test_dataloader()))
    module.eval()
    with torch.no_grad():
        expected = torch.cat([torch.sigmoid(module(b)) for b in dm.test_dataloader()])
    torch.testing.assert_close(got, expected)
    assert ((got > 0) & (got < 1)).all()


def test_a_csv_run_with_a_multi_valued_field_predicts_and_exports_alike(tmp_path):
    """A run on a CSV file (its own format is the default) with a jagged field: predict equals eager, and the
    exported program equals predict."""
    from lightfmp.cli import run_cli
    from lightfmp.export import export_inputs, load

    rng = np.random.default_rng(0)
    n = 400
    tags = ["|".join(rng.choice(list("abcde"), rng.integers(0, 4), replace=False)) for _ in range(n)]
    frame = pd.DataFrame({"x": rng.normal(size=n).round(2), "job": rng.choice(["p", "q", "r"], n), "tags": tags})
    frame["y"] = (frame.x + frame.tags.str.contains("a") + rng.normal(size=n) > 0.5).astype(int)
    frame.to_csv(tmp_path / "train.csv", index=False)
    schema = "label: y\nfields:\n  - {name: x, kind: dense}\n  - job\n  - {name: tags, kind: multi, pooling: mean}\n"
    (tmp_path / "schema.yaml").write_text(schema)
    run = tmp_path / "run"
    run_cli(["pipeline", "--data.format", "csv", "--data.path", str(tmp_path / "train.csv"), "--data.schema",
             str(tmp_path / "schema.yaml"), "--data.batch_size", "32", "--model.backbone", "deepfm",
             "--model.hidden", "[8]", "--model.embedding_dim", "4", "--trainer.max_epochs", "1",
             "--trainer.enable_progress_bar", "false", "--output_dir", str(run), "--top_k", "3"])  # fmt: skip
    new = frame.drop(columns="y").iloc[:50].copy()
    new.loc[0, "tags"] = "a|zzz"  # an unseen tag among known ones
    new.to_csv(tmp_path / "new.csv", index=False)
    result = main_predict(run, tmp_path / "new.csv", tmp_path / "scores.csv")
    assert result.stage == "finetune" and "tags" in result.fields
    got = scores_of(tmp_path / "scores.csv").score.to_numpy()
    np.testing.assert_allclose(got, eager_scores(run / "finetune.ckpt", new.assign(y=0)).numpy(), atol=1e-6)

    main(["export", "--output_dir", str(run), "--path", str(tmp_path / "model.pt2")])
    program, _ = load(tmp_path / "model.pt2")
    _, preprocessor = stage_model(run / "finetune.ckpt")
    encoded = preprocessor.encode_features(new)
    with torch.no_grad():
        exported = program.module()(*export_inputs(encoded.batch(torch.arange(len(new)))))
    np.testing.assert_allclose(exported.numpy(), got, atol=1e-6)


def main_predict(run, data, out):
    """``predict`` with the run's own data format (no ``data_format``)."""
    return predict(run, data, out, chunksize=16, batch_size=8)
