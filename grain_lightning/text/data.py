r"""``TextDataModule``: a text column and a label column of CSV/Parquet files, tokenized once, served as batches.
(Causal language modelling needs only the text column.)

Splits. One file (``path``) is split at random into test, validation and train (``test_fraction``,
``val_fraction``, seeded by ``split_seed``); or ``train_path`` with optional ``val_path`` / ``test_path``
(validation carved from train by ``val_fraction`` when absent). ``val_size`` / ``test_size`` cap those splits
(seeded by ``split_seed``, so they are the same for every run). ``train_size`` draws a random subset of the
training split seeded by ``subset_seed`` (default: the run's seed, ``seed_everything``): in a seed sweep the
seed changes the subset, the data order and the new head's initialisation together.

Labels. Classification: the distinct values of ``label_column`` over every file, sorted, become class ids
``0 .. C-1`` (``num_labels = C``; a single class is refused). Regression: floats, standardised with the
training subset's mean and std (``target_mean`` / ``target_std``; the model reports RMSE in the original unit).
Causal language modelling (``causal_lm``): no label column; a batch's ``"labels"`` are its ``"input_ids"`` with
``-100`` at padding (the model shifts them: position ``t`` predicts token ``t + 1``). Special tokens (e.g. a
BOS/EOS around each text) are whatever the tokenizer adds.

Rows. ``where`` keeps only the rows whose column values are among the given ones (compared as strings, e.g.
``{"Division Name": ["Initmates"]}``), in every file, before anything else: splits, subsets and labels see only
those rows.

Groups. ``group_column`` (optional) names a column whose distinct values over every labelled file (as strings,
sorted; a missing value is its own group, ``"<missing>"``) become ids ``0 .. G-1``, served as ``"groups"``: GRAIN
groups a batch by it with ``--model.grain.grouping key:groups`` (e.g. the product division of a review, or the
rating of a regression target, whose ``"labels"`` are standardised floats).

Tokens. The tokenizer of the model directory (``tokenizer``; ``"minilm"`` for the packaged all-MiniLM-L6-v2)
encodes each file's text column once, truncated to ``max_length``; the ids are cached on disk
(``<cache>/tokens/<key>.npz``, the key hashing the file's path, size and mtime, the column, the tokenizer
files and ``max_length``) and reused by later runs. A batch is padded to its longest sequence, rounded up to a
multiple of ``pad_to_multiple_of``:
``{"input_ids": (n, T) int64, "attention_mask": (n, T) int64, "labels": (n,) int64 | float32}`` (``(n, T)``
int64 for ``causal_lm``; plus ``"groups": (n,) int64`` with a ``group_column``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import lightning as L
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

from grain_lightning.files import atomic_write
from grain_lightning.text.pretrained import cache_dir, resolve_pretrained

__all__ = ["BUILTIN_DATA", "TASKS", "TextDataModule", "data_file", "read_table"]

TASKS = ("classification", "regression", "causal_lm")
MISSING_GROUP = "<missing>"  # the group of a row whose group_column value is missing
_TOKEN_CACHE_VERSION = 1
_IGNORE_INDEX = -100  # a label that is not predicted (padding of a causal_lm batch)
_RESOURCES = Path(__file__).resolve().parent / "resources"

#: files shipped with the package, usable by name as ``path``: 3,000 reviews drawn at random (seed 0) from the
#: Women's E-Commerce Clothing Reviews (CC0), columns ``Review Text``, ``Title``, ``Rating``, ``Recommended IND``,
#: ``Age``, ``Division Name``, ``Department Name``, ``Class Name``
BUILTIN_DATA = {"clothing_reviews": _RESOURCES / "clothing_reviews_3000.csv.gz"}


def data_file(path: str) -> Path:
    """``path`` as a file: a name in :data:`BUILTIN_DATA`, else the path itself (``~`` expanded)."""
    return BUILTIN_DATA.get(str(path), Path(path).expanduser())


def read_table(path: str) -> pd.DataFrame:
    """Read a CSV (optionally compressed) or Parquet file, or a :data:`BUILTIN_DATA` name; errors name the file."""
    file = data_file(path)
    if file.is_dir():
        raise IsADirectoryError(f"data file {str(path)!r} is a directory; give a CSV or Parquet file")
    if not file.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist")
    try:
        if file.suffix == ".parquet" or file.name.endswith(".parquet.gz"):
            return pd.read_parquet(file)
        return pd.read_csv(file)
    except Exception as err:  # pandas/pyarrow errors do not always name the file
        raise ValueError(f"cannot read data file {str(path)!r}: {err}") from err


@dataclass
class _Table:
    """One file's token ids and labels (rows with missing text removed)."""

    ids: np.ndarray  # (N, max_length) int32, zero-padded
    lengths: np.ndarray  # (N,) int32
    labels: np.ndarray  # (N,) raw label values


