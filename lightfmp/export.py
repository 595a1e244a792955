"""``lightfmp export``: a finished run's model as a ``torch.export`` program (``.pt2``) on plain tensors.

::

    lightfmp export --output_dir RUN --path model.pt2 [--stage finetune|prune|pretrain]

The model is the run's latest stage (the pruned and fine-tuned one after ``pipeline``; see
:func:`lightfmp.saved_run.load_run`). A TorchRec ``KeyedJaggedTensor`` is not a plain tensor input, so
:class:`ExportableScorer` takes the batch as three tensors and builds the ``KeyedJaggedTensor`` inside the
program::

    scores = program.module()(dense, values, lengths)
    dense   float32 (B, n_dense)      encoded dense fields, in the order of metadata["dense"]
    values  int64   (nnz,)            the ids of every sparse field, field-major (all rows of field 0, then 1, ...)
    lengths int32   (n_sparse, B)     ids per row of each sparse field (1 for single-valued fields)
    scores  float32 (B,)              probability of label 1 (what ``lightfmp predict`` writes)

The batch size and ``nnz`` are dynamic. Inputs are encoded ids and normalised numbers: encode raw rows with the
run's ``preprocessor.json`` (:meth:`~lightfmp.data.preprocess.Preprocessor.encode_features`, then
:meth:`~lightfmp.data.preprocess.EncodedFrame.batch` and :func:`export_inputs`). The file holds the input
description as ``extra_files["lightfmp.json"]`` (:func:`load` reads both). The graph holds ATen operators only:
``torch.export.load`` runs it without TorchRec installed.

Export is checked before the file is written: the exported program's scores must equal the eager model's on an
example batch. TorchScript and ONNX are not supported (README "Predict and export", with the errors):
``torch.jit.script`` stops at the backbones' Python (comprehension ifs) and is deprecated by torch itself,
``torch.jit.trace`` bakes the example's id counts into the graph, and ``torch.onnx.export`` needs the
``onnxscript`` package, which this project does not install.
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from lightfmp.backbones import CTRBackbone
from lightfmp.gates import HardConcreteGate
from lightfmp.inputs import CTRBatch, ModelInputs
from lightfmp.lightning_module import LightFMPModule
from lightfmp.outputs import PathLike, atomic_write
from lightfmp.saved_run import STAGE_CHECKPOINTS, load_run

METADATA_FILE = "lightfmp.json"

__all__ = ["ExportableScorer", "example_inputs", "export_inputs", "export_module", "export_run", "load", "main"]


class ExportableScorer(nn.Module):
    """A Light-FMP model on plain tensors: ``forward(dense, values, lengths) -> scores`` (see the module docstring).

    A model with a field mask (stage 1) applies its deterministic test-time gates, as in evaluation.
    """

    def __init__(self, module: LightFMPModule) -> None:
        super().__init__()
        if module.net is None:
            raise RuntimeError("the model is not built yet: give feature_spec or fit it first")
        self.net: CTRBackbone = module.net
        self.gate: Optional[HardConcreteGate] = module.gate
        self.keys = list(module.feature_spec.sparse_names)

    def forward(self, dense: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        sparse = KeyedJaggedTensor(keys=self.keys, values=values, lengths=lengths.reshape(-1)) if self.keys else None
        gates = self.gate(dense.shape[0]) if self.gate is not None else None
        return torch.sigmoid(self.net(dense, sparse, gates))


def export_inputs(batch: CTRBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dense, values, lengths)`` of a batch, as :class:`ExportableScorer` and the exported program take them."""
    sparse = batch.sparse
    b = batch.dense.shape[0]
    if sparse is None or not sparse.keys():
        return batch.dense, torch.zeros(0, dtype=torch.long), torch.zeros(0, b, dtype=torch.int32)
    return batch.dense, sparse.values().long(), sparse.lengths().int().reshape(len(sparse.keys()), b)


