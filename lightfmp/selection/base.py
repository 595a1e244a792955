"""The interface shared by the field-selection methods, their registry and the helpers they share.

A method turns a :class:`SelectionContext` (the stage-1 model and the stage-1 data) into one score per field,
higher meaning "keep first"; :func:`rank_fields` keeps the ``top_k`` best (ties broken by field position, as
:meth:`~lightfmp.gates.HardConcreteGate.kept_mask` does). Every method sees only the pretrain subset of the
training split and the validation split, never the test split.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Protocol

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from lightfmp.data.datamodule import CTRDataModule
from lightfmp.data.preprocess import EncodedFrame
from lightfmp.inputs import CTRBatch, ModelInputs
from lightfmp.lightning_module import LightFMPModule

DEFAULT_SELECTION = "lightfmp"


@dataclass
class SelectionContext:
    """What a selection method may use.

    Attributes:
        model: the stage-1 model (with its hard-concrete gates); methods that train their own model copy its
            architecture and optimisation settings (``ungated_copy``).
        data: the encoded table (all splits; methods read ``train_rows`` and ``val_rows`` only).
        train_rows: the pretrain subset of the training split (stage 1's data).
        val_rows: the validation split.
        epochs: training epochs of methods that fit a model (the CLI passes the trainer's ``max_epochs``).
        batch_size: training batch size of those fits; ``eval_batch_size``: rows per scoring batch.
        seed: seeds every random choice of a method.
    """

    model: LightFMPModule
    data: EncodedFrame
    train_rows: np.ndarray
    val_rows: np.ndarray
    epochs: int = 5
    batch_size: int = 256
    eval_batch_size: int = 4096
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 1:
            raise ValueError(
                f"selection methods that fit a model train for `epochs` epochs (the trainer's max_epochs from the "
                f"CLI), got {self.epochs!r}: set --trainer.max_epochs to a positive number"
            )

    @classmethod
    def from_datamodule(
        cls, model: LightFMPModule, datamodule: CTRDataModule, epochs: Optional[int] = None
    ) -> SelectionContext:
        """The context of a set-up datamodule: its pretrain subset, its validation split and its batch sizes."""
        if datamodule.encoded is None:
            datamodule.setup("fit")
        assert datamodule.encoded is not None and datamodule.splits is not None
        assert datamodule.pretrain_indices is not None
        return cls(
            model=model,
            data=datamodule.encoded,
            train_rows=np.asarray(datamodule.pretrain_indices),
            val_rows=np.asarray(datamodule.splits.val),
            epochs=5 if epochs is None else epochs,
            batch_size=datamodule.batch_size,
            eval_batch_size=datamodule.eval_batch_size or 4096,
            seed=datamodule.seed,
        )

    @property
    def spec(self) -> ModelInputs:
        return self.model.feature_spec

    @property
    def fields(self) -> list[str]:
        return list(self.spec.names)

    def generator(self, salt: int = 0) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + salt)


class SelectionMethod(Protocol):
    """A field-selection method: ``name`` and ``scores(context)``, one float per field (higher keeps first)."""

    name: str

    def scores(self, context: SelectionContext) -> pd.Series: ...


METHODS: dict[str, SelectionMethod] = {}


def register_method(cls: type) -> type:
    """Class decorator: register an instance of ``cls`` (which has a ``name``) as a selection method."""
    method = cls()
    if method.name in METHODS:
        raise ValueError(f"selection method {method.name!r} is already registered")
    METHODS[method.name] = method
    return cls


def get_method(name: str) -> SelectionMethod:
    """The registered method ``name``; an unknown name raises ``ValueError`` listing the valid ones."""
    if name not in METHODS:
        raise ValueError(f"unknown selection method {name!r}; expected one of {sorted(METHODS)}")
    return METHODS[name]


def check_selection(name: str, top_k: Optional[int]) -> None:
    """Fail early on a bad ``--selection``: unknown name, or a baseline without ``top_k`` (baselines rank the
    fields, they have no threshold; only ``lightfmp`` can keep fields by keep probability)."""
    get_method(name)
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive number of fields, got {top_k!r}")
    if name != DEFAULT_SELECTION and top_k is None:
        raise ValueError(
            f"selection method {name!r} ranks the fields and needs a budget: set top_k (--top_k K); "
            f"only {DEFAULT_SELECTION!r} can keep fields by a keep-probability threshold"
        )


def rank_fields(fields: Sequence[str], scores: pd.Series, top_k: int) -> pd.DataFrame:
    """Per-field table ``field, score, rank, kept`` sorted by rank; the ``top_k`` best are kept.

    Ties (and NaN scores, ranked last) are broken by field position.
    """
    if not 1 <= top_k <= len(fields):
        raise ValueError(f"top_k must be in [1, {len(fields)}], got {top_k}")
    values = [float(scores[f]) for f in fields]
    order = sorted(range(len(fields)), key=lambda i: (np.isnan(values[i]), -np.nan_to_num(values[i]), i))
    rank = np.empty(len(fields), dtype=np.int64)
    rank[order] = np.arange(1, len(fields) + 1)
    df = pd.DataFrame({"field": list(fields), "score": values, "rank": rank, "kept": rank <= top_k})
    return df.sort_values("rank", kind="stable").reset_index(drop=True)


# ------------------------------------------------------------------------------------------ shared helpers
def constant_fields(context: SelectionContext) -> list[str]:
    """Fields with a single value over the pretrain subset: they carry no information (a model can still use
    one as a bias, which is why gate-based methods may rank it high). A multi-valued field is constant when
    every row has the same number of values, all equal."""
    data, spec = context.data, context.spec
    rows = torch.as_tensor(context.train_rows, dtype=torch.long)
    if rows.numel() == 0:
        return []
    constant: set[str] = set()
    for j, name in enumerate(spec.dense):
        col = data.dense[rows, j]
        if bool(col.min() == col.max()):
            constant.add(name)
    singles = [f.name for f in spec.sparse if not f.multi_valued]
    for f in spec.sparse:
        if not f.multi_valued:
            col = data.sparse[rows, singles.index(f.name)]
            if bool(col.min() == col.max()):
                constant.add(f.name)
            continue
        offsets, values = data.multi[f.name]
        starts, lens = offsets[rows], offsets[rows + 1] - offsets[rows]
        if bool((lens != lens[0]).any()):
            continue
        total = int(lens.sum())
        within = torch.arange(total) - torch.repeat_interleave(torch.cumsum(lens, 0) - lens, lens, output_size=total)
        col = values[torch.repeat_interleave(starts, lens, output_size=total) + within]
        if col.numel() == 0 or bool(col.min() == col.max()):
            constant.add(f.name)
    return [n for n in spec.names if n in constant]


def ungated_copy(context: SelectionContext) -> LightFMPModule:
    """A freshly initialised model with the stage-1 architecture and optimiser settings, without gates
    (seeded by ``context.seed``)."""
    hp: dict[str, Any] = {k: v for k, v in context.model.hparams.items() if not k.startswith("_")}
    hp.update(field_mask=False, feature_spec=context.spec.to_dict())
    with torch.random.fork_rng():  # seeded, without changing the global random state of later stages
        torch.manual_seed(context.seed)
        return LightFMPModule(**hp)


def minibatches(rows: np.ndarray, batch_size: int, generator: Optional[torch.Generator]) -> Iterator[np.ndarray]:
    """``rows`` in batches, shuffled by ``generator`` (kept in order when None)."""
    rows = np.asarray(rows)
    if generator is not None:
        rows = rows[torch.randperm(len(rows), generator=generator).numpy()]
    for start in range(0, len(rows), batch_size):
        yield rows[start : start + batch_size]


def fit(
    context: SelectionContext,
    model: LightFMPModule,
    gates: Optional[Callable[[int], torch.Tensor]] = None,
    extra_parameters: Sequence[torch.nn.Parameter] = (),
    extra_lr: Optional[float] = None,
    penalty: Optional[Callable[[], torch.Tensor]] = None,
    before_step: Optional[Callable[[], None]] = None,
) -> LightFMPModule:
    """Train ``model`` on ``context.train_rows`` for ``context.epochs`` (BCE, AdamW with the model's lr and
    weight decay), a plain loop with the same batches as stage 1.

    ``gates(batch_size)`` gives the field gates of a batch (default: none, every field fully on);
    ``extra_parameters`` (the gate parameters of a method) get their own group with ``extra_lr`` and no weight
    decay; ``penalty()`` is added to the loss; ``before_step()`` runs before every training step (the
    architecture step of a bilevel method).
    """
    groups: list[dict[str, Any]] = [
        {"params": list(model._require_net().parameters()), "lr": model.lr, "weight_decay": model.weight_decay}
    ]
    if extra_parameters:
        groups.append({"params": list(extra_parameters), "lr": extra_lr or model.gate_lr, "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups)
    gen = context.generator(1)
    model.train()
    for _ in range(context.epochs):
        for rows in minibatches(context.train_rows, context.batch_size, gen):
            if before_step is not None:
                before_step()
            batch = context.data.batch(rows)
            logits = model(batch, None if gates is None else gates(len(batch)))
            loss = F.binary_cross_entropy_with_logits(logits, batch.labels)
            if penalty is not None:
                loss = loss + penalty()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    return model


def replace_field(batch: CTRBatch, donor: CTRBatch, spec: ModelInputs, field: str) -> CTRBatch:
    """``batch`` with the values of ``field`` taken from ``donor`` (same number of rows)."""
    if field in spec.dense:
        dense = batch.dense.clone()
        j = spec.dense.index(field)
        dense[:, j] = donor.dense[:, j]
        return CTRBatch(dense, batch.sparse, batch.labels)
    assert batch.sparse is not None and donor.sparse is not None
    jts = batch.sparse.to_dict()
    jts[field] = donor.sparse.to_dict()[field]
    return CTRBatch(batch.dense, KeyedJaggedTensor.from_jt_dict(jts), batch.labels)