class _Rows(Dataset):
    def __init__(
        self, table: _Table, rows: np.ndarray, targets: Optional[np.ndarray], groups: Optional[np.ndarray] = None
    ) -> None:
        self.table, self.rows, self.targets, self.groups = table, rows, targets, groups

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int, Any, Optional[int]]:
        r = self.rows[i]
        target = self.targets[i] if self.targets is not None else 0
        group = int(self.groups[i]) if self.groups is not None else None
        return self.table.ids[r], int(self.table.lengths[r]), target, group


def _collate(
    items: list[tuple[np.ndarray, int, Any, Optional[int]]], multiple: int, causal: bool = False
) -> dict[str, torch.Tensor]:
    longest = max(1, max(item[1] for item in items))
    width = min(-(-longest // multiple) * multiple, len(items[0][0]))
    ids = torch.from_numpy(np.stack([item[0][:width] for item in items]).astype(np.int64))
    lengths = torch.tensor([item[1] for item in items])
    mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    if causal:
        labels = ids.masked_fill(mask == 0, _IGNORE_INDEX)
    else:
        targets = np.asarray([item[2] for item in items])
        labels = torch.from_numpy(targets.astype(np.float32 if targets.dtype.kind == "f" else np.int64))
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if items[0][3] is not None:
        batch["groups"] = torch.tensor([item[3] for item in items], dtype=torch.int64)
    return batch


class TextDataModule(L.LightningDataModule):
    """Text classification, regression or causal language modelling data from CSV/Parquet files (see the module
    docstring).

    Args:
        path: one file, split into train/validation/test (or ``"clothing_reviews"``, the sample shipped with
            the package, :data:`BUILTIN_DATA`). Or give ``train_path`` (and optionally ``val_path``, ``test_path``).
        text_column, label_column: column names (``label_column`` is not read for ``causal_lm``).
        group_column: a column whose values become the batch's ``"groups"`` ids (see the module docstring).
        task: ``"classification"``, ``"regression"`` or ``"causal_lm"``.
        where: keep only rows whose ``column`` value (as a string) is one of the listed values, in every file.
        tokenizer: a local model directory with tokenizer files, or ``"minilm"`` (linked to
            ``--model.pretrained`` by the ``grain`` command).
        max_length: tokens kept per text (truncation).
        train_size: draw this many training rows (``None``: all), seeded by ``subset_seed``.
        val_size, test_size: cap the validation / test splits (fixed by ``split_seed``).
        val_fraction, test_fraction: split fractions when a split has no file of its own.
        split_seed: seed of the train/validation/test split.
        subset_seed: seed of the ``train_size`` subset (``None``: the run's ``seed_everything`` seed).
        batch_size, eval_batch_size, num_workers: loaders.
        predict_path: file served by ``predict_dataloader`` (default: the test split).
        drop_missing_text: drop rows whose text is missing, with a warning giving the count (else an error).
        pad_to_multiple_of: a batch is padded to its longest text rounded up to this multiple (at most
            ``max_length``): few distinct shapes, so GRAIN's self-check (run on every new set of layer input
            shapes) stays rare.
    """

    def __init__(
        self,
        path: Optional[str] = None,
        train_path: Optional[str] = None,
        val_path: Optional[str] = None,
        test_path: Optional[str] = None,
        text_column: str = "text",
        label_column: str = "label",
        group_column: Optional[str] = None,
        task: Literal["classification", "regression", "causal_lm"] = "classification",
        where: Optional[dict[str, list[str]]] = None,
        tokenizer: str = "minilm",
        max_length: int = 128,
        train_size: Optional[int] = None,
        val_size: Optional[int] = None,
        test_size: Optional[int] = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        split_seed: int = 0,
        subset_seed: Optional[int] = None,
        batch_size: int = 16,
        eval_batch_size: int = 64,
        num_workers: int = 0,
        predict_path: Optional[str] = None,
        drop_missing_text: bool = True,
        pad_to_multiple_of: int = 16,
    ) -> None:
        super().__init__()
        if (path is None) == (train_path is None):
            raise ValueError(
                f"give either path (one file, split at random) or train_path (with optional val_path/test_path); "
                f"got path={path!r}, train_path={train_path!r}"
            )
        if path is not None and (val_path or test_path):
            raise ValueError("val_path/test_path go with train_path, not with path")
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        if where is not None and (
            not isinstance(where, dict) or not all(isinstance(v, (list, tuple)) and v for v in where.values())
        ):
            raise ValueError(f"where must map a column name to a non-empty list of values, got {where!r}")
        for name, value in (
            ("max_length", max_length),
            ("batch_size", batch_size),
            ("eval_batch_size", eval_batch_size),
            ("pad_to_multiple_of", pad_to_multiple_of),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers must be an int >= 0, got {num_workers!r}")
        for name, size in (("train_size", train_size), ("val_size", val_size), ("test_size", test_size)):
            if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
                raise ValueError(f"{name} must be an int >= 1 or None, got {size!r}")
        if not (0.0 <= val_fraction < 1.0 and 0.0 <= test_fraction < 1.0 and val_fraction + test_fraction < 1.0):
            raise ValueError(
                "val_fraction and test_fraction must be in [0, 1) with a sum below 1, "
                f"got {val_fraction}, {test_fraction}"
            )
        self.save_hyperparameters()
        self.text_column, self.label_column, self.task = text_column, label_column, task
        self.group_column = group_column
        self.where = {str(c): [str(v) for v in values] for c, values in (where or {}).items()}
        self.tokenizer_spec, self.max_length = tokenizer, max_length
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.drop_missing_text, self.pad_to_multiple_of = drop_missing_text, pad_to_multiple_of
        files = {"train": train_path or path, "val": val_path, "test": test_path, "predict": predict_path}
        self._files = {k: str(data_file(v)) for k, v in files.items() if v is not None}
        self._frames = {k: self._read(k, f) for k, f in self._files.items()}
        self.label_values: list[Any] = self._label_values()
        self.group_values: list[str] = self._group_values()
        self._rows = self._split(train_size, val_size, test_size, val_fraction, test_fraction, split_seed, subset_seed)
        self.target_mean, self.target_std = self._target_stats()
        self._tables: dict[str, _Table] = {}

    # ------------------------------------------------------------------ reading and splitting
    def _read(self, split: str, file: str) -> pd.DataFrame:
        frame = read_table(file)
        labels = [self.label_column] if self.task != "causal_lm" else []
        labelled = labels + ([self.group_column] if self.group_column else [])
        need = [self.text_column] + (labelled if split != "predict" else []) + list(self.where)
        missing = [c for c in need if c not in frame.columns]
        if missing:
            raise ValueError(f"{file}: no column {missing[0]!r}; its columns are {list(frame.columns)}")
        for column, values in self.where.items():
            keep = frame[column].astype(str).isin(values)
            if not keep.any():
                seen = sorted(frame[column].astype(str).unique().tolist())[:20]
                raise ValueError(f"{file}: where={{{column!r}: {values}}} keeps no row; values of that column: {seen}")
            frame = frame.loc[keep]
        if labels and split != "predict" and frame[self.label_column].isna().any():
            bad = int(frame[self.label_column].isna().sum())
            raise ValueError(f"{file}: label column {self.label_column!r} has {bad} missing values")
        no_text = frame[self.text_column].isna() | (frame[self.text_column].astype(str).str.strip() == "")
        if no_text.any():
            if not self.drop_missing_text or split == "predict":
                raise ValueError(f"{file}: text column {self.text_column!r} is missing in {int(no_text.sum())} rows")
            warnings.warn(
                f"{file}: dropped {int(no_text.sum())} of {len(frame)} rows whose {self.text_column!r} is missing",
                stacklevel=3,
            )
            frame = frame.loc[~no_text]
        if frame.empty:
            raise ValueError(f"{file}: no rows")
        return frame.reset_index(drop=True)

    def _label_values(self) -> list[Any]:
        if self.task == "causal_lm":
            return []
        labelled = [f[self.label_column] for k, f in self._frames.items() if k != "predict"]
        if self.task == "regression":
            for col in labelled:
                if not pd.api.types.is_numeric_dtype(col):
                    raise ValueError(
                        f"task='regression' needs a numeric label column {self.label_column!r}, got {col.dtype}"
                    )
            return []
        try:
            values = sorted(pd.concat(labelled).unique().tolist())
        except TypeError as err:
            kinds = sorted({type(v).__name__ for col in labelled for v in col.unique()})
            raise ValueError(
                f"label column {self.label_column!r} mixes value types {kinds} across rows or files: "
                "give one type (e.g. all integers or all strings)"
            ) from err
        train_values = set(self._frames["train"][self.label_column].unique().tolist())
        unseen = [v for v in values if v not in train_values]
        if unseen:
            warnings.warn(
                f"label column {self.label_column!r}: values {unseen} occur only outside the training file; "
                f"they are classes of the model ({len(values)} in all) that training never sees",
                stacklevel=3,
            )
        if len(values) < 2:
            raise ValueError(
                f"label column {self.label_column!r} has a single value {values}: classification needs two or more"
            )
        return values

    def _group_keys(self, column: pd.Series) -> pd.Series:
        return column.astype(object).where(column.notna(), MISSING_GROUP).astype(str)

    def _group_values(self) -> list[str]:
        """The sorted group names of ``group_column`` over every labelled file (empty without one)."""
        if self.group_column is None:
            return []
        frames = [f[self.group_column] for k, f in self._frames.items() if k != "predict"]
        return sorted(self._group_keys(pd.concat(frames)).unique().tolist())

    def _split(
        self,
        train_size: Optional[int],
        val_size: Optional[int],
        test_size: Optional[int],
        val_fraction: float,
        test_fraction: float,
        split_seed: int,
        subset_seed: Optional[int],
    ) -> dict[str, tuple[str, np.ndarray]]:
        """``split -> (file key, row positions)``."""
        rng = np.random.default_rng(split_seed)
        train = rng.permutation(len(self._frames["train"]))
        rows: dict[str, tuple[str, np.ndarray]] = {}
        for split, fraction in (("test", test_fraction), ("val", val_fraction)):
            if split in self._frames:
                rows[split] = (split, rng.permutation(len(self._frames[split])))
            elif split == "val" or self.hparams["path"] is not None:  # test is carved only from a single file
                cut = round(fraction * len(self._frames["train"]))
                if cut:
                    rows[split], train = ("train", train[:cut]), train[cut:]
        for split, cap in (("val", val_size), ("test", test_size)):
            if split in rows and cap is not None:
                rows[split] = (rows[split][0], rows[split][1][:cap])
        if "val" not in rows:
            raise ValueError(f"no validation rows: give val_path or val_fraction > 0 (got {val_fraction})")
        if train_size is not None:
            if train_size > len(train):
                raise ValueError(f"train_size={train_size} but the training split has only {len(train)} rows")
            seed = subset_seed if subset_seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))
            train = np.random.default_rng(seed).choice(train, size=train_size, replace=False)
        rows["train"] = ("train", np.sort(train))
        if "predict" in self._frames:
            rows["predict"] = ("predict", np.arange(len(self._frames["predict"])))
        return rows

    def _target_stats(self) -> tuple[float, float]:
        if self.task != "regression":
            return 0.0, 1.0
        key, rows = self._rows["train"]
        y = self._frames[key][self.label_column].to_numpy(dtype=np.float64)[rows]
        std = float(y.std()) if len(y) > 1 else 0.0
        return float(y.mean()), std if std > 0 else 1.0

    def has_split(self, split: str) -> bool:
        """Whether there is a ``split`` ("train", "val", "test" or "predict")."""
        return split in self._rows

    @property
    def num_labels(self) -> int:
        """Classes of a classification task; 1 for regression (the model's output width); 0 for ``causal_lm``
        (no label head)."""
        return {"classification": len(self.label_values), "regression": 1}.get(self.task, 0)

    def split_sizes(self) -> dict[str, int]:
        """Rows in each split."""
        return {split: len(rows) for split, (_, rows) in self._rows.items()}

    # ------------------------------------------------------------------ tokens
    def _token_key(self, file: str, tokenizer: Any) -> str:
        """Hash of what the ids depend on: the file (path, size, mtime), the column, ``max_length`` and the tokenizer
        itself (its full serialisation: vocabulary, normalisation, special tokens), not its directory's name."""
        h = hashlib.sha256()
        stat = Path(file).stat()
        h.update(f"{_TOKEN_CACHE_VERSION}|{Path(file).resolve()}|{stat.st_size}|{stat.st_mtime_ns}|".encode())
        h.update(f"{self.text_column}|{self.max_length}|{self.drop_missing_text}|{type(tokenizer).__name__}|".encode())
        if self.where:  # the rows kept (absent from the key without a filter: earlier caches stay valid)
            h.update(json.dumps(self.where, sort_keys=True).encode())
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:  # a fast tokenizer: its whole definition
            h.update(backend.to_str().encode())
        else:
            h.update(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
            h.update(json.dumps(tokenizer.init_kwargs, sort_keys=True, default=str).encode())
        return h.hexdigest()[:24]

    def _tokenize(self, key: str) -> _Table:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(resolve_pretrained(self.tokenizer_spec)))
        frame, file = self._frames[key], self._files[key]
        cache = cache_dir() / "tokens" / f"{self._token_key(file, tokenizer)}.npz"
        labelled = key != "predict" and self.task != "causal_lm"
        labels = frame[self.label_column].to_numpy() if labelled else np.zeros(len(frame))
        if cache.is_file():
            with np.load(cache) as stored:
                if len(stored["lengths"]) == len(frame):
                    return _Table(stored["ids"], stored["lengths"], labels)
        enc = tokenizer(frame[self.text_column].astype(str).tolist(), truncation=True, max_length=self.max_length)
        lengths = np.asarray([len(x) for x in enc["input_ids"]], dtype=np.int32)
        if self.task == "causal_lm" and (lengths < 2).any():
            warnings.warn(
                f"{file}: {int((lengths < 2).sum())} texts have fewer than 2 tokens: nothing to predict, their loss "
                "is 0 and they add no token to the perplexity",
                stacklevel=2,
            )
        ids = np.full((len(frame), self.max_length), tokenizer.pad_token_id or 0, dtype=np.int32)
        for i, row in enumerate(enc["input_ids"]):
            ids[i, : len(row)] = row

        def save(tmp: Path) -> None:
            with open(tmp, "wb") as out:
                np.savez(out, ids=ids, lengths=lengths)

        atomic_write(cache, save)
        return _Table(ids, lengths, labels)

    def _dataset(self, split: str) -> _Rows:
        if split not in self._rows:
            raise ValueError(f"no {split} split: give {split}_path (or path with a {split}_fraction > 0)")
        key, rows = self._rows[split]
        if key not in self._tables:
            self._tables[key] = self._tokenize(key)
        table = self._tables[key]
        if split == "predict" or self.task == "causal_lm":
            return _Rows(table, rows, None, self._groups(key, rows) if split != "predict" else None)
        raw = table.labels[rows]
        if self.task == "classification":
            index = {v: i for i, v in enumerate(self.label_values)}
            targets = np.asarray([index[v] for v in raw], dtype=np.int64)
        else:
            targets = ((raw.astype(np.float64) - self.target_mean) / self.target_std).astype(np.float32)
        return _Rows(table, rows, targets, self._groups(key, rows))

    def _groups(self, key: str, rows: np.ndarray) -> Optional[np.ndarray]:
        """The group ids of ``rows`` of file ``key`` (``None`` without a ``group_column``)."""
        if self.group_column is None:
            return None
        ids = {v: i for i, v in enumerate(self.group_values)}
        names = self._group_keys(self._frames[key][self.group_column]).to_numpy()[rows]
        return np.asarray([ids[v] for v in names], dtype=np.int64)

    # ------------------------------------------------------------------ Lightning
    @override
    def setup(self, stage: str) -> None:
        splits = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("predict",)}[stage]
        for split in splits:
            if split == "predict" and "predict" not in self._rows:
                split = "test"
            self._dataset(split)  # tokenizes (or reads the cache) once

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        size = self.batch_size if split == "train" else self.eval_batch_size
        return DataLoader(
            self._dataset(split),
            batch_size=size,
            shuffle=shuffle,
            collate_fn=functools.partial(_collate, multiple=self.pad_to_multiple_of, causal=self.task == "causal_lm"),
            num_workers=self.num_workers,
        )

    @override
    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    @override
    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    @override
    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    @override
    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict" if "predict" in self._rows else "test", shuffle=False)