def example_inputs(spec: ModelInputs, batch_size: int = 4, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random inputs of :class:`ExportableScorer` for ``spec`` (multi-valued fields get 1-3 ids per row)."""
    g = torch.Generator().manual_seed(seed)
    counts = [
        torch.randint(1, 4, (batch_size,), generator=g) if f.multi_valued else torch.ones(batch_size, dtype=torch.long)
        for f in spec.sparse
    ]
    lengths = torch.stack(counts).int() if counts else torch.zeros(0, batch_size, dtype=torch.int32)
    per_field = lengths.sum(1).tolist()
    values = (
        torch.cat([torch.randint(0, f.num_embeddings, (int(n),), generator=g) for f, n in zip(spec.sparse, per_field)])
        if spec.sparse
        else torch.zeros(0, dtype=torch.long)
    )
    return torch.randn(batch_size, len(spec.dense), generator=g), values, lengths


def export_module(module: LightFMPModule, example: Optional[tuple[torch.Tensor, ...]] = None) -> Any:
    """``torch.export.export`` of ``module`` (eval mode, on plain tensors) with a dynamic batch size and ``nnz``;
    ``example``: inputs to trace with (default: :func:`example_inputs`, batch size 4). Returns the
    ``ExportedProgram``; raises ``RuntimeError`` when its scores differ from the eager model's on the example."""
    module = module.eval()
    scorer = ExportableScorer(module).eval()
    spec = module.feature_spec
    example = example if example is not None else example_inputs(spec)
    batch = torch.export.Dim("batch", min=1)
    dynamic: tuple[Any, ...] = (
        {0: batch},
        {0: torch.export.Dim("nnz", min=1)} if spec.sparse else None,
        {1: batch},
    )
    with torch.no_grad():
        # non-strict: TorchRec's KeyedJaggedTensor is traced as Python code (TorchRec's recommended mode)
        program = torch.export.export(scorer, example, dynamic_shapes=dynamic, strict=False)
        eager, exported = scorer(*example), program.module()(*example)
    if not torch.allclose(eager, exported, rtol=1e-5, atol=1e-6):
        raise RuntimeError(
            f"the exported program's scores differ from the eager model's (max difference "
            f"{(eager - exported).abs().max().item():.3g}); not saved"
        )
    return program


def _metadata(module: LightFMPModule, stage: str, checkpoint: Path) -> dict[str, Any]:
    spec = module.feature_spec
    return {
        "stage": stage,
        "checkpoint": str(checkpoint),
        "backbone": module.backbone,
        "inputs": ["dense", "values", "lengths"],
        "output": "scores: probability of label 1, shape (B,)",
        "dense": list(spec.dense),
        "sparse": [
            {"name": f.name, "num_embeddings": f.num_embeddings, "multi_valued": f.multi_valued} for f in spec.sparse
        ],
        "feature_spec": spec.to_dict(),
    }


def export_run(output_dir: PathLike, path: PathLike, stage: Optional[str] = None) -> dict[str, Any]:
    """Export the model of a finished run to ``path`` (``torch.export.save``, atomic: a temporary file renamed);
    returns the metadata stored with it (stage, checkpoint, input fields)."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"--path {str(path)!r} is a directory; give a file name such as model.pt2")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"the directory of --path {str(path)!r} does not exist ({str(path.parent)!r})")
    run = load_run(output_dir, stage)
    program = export_module(run.module)
    metadata = _metadata(run.module, run.stage, run.checkpoint)
    extra = {METADATA_FILE: json.dumps(metadata)}
    buffer = io.BytesIO()  # torch.export.save wants a name ending in .pt2 or a buffer, not atomic_write's <path>.tmp
    torch.export.save(program, buffer, extra_files=extra)
    atomic_write(path, lambda p: p.write_bytes(buffer.getvalue()))
    return metadata


def load(path: PathLike) -> tuple[Any, dict[str, Any]]:
    """``(ExportedProgram, metadata)`` of a file written by :func:`export_run`."""
    extra = {METADATA_FILE: ""}
    program = torch.export.load(str(path), extra_files=extra)
    return program, json.loads(extra[METADATA_FILE]) if extra[METADATA_FILE] else {}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightfmp export", description="Export a finished Light-FMP run's model with torch.export (.pt2)."
    )
    parser.add_argument("--output_dir", required=True, help="the output directory of a finished run")
    parser.add_argument("--path", required=True, help="the file to write (e.g. model.pt2)")
    parser.add_argument(
        "--stage", choices=list(STAGE_CHECKPOINTS), default=None, help="which stage's model (default: the latest)"
    )
    return parser


def main(args: Optional[list[str]] = None) -> dict[str, Any]:
    """``lightfmp export`` (``args`` without the subcommand's name)."""
    ns = build_parser().parse_args(args)
    metadata = export_run(ns.output_dir, ns.path, ns.stage)
    print(
        f"exported the {metadata['stage']} model ({metadata['checkpoint']}, {metadata['backbone']}, "
        f"{len(metadata['feature_spec']['dense']) + len(metadata['sparse'])} fields) to {ns.path}"
    )
    return metadata
