r"""``CTRDataModule``: read, split, preprocess (fitted on the training split) and serve ``CTRBatch`` loaders.

The whole table is encoded once into tensors (:class:`~lightfmp.data.preprocess.EncodedFrame`); the loaders are
plain ``DataLoader``\ s over :class:`EncodedRows`, whose ``__getitems__`` collates a whole batch of positions with
one tensor indexing (:meth:`EncodedFrame.batch`) instead of a row at a time, with a ``DistributedSampler``
(training, seeded by ``seed``) or an unrepeated one (evaluation) over the process group's ranks, one rank without
a process group (``CTRDataModule._loader``). The train loader
serves the part of the training split chosen by ``subset``: ``"pretrain"`` (a seeded ``pretrain_fraction``
subset, Light-FMP's pretrain stage), ``"finetune"`` (the rest, the finetune stage) or ``"full"``; validation
and test loaders serve the same splits whatever the subset. The finetune stage reuses the pretrain stage's
vocabularies (``preprocessor=`` a saved file, or :meth:`CTRDataModule.for_subset`, which passes the fitted one
on) and reads only the kept ``fields``.

With ``cache_dir``, the rows come from the on-disk cache of :mod:`lightfmp.data.cache` instead (built once by
:mod:`lightfmp.data.streaming` in chunks, with bounded memory, and memory-mapped): the same split and
subsets, a preprocessor fitted on the training split from the cached columns, and an :class:`EncodedFrame` over
memory maps with the same ``batch`` (see :mod:`lightfmp.data.streaming` for where it equals the in-memory
encoding). ``max_rows`` keeps the *first* rows of the file in both paths (a prefix, not a sample); the
pretrain subset is a seeded random sample of the training split (``pretrain_fraction`` or ``pretrain_rows``).

The fitted preprocessor is persisted in one format, :meth:`Preprocessor.state_dict`: Lightning stores
:meth:`CTRDataModule.state_dict` in every checkpoint under ``DATAMODULE_CHECKPOINT_KEY``, and
``preprocessor.json`` is the same dict (:meth:`Preprocessor.save`).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Literal, Optional, Union

import lightning as L
import numpy as np
import pandas as pd
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from typing_extensions import override

from lightfmp.data.cache import DataCache, RawColumns, build_once
from lightfmp.data.formats import DEFAULT_CHUNKSIZE, FORMATS, adult_path, iter_frames, read_frame
from lightfmp.data.preprocess import EncodedFrame, Preprocessor
from lightfmp.data.schema import Schema
from lightfmp.data.splits import Split, SplitKind, split_indices, train_subsets
from lightfmp.data.streaming import encode_streaming, fit_streaming, ingest, load_fit, open_encoded, save_fit
from lightfmp.data.synthetic import SyntheticCTR
from lightfmp.inputs import CTRBatch, ModelInputs

Subset = Literal["pretrain", "finetune", "full"]
SUBSETS: tuple[str, ...] = ("pretrain", "finetune", "full")
DATA_FORMATS = FORMATS + ("synthetic",)


class EncodedRows(Dataset):
    """The rows ``indices`` of an encoded table. ``dataset.__getitems__(positions)`` (what a ``DataLoader`` with a
    batch sampler calls) is one collated :class:`CTRBatch` of those positions, as is ``dataset[positions]``;
    ``dataset[i]`` is a batch of one."""

    def __init__(self, encoded: EncodedFrame, indices: np.ndarray) -> None:
        self.encoded = encoded
        self.indices = torch.as_tensor(np.asarray(indices, dtype=np.int64))

    def __len__(self) -> int:
        return int(self.indices.numel())

    def __getitems__(self, positions: Union[list[int], torch.Tensor]) -> CTRBatch:
        return self.encoded.batch(self.indices[torch.as_tensor(positions, dtype=torch.long)])

    @override
    def __getitem__(self, position: Union[int, list[int], torch.Tensor]) -> CTRBatch:
        """A batch of one row (an int), or of the positions given (a list or index tensor)."""
        return self.__getitems__([position] if isinstance(position, int) else position)


def _identity(batch: CTRBatch) -> CTRBatch:
    """The collate function: ``EncodedRows.__getitems__`` has already collated the batch."""
    return batch


class CTRDataModule(L.LightningDataModule):
    """Click-through data for Light-FMP (see the module docstring).

    Args:
        format: ``criteo``, ``avazu``, ``movielens``, ``adult``, ``csv``, ``parquet`` or ``synthetic``.
        path: data file (directory for MovieLens); None for the packaged Adult file or synthetic data.
        schema: YAML schema (required for csv/parquet; optional override for the built-in formats).
        fields: keep only these fields (read and encode nothing else); unknown names raise ``KeyError``.
        batch_size: training batch size; ``eval_batch_size`` (default: the same) for validation and test.
        pretrain_fraction: share of the training split in subset ``"pretrain"`` (a seeded random sample).
        pretrain_rows: the pretrain subset's size in rows instead (at most the training split's).
        subset: which part of the training split the train loader serves.
        stage: deprecated name of ``subset`` (``--data.stage`` still works).
        split, val_fraction, test_fraction, seed: the split (see :mod:`lightfmp.data.splits`); ``seed``
            also seeds the subsets and the shuffling.
        min_count, hash_threshold: preprocessing defaults (see :class:`Preprocessor`).
        preprocessor: path of a saved preprocessor to reuse instead of fitting one.
        max_rows: read only the first ``max_rows`` rows of the file (a prefix in file order, not a random
            sample); ``chunksize``: rows per pandas chunk (what the cached path holds in memory at once).
        cache_dir: keep the preprocessed data in this directory (see :mod:`lightfmp.data.cache`) and read the
            rows from there: built on first use (by one process), reused while the file and options match.
        progress: show read / encode progress bars (rows/s, ETA) when stderr is a terminal.
        synthetic_*: options of :class:`SyntheticCTR` for ``format="synthetic"``.
        num_workers, pin_memory: DataLoader options.
    """

    def __init__(
        self,
        format: str = "adult",
        path: Optional[str] = None,
        schema: Optional[str] = None,
        fields: Optional[list[str]] = None,
        batch_size: int = 1024,
        eval_batch_size: Optional[int] = None,
        pretrain_fraction: float = 0.2,
        pretrain_rows: Optional[int] = None,
        subset: Subset = "full",
        split: Literal["random", "chronological", "sequential"] = "random",
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        seed: int = 0,
        min_count: int = 1,
        hash_threshold: Optional[int] = None,
        preprocessor: Optional[str] = None,
        max_rows: Optional[int] = None,
        chunksize: int = DEFAULT_CHUNKSIZE,
        synthetic_rows: int = 100_000,
        synthetic_dense: int = 13,
        synthetic_sparse: int = 26,
        synthetic_cardinality: int = 100,
        synthetic_informative: Optional[list[str]] = None,
        synthetic_num_informative: int = 6,
        synthetic_interaction: float = 1.0,
        num_workers: int = 0,
        pin_memory: bool = False,
        stage: Optional[Subset] = None,
        cache_dir: Optional[str] = None,
        progress: bool = True,
    ) -> None:
        super().__init__()
        if stage is not None:
            warnings.warn("CTRDataModule(stage=...) is deprecated; use subset=", DeprecationWarning, stacklevel=2)
            subset = stage
        if format not in DATA_FORMATS:
            raise ValueError(f"unknown data format {format!r}; expected one of {list(DATA_FORMATS)}")
        if subset not in SUBSETS:
            raise ValueError(f"subset must be 'pretrain', 'finetune' or 'full', got {subset!r}")
        if split not in ("random", "chronological", "sequential"):
            raise ValueError(f"split must be 'random', 'chronological' or 'sequential', got {split!r}")
        for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size or 1)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not 0 < pretrain_fraction <= 1:
            raise ValueError(f"pretrain_fraction must be in (0, 1], got {pretrain_fraction}")
        if subset == "finetune" and pretrain_fraction == 1:
            raise ValueError(
                "subset 'finetune' serves the training rows outside the pretrain subset; "
                "with pretrain_fraction=1 there are none"
            )
        if pretrain_rows is not None and pretrain_rows < 1:
            raise ValueError(f"pretrain_rows must be >= 1, got {pretrain_rows}")
        if cache_dir is not None and format == "synthetic":
            raise ValueError("format 'synthetic' is generated in memory; it has no file to cache (drop cache_dir)")
        if fields is not None and len(fields) == 0:
            raise ValueError("fields must name at least one field (or be None for all)")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.save_hyperparameters(ignore=["stage"])
        # typed copies of the hyper-parameters read below (``self.hparams`` keeps them for checkpoints, the CLI
        # and ``for_subset``); ``schema`` and ``preprocessor`` name the fitted objects, hence ``*_path`` here
        self.format = format
        self.path = path
        self.schema_path = schema
        self.fields = fields
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.pretrain_fraction = pretrain_fraction
        self.pretrain_rows = pretrain_rows
        self.cache_dir = cache_dir
        self.progress = progress
        self._subset: Subset = subset
        self.split: SplitKind = split
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.seed = seed
        self.min_count = min_count
        self.hash_threshold = hash_threshold
        self.preprocessor_path = preprocessor
        self.max_rows = max_rows
        self.chunksize = chunksize
        self.synthetic_rows = synthetic_rows
        self.synthetic_dense = synthetic_dense
        self.synthetic_sparse = synthetic_sparse
        self.synthetic_cardinality = synthetic_cardinality
        self.synthetic_informative = synthetic_informative
        self.synthetic_num_informative = synthetic_num_informative
        self.synthetic_interaction = synthetic_interaction
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self._given_preprocessor: Optional[Preprocessor] = None
        self._shared_cache: Optional[str] = None  # share_across_processes' cache directory
        self.preprocessor: Optional[Preprocessor] = None
        self.schema: Optional[Schema] = None
        self.encoded: Optional[EncodedFrame] = None
        self.splits: Optional[Split] = None
        self.pretrain_indices: Optional[np.ndarray] = None
        self.finetune_indices: Optional[np.ndarray] = None

    # -- reading and encoding
    @property
    def synthetic(self) -> SyntheticCTR:
        """The synthetic task of ``format="synthetic"`` (its ``informative_fields`` are the ground truth)."""
        return SyntheticCTR(
            num_rows=self.synthetic_rows,
            num_dense=self.synthetic_dense,
            num_sparse=self.synthetic_sparse,
            cardinality=self.synthetic_cardinality,
            informative=self.synthetic_informative,
            num_informative=self.synthetic_num_informative,
            interaction_strength=self.synthetic_interaction,
            seed=self.seed,
        )

    def _read(self, columns: Optional[list[str]]) -> tuple[pd.DataFrame, Schema]:
        if self.format != "synthetic":
            return read_frame(
                self.format,
                self.path,
                schema=self.schema_path,
                columns=columns,
                chunksize=self.chunksize,
                max_rows=self.max_rows,
            )
        synthetic = self.synthetic
        schema = Schema.from_yaml(self.schema_path) if self.schema_path else synthetic.schema
        frame = synthetic.generate()
        if self.max_rows is not None:
            frame = frame.iloc[: self.max_rows]
        if columns is not None:
            schema = schema.select(columns)
        return frame[list(schema.columns)], schema

    def _preprocessor_to_reuse(self) -> Optional[Preprocessor]:
        if self._given_preprocessor is not None:
            return self._given_preprocessor
        if self.preprocessor_path:
            return Preprocessor.load(self.preprocessor_path)
        return None

    @override
    def setup(self, stage: Optional[str] = None) -> None:
        """Read, split, fit (or reuse) the preprocessor and encode; done once, whatever Lightning's ``stage``.

        The first time, an evaluation split whose labels hold one class gets a warning (its AUC is undefined);
        for ``stage`` ``"fit"`` or None, :meth:`check_train_labels` refuses a train subset of one class.
        """
        if self.encoded is None:
            self._encode()
            for split in ("validation", "test"):
                self._warn_single_class(split)
        if stage in (None, "fit"):
            self.check_train_labels()

    def _label_values(self, indices: np.ndarray) -> dict[int, int]:
        """Row count per label value (0/1) of ``indices``."""
        labels = self._require_setup().labels[torch.as_tensor(np.asarray(indices, dtype=np.int64))]
        counts = np.bincount(labels.numpy().astype(np.int64), minlength=2)  # labels are 0/1
        return {value: int(count) for value, count in enumerate(counts) if count}

    def _label_hint(self) -> str:
        assert self.schema is not None
        positive = f" (the schema's positive values: {list(self.schema.positive)})" if self.schema.positive else ""
        return f"label column {self.schema.label!r}{positive}"

    def check_train_labels(self) -> None:
        """Raise ``ValueError`` when the rows of this ``subset`` hold one label class: nothing to learn, and AUC
        is undefined."""
        seen = self._label_values(self.train_indices)
        if len(seen) == 1:
            table = self._label_values(np.arange(len(self._require_setup())))
            raise ValueError(
                f"the training rows of subset {self.subset!r} all have the same label: {self._label_hint()} has "
                f"values {sorted(seen)} there (rows per value: {seen}; whole table: {table}); a click-through model "
                "needs both classes 0 and 1"
            )

    def _warn_single_class(self, split: Literal["validation", "test"]) -> None:
        assert self.splits is not None
        indices = self.splits.val if split == "validation" else self.splits.test
        seen = self._label_values(indices) if len(indices) else {}
        if len(seen) == 1:
            warnings.warn(
                f"the {split} split's {len(indices)} rows all have label {next(iter(seen))} in "
                f"{self._label_hint()}: its AUC is undefined (recorded as null; LogLoss is still computed)",
                UserWarning,
                stacklevel=3,
            )

    def _encode(self) -> None:
        reuse = self._preprocessor_to_reuse()
        if reuse is not None and self.fields is not None:
            reuse = reuse.select(self.fields)
        columns = list(self.fields) if self.fields is not None else (list(reuse.schema.names) if reuse else None)
        if self.cache_dir is not None or self._shared_cache is not None:
            self._encode_cached(reuse, columns)
            return
        frame, schema = self._read(columns)
        time = frame[schema.time_column].to_numpy() if self._needs_time(schema) else None
        splits = self._split(len(frame), time)
        if reuse is None:
            reuse = Preprocessor(schema, min_count=self.min_count, hash_threshold=self.hash_threshold)
            reuse.fit(frame.iloc[splits.train])
        self.schema, self.preprocessor = schema, reuse
        self.encoded = reuse.transform(frame)

    def _needs_time(self, schema: Schema) -> bool:
        if self.split != "chronological":
            return False
        if schema.time_column is None:
            raise ValueError(
                f"split='chronological' needs a time column, and format {self.format!r} has none "
                "(set time_column in a schema YAML, or use split='sequential' for file order)"
            )
        return True

    def _split(self, rows: int, time: Optional[np.ndarray]) -> Split:
        """The splits and subsets of ``rows`` rows (set on ``self``); the same for both paths."""
        splits = split_indices(rows, self.val_fraction, self.test_fraction, self.seed, self.split, time)
        pretrain, finetune = train_subsets(splits.train, self.pretrain_fraction, self.seed, self.pretrain_rows)
        if self.subset == "finetune" and len(finetune) == 0:
            raise ValueError(
                f"the training split has {len(splits.train)} rows, all in the pretrain subset: "
                "nothing is left for subset 'finetune'"
            )
        self.splits, self.pretrain_indices, self.finetune_indices = splits, pretrain, finetune
        return splits

    def share_across_processes(self, world_size: int, directory: Union[str, Path]) -> None:
        """Under ``world_size > 1`` processes (DDP) without ``cache_dir``: read and encode the file once, into the
        on-disk cache under ``directory`` (the stages pass ``<output_dir>/data_cache``), instead of every process
        reading and encoding the whole table in its own memory. The first process to set up builds it (under
        Lightning's DDP launcher, rank 0 before it starts the others) and the others wait on its file lock, then
        map the same files: one encoding's work and one copy in the page cache, whatever the number of ranks.
        The rows are those of the in-memory path (:mod:`lightfmp.data.streaming`). Nothing changes for one
        process, with ``cache_dir`` given, or for synthetic data (generated, not read: each rank makes it)."""
        if world_size > 1 and self.cache_dir is None and self.format != "synthetic":
            self._shared_cache = str(directory)

    def data_cache(self) -> DataCache:
        """The cache directory of this datamodule's file (``cache_dir``, or :meth:`share_across_processes`')."""
        where = self.cache_dir if self.cache_dir is not None else self._shared_cache
        if where is None:
            raise ValueError("this datamodule has no cache_dir")
        path = adult_path() if self.format == "adult" and self.path is None else self.path
        return DataCache(where, self.format, path, self.schema_path, self.max_rows)

    def _encode_cached(self, reuse: Optional[Preprocessor], columns: Optional[list[str]]) -> None:
        """:meth:`_encode` from the on-disk cache: build what is missing (one process; the others wait on its
        lock), fit on the training split unless reusing, map the encoded rows."""
        cache = self.data_cache()

        def build_raw(out: Path) -> None:
            # pyarrow's multithreaded parser, one block of records at a time (formats/base.arrow_chunks); a file
            # Arrow cannot read is read by the pandas path, which names the bad line
            chunks = iter_frames(
                self.format, self.path, self.schema_path, None, self.chunksize, self.max_rows, engine="arrow"
            )
            ingest(chunks, out, self.progress)

        raw = cache.raw(build_raw)
        schema = raw.schema.select(columns) if columns is not None else raw.schema
        time = None
        if self._needs_time(schema):
            time = raw.time()
            assert time is not None  # stored whenever the schema has a time column
            time = np.asarray(time)
        splits = self._split(raw.rows, time)
        luts: dict[str, np.ndarray] = {}  # lookup tables of a fit made here, for the encoding
        if reuse is None:
            reuse = self._fit_cached(cache, raw, schema, splits.train, luts)
        state = reuse.state_dict(as_lists=False)  # vocabularies stay Arrow arrays
        encoded = build_once(
            cache.encoded_dir(state),
            lambda out: encode_streaming(raw, reuse, out, self.progress, luts=luts),
            cache.lock,
        )
        self.schema, self.preprocessor = schema, reuse
        self.encoded = open_encoded(raw, reuse, encoded)

    def _fit_cached(
        self, cache: DataCache, raw: RawColumns, schema: Schema, train: np.ndarray, luts: dict[str, np.ndarray]
    ) -> Preprocessor:
        """The preprocessor fitted on the training rows of the cache, itself cached (``fit-<options>/``); the
        lookup tables of its vocabularies go into ``luts``."""
        options = {
            "fields": schema.to_dict(),
            "split": self.split,
            "val_fraction": self.val_fraction,
            "test_fraction": self.test_fraction,
            "seed": self.seed,
            "min_count": self.min_count,
            "hash_threshold": self.hash_threshold,
        }
        directory = cache.fit_dir(options)
        fitted: list[Preprocessor] = []

        def build(out: Path) -> None:
            fitted.append(
                fit_streaming(raw, schema, train, self.min_count, self.hash_threshold, seed=self.seed, luts=luts)
            )
            save_fit(fitted[0], raw, luts, out)

        build_once(directory, build, cache.lock)
        return fitted[0] if fitted else load_fit(raw, directory, luts)

    def _require_setup(self) -> EncodedFrame:
        if self.encoded is None:
            raise RuntimeError("call setup() first")
        return self.encoded

    @property
    def feature_spec(self) -> ModelInputs:
        self._require_setup()
        assert self.preprocessor is not None
        return self.preprocessor.feature_spec

    @property
    def train_indices(self) -> np.ndarray:
        """Rows served by the train loader in this datamodule's ``subset``."""
        self._require_setup()
        splits, pretrain, finetune = self.splits, self.pretrain_indices, self.finetune_indices
        assert splits is not None and pretrain is not None and finetune is not None  # set with self.encoded
        return {"pretrain": pretrain, "finetune": finetune, "full": splits.train}[self.subset]

    @property
    def num_train_samples(self) -> int:
        return int(len(self.train_indices))

    # -- loaders
    def _replicas(self) -> tuple[int, int]:
        """``(world size, rank)`` of the trainer this datamodule is attached to (Lightning attaches it in ``fit`` /
        ``test``); ``(1, 0)`` when none is."""
        trainer = self.trainer
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def _loader(
        self, indices: np.ndarray, batch_size: int, shuffle: bool, replicas: Optional[tuple[int, int]] = None
    ) -> DataLoader:
        """A DataLoader over ``indices`` sharded across ``replicas = (W, r)`` (default: the attached trainer's
        ranks). Training: PyTorch's ``DistributedSampler`` (shuffled by ``(seed, epoch)``, Lightning calls
        ``set_epoch``; padded by repetition so every rank runs the same number of steps). Evaluation: Lightning's
        ``UnrepeatedDistributedSampler`` (each row on exactly one rank, so synchronised metrics equal a single
        process's). Rank ``r`` gets positions ``r, r + W, ...`` of the epoch's order, so the union of the ranks'
        ``i``-th batches at batch ``B`` is a single process's ``i``-th batch at ``W * B`` (rows divisible by ``W``)."""
        dataset = EncodedRows(self._require_setup(), indices)
        world, rank = replicas if replicas is not None else self._replicas()
        sampler: DistributedSampler
        if shuffle:
            sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=self.seed)
        else:
            sampler = UnrepeatedDistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False)
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            collate_fn=_identity,  # type: ignore[arg-type]  # gets the CTRBatch of __getitems__, not a list
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def evaluation_loader(self, split: Literal["validation", "test"], replicas: tuple[int, int] = (1, 0)) -> DataLoader:
        """The validation or test loader, by default every row in one process (e.g. for prune's scores, computed
        on rank 0 alone while the datamodule is still attached to a multi-process trainer)."""
        self._require_setup()
        assert self.splits is not None
        indices = self.splits.val if split == "validation" else self.splits.test
        return self._loader(indices, self._eval_batch_size, shuffle=False, replicas=replicas)

    @property
    def _eval_batch_size(self) -> int:
        return self.eval_batch_size or self.batch_size

    @override
    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_indices, self.batch_size, shuffle=True)

    @override
    def val_dataloader(self) -> DataLoader:
        return self.evaluation_loader("validation", self._replicas())

    @override
    def test_dataloader(self) -> DataLoader:
        return self.evaluation_loader("test", self._replicas())

    @override
    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()

    # -- subsets and checkpoints
    @property
    def subset(self) -> Subset:
        """The part of the training split the train loader serves: ``"pretrain"``, ``"finetune"`` or ``"full"``."""
        return self._subset

    def for_subset(
        self, subset: Subset, fields: Optional[list[str]] = None, preprocessor: Union[str, Preprocessor, None] = None
    ) -> CTRDataModule:
        """A new datamodule with these settings but another ``subset`` and optionally only ``fields``.

        It reuses ``preprocessor`` (a path or an object), else this datamodule's fitted one (so ids match
        the embedding rows trained so far), else this datamodule's ``preprocessor`` path.
        """
        kwargs = {k: v for k, v in self.hparams.items() if not k.startswith("_")}  # LightningCLI adds _instantiator
        kwargs["subset"] = subset
        if fields is not None:
            kwargs["fields"] = list(fields)
        if isinstance(preprocessor, str):
            kwargs["preprocessor"] = preprocessor
        out = CTRDataModule(**kwargs)
        out._shared_cache = self._shared_cache
        if isinstance(preprocessor, Preprocessor):
            out._given_preprocessor = preprocessor
        elif preprocessor is None and self.preprocessor is not None:
            out._given_preprocessor = self.preprocessor
        return out

    def for_stage(
        self, stage: Subset, fields: Optional[list[str]] = None, preprocessor: Union[str, Preprocessor, None] = None
    ) -> CTRDataModule:
        """Deprecated name of :meth:`for_subset`."""
        warnings.warn("CTRDataModule.for_stage is deprecated; use for_subset", DeprecationWarning, stacklevel=2)
        return self.for_subset(stage, fields, preprocessor)

    @override
    def state_dict(self) -> dict[str, Any]:
        """The fitted preprocessor (saved by Lightning in checkpoints under ``DATAMODULE_CHECKPOINT_KEY``)."""
        return preprocessor_state(self.preprocessor) if self.preprocessor is not None else {}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Reuse the checkpoint's preprocessor; re-encode if ``setup`` already ran with another one."""
        loaded = preprocessor_from_state(state_dict)
        if loaded is None:
            return
        self._given_preprocessor = loaded
        if self.preprocessor is not None and self.preprocessor.state_dict() != loaded.state_dict():
            self.encoded = None
            self.setup()


# Lightning saves a datamodule's state_dict() in a checkpoint under its class's qualified name.
DATAMODULE_CHECKPOINT_KEY = CTRDataModule.__qualname__


def preprocessor_state(preprocessor: Preprocessor) -> dict[str, Any]:
    """The one serialised form of a fitted preprocessor in a checkpoint (``CTRDataModule.state_dict()``)."""
    return {"preprocessor": preprocessor.state_dict()}


def preprocessor_from_state(state: dict[str, Any]) -> Optional[Preprocessor]:
    """The preprocessor of :func:`preprocessor_state`'s dict, or None when it holds none."""
    return Preprocessor.from_state_dict(state["preprocessor"]) if "preprocessor" in state else None
