"""``lightfmp export``: the pruned model as a ``torch.export`` program whose scores equal the eager model's, for
every backbone; TorchScript and ONNX fail as the README documents."""

from __future__ import annotations

import importlib.util
import io
import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from lightfmp.backbones import BACKBONES
from lightfmp.cli import main
from lightfmp.export import ExportableScorer, example_inputs, export_inputs, export_module, load
from lightfmp.inputs import ModelInputs
from lightfmp.lightning_module import LightFMPModule
from lightfmp.predict import predict
from tests.lightfmp.batches import SPEC, random_batch, restrict
from tests.lightfmp.finished_run import new_rows, stage_model, tiny_run

KEEP = ["d0", "d2", "s0", "genres", "s3"]  # a multi-valued field among the kept ones


def pruned_module(backbone: str) -> LightFMPModule:
    torch.manual_seed(0)
    masked = LightFMPModule(backbone=backbone, embedding_dim=4, hidden=(8,), feature_spec=SPEC.to_dict())
    return masked.pruned(KEEP).eval()


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_exported_program_equals_eager_for_every_backbone(backbone, tmp_path):
    module = pruned_module(backbone)
    program = export_module(module)  # traced on a batch of 4
    batch = restrict(random_batch(batch_size=9, seed=3), SPEC, module.feature_spec)  # another size and nnz
    with torch.no_grad():
        eager = torch.sigmoid(module(batch))
        torch.testing.assert_close(program.module()(*export_inputs(batch)), eager, rtol=1e-6, atol=1e-6)
    torch.export.save(program, tmp_path / "model.pt2")
    with torch.no_grad():
        reloaded = torch.export.load(tmp_path / "model.pt2").module()(*export_inputs(batch))
    torch.testing.assert_close(reloaded, eager, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fields", ["dense only", "sparse only"])
def test_models_without_dense_or_sparse_fields_export(fields):
    spec = ModelInputs(dense=("a", "b")) if fields == "dense only" else SPEC.select(["s0", "genres"])
    module = LightFMPModule(
        backbone="dlrm", embedding_dim=4, hidden=(8,), field_mask=False, feature_spec=spec.to_dict()
    )
    program = export_module(module.eval())
    batch = random_batch(spec, batch_size=9, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(*export_inputs(batch)), torch.sigmoid(module(batch)))


def test_a_gated_stage_one_model_exports_with_its_test_time_gates():
    torch.manual_seed(0)
    masked = LightFMPModule(backbone="dcnv2", embedding_dim=4, hidden=(8,), feature_spec=SPEC.to_dict()).eval()
    program = export_module(masked)
    batch = random_batch(batch_size=5, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(*export_inputs(batch)), torch.sigmoid(masked(batch)))


def test_export_command_writes_a_program_that_scores_like_predict(tmp_path):
    run = tiny_run(tmp_path / "run", backbone="deepfm")
    main(["export", "--output_dir", str(run), "--path", str(tmp_path / "model.pt2")])
    program, metadata = load(tmp_path / "model.pt2")
    module, preprocessor = stage_model(run / "finetune.ckpt")
    assert metadata["stage"] == "finetune" and metadata["backbone"] == "deepfm"
    assert metadata["dense"] == list(module.feature_spec.dense)
    assert [f["name"] for f in metadata["sparse"]] == list(module.feature_spec.sparse_names)
    assert not (tmp_path / "model.pt2.tmp").exists()

    rows = new_rows(rows=120)
    rows.drop(columns="label").to_csv(tmp_path / "new.csv", index=False)
    predict(run, tmp_path / "new.csv", tmp_path / "scores.csv", "csv")
    encoded = preprocessor.encode_features(rows[list(preprocessor.schema.names)])
    with torch.no_grad():
        exported = program.module()(*export_inputs(encoded.batch(torch.arange(len(rows)))))
    predicted = pd.read_csv(tmp_path / "scores.csv").score.to_numpy()
    np.testing.assert_allclose(exported.numpy(), predicted, rtol=1e-6, atol=1e-6)

    # the program runs in a process that never imports TorchRec
    code = (
        "import sys, torch; p = torch.export.load(sys.argv[1]); "
        "assert 'torchrec' not in sys.modules and 'fbgemm' not in p.graph_module.code; print('ok')"
    )
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "model.pt2")], capture_output=True, text=True)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-2000:]

    with pytest.raises(FileNotFoundError, match="holds no stage checkpoint"):
        main(["export", "--output_dir", str(tmp_path), "--path", str(tmp_path / "other.pt2")])
    with pytest.raises(IsADirectoryError, match="is a directory"):
        main(["export", "--output_dir", str(run), "--path", str(tmp_path)])
    assert json.loads(json.dumps(metadata)) == metadata


def test_torchscript_and_onnx_fail_as_documented():
    """README "Predict and export" states these errors; this test keeps it true."""
    module = pruned_module("mlp")
    scorer = ExportableScorer(module).eval()
    with pytest.raises(torch.jit.frontend.NotSupportedError, match="Comprehension ifs are not supported"):
        torch.jit.script(scorer)
    example = example_inputs(module.feature_spec)
    with torch.no_grad():
        traced = torch.jit.trace(scorer, example, check_trace=False)
        other = export_inputs(restrict(random_batch(batch_size=7, seed=5), SPEC, module.feature_spec))
        with pytest.raises(RuntimeError, match="split_with_sizes expects split_sizes to sum exactly"):
            traced(*other)
    # the README's ONNX statement holds for the pinned environment, which has no onnxscript: if it ever gets one,
    # this fails and the statement (and this test) must be redone, rather than passing without checking anything
    assert importlib.util.find_spec("onnxscript") is None, "onnxscript is installed: recheck README's ONNX status"
    with pytest.raises(ModuleNotFoundError, match="onnxscript"):
        torch.onnx.export(scorer, example, io.BytesIO())
