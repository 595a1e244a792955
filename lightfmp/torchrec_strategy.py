"""``TorchRecStrategy`` (``Trainer(strategy="torchrec")``): embedding tables sharded by TorchRec's
``DistributedModelParallel`` (DMP), the rest of the model data-parallel.

Lightning's ``ddp`` strategy would replicate every embedding table on every rank and average its gradients as a
dense parameter. This strategy instead hands the LightningModule to DMP:

* every ``EmbeddingBagCollection`` in the module is sharded by a plan from ``EmbeddingShardingPlanner``
  (``Topology(world_size, compute_device)``, one ``ParameterConstraints`` per table: its sharding type and
  compute kernel). ``sharding_type`` is the default for every table, ``table_sharding`` overrides it per table
  (key: the table name, e.g. ``t_C1``, or its feature name, ``C1``). On CPU TorchRec offers ``table_wise``,
  ``column_wise``, ``table_column_wise`` and ``data_parallel``; ``row_wise`` and ``table_row_wise`` need CUDA;
* table-wise and column-wise tables use TorchRec's fused kernel: the embedding optimizer (``fused_optimizer``:
  ``sgd``, ``rowwise_adagrad``, ``adagrad`` or ``adam``, learning rate ``fused_lr``, default the module's
  ``lr``) runs inside ``backward()`` on each rank's own shards, and those weights never get a ``.grad``;
* ``data_parallel`` tables (every rank holds the whole table) use the dense kernel: their gradients are
  averaged by DDP like any dense parameter and the module's own optimizer steps them;
* the dense part (everything but the sharded tables) is wrapped by DMP in ``DistributedDataParallel``; the
  module's ``configure_optimizers`` runs after sharding and the fused tables' parameters are removed from its
  optimizers.

Gradient scale: TorchRec divides the gradients coming back through the all-to-all by the world size (its
``GRADIENT_DIVISION`` default), so a sharded table sees the gradient of the mean loss over the global batch, as
DDP's averaged dense gradients do: ``N`` ranks at batch ``B`` update like one process at batch ``N * B``.

Weights: the module's tables are built as usual (on the CPU, seeded), and their values are copied into the
shards after sharding, so a run starts from the same weights whatever the world size. A table built on the
``meta`` device is initialised by TorchRec on its shards instead (no rank then holds a whole table).

Checkpoints (``checkpoint_format``): ``file`` (default) gathers every sharded table to rank 0
(``ShardedTensor.gather``), so a checkpoint is one ordinary Lightning file with whole tables, loadable by any
world size (and without this strategy); ``load_model_state_dict`` loads a whole-table file into a sharded module
(each rank copies its shards). ``dcp`` writes a directory with ``torch.distributed.checkpoint``, each rank its
own shards, plus ``lightning.pt`` (everything but the model's tensors, from rank 0); ``ckpt_path`` may name such
a directory, written by any world size (a checkpoint is loaded before the module is sharded, so DCP reads whole
tables into it, which are then copied into the new shards). Light-FMP's stage checkpoints (``pretrain.ckpt``,
``pruned.ckpt``, ``finetune.ckpt``) follow ``checkpoint_format``: with ``dcp`` each is such a directory, written
shard-wise by every rank into the stage's staging directory (:mod:`lightfmp.staging`), and the next stage reads
it whole (:func:`read_sharded_whole`, no process group needed) at any world size.

Fused optimizer state: a checkpoint with the optimizers' state (not ``weights_only``) also holds DMP's
``fused_optimizer`` state under ``FUSED_STATE_KEY`` (e.g. row-wise Adagrad's accumulator, one per row; per-row
per-column-shard for a column-wise table): ``file`` gathers it whole to rank 0, ``dcp`` writes each rank's shards
into the directory. On resume it is loaded after sharding into this rank's shards, at any world size, provided
the states have the same shapes (same ``fused_optimizer``; a column-wise table's row-wise state needs as many
column shards: otherwise a ``ValueError`` names the difference). Its learning rate is the strategy's
``fused_lr``, not saved. A checkpoint without the state resumes with a warning and a fresh state. On the CPU FBGEMM
runs ``sgd``, ``rowwise_adagrad`` and ``adagrad``; ``adam`` needs CUDA.

TorchRec's ``TrainPipelineSparseDist`` (the next batch's input all-to-all started before the current forward) is
not used. It runs on the CPU: it creates CUDA streams only for a ``cuda``/``mtia`` device and otherwise runs its
stages in order in one stream; ``benchmarks/probe_train_pipeline.py`` (2 gloo ranks, table-wise, column-wise and
data-parallel tables) shows it pipelining the sharded collection and giving the plain loop's weights exactly. It
does not fit a Lightning training step: it owns the step, pulling batches from the iterator itself (two ahead of
the one it trains), calling ``model(batch)`` for ``(loss, output)``, then backward, ``zero_grad`` and ``step``;
Lightning's automatic optimization calls ``training_step(batch, batch_idx)`` with one batch and runs backward and
the step itself. Driving it needs a LightningModule written for it (``automatic_optimization = False``,
``training_step(self, dataloader_iter)`` calling ``pipeline.progress``, a ``torchrec.streamable.Pipelineable``
batch, a forward returning ``(loss, output)`` that ``torch.fx`` can trace up to the sharded modules, whose input
must be an attribute of the batch; the pipeline detached around evaluation, as it replaces the sharded modules'
forward; and the epoch's last two batches drained, as Lightning ends the epoch once the iterator is exhausted).
A strategy cannot impose that on a module, and Light-FMP's module trains with automatic optimization, so there is
no ``pipeline`` option. Its overlap pays on a GPU (copy and input distribution on their own CUDA streams): there,
write such a training step and build ``TrainPipelineSparseDist(dmp, CombinedOptimizer([fused, dense]), device)``
once the strategy has sharded the module.

Tested on CPU with gloo; ``row_wise`` and NCCL are untested here (no GPU).
"""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.strategies import _StrategyRegistry
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import override

__all__ = [
    "CPU_SHARDING_TYPES",
    "FUSED_OPTIMIZERS",
    "FUSED_STATE_KEY",
    "TorchRecStrategy",
    "embedding_collections",
    "fused_optimizer_state",
    "gather_fused_state",
    "gather_state_dict",
    "is_sharded_checkpoint",
    "load_full_state_dict",
    "load_fused_sharded",
    "load_sharded",
    "read_sharded_whole",
    "register_torchrec_strategy",
    "save_sharded",
    "shard_embeddings",
    "sharding_constraints",
]

#: sharding types TorchRec's EmbeddingBagCollectionSharder offers for a CPU compute device (row-wise needs CUDA)
CPU_SHARDING_TYPES = ("table_wise", "column_wise", "table_column_wise", "data_parallel")
GPU_ONLY_SHARDING_TYPES = ("row_wise", "table_row_wise")
#: ``fused_optimizer`` names and FBGEMM's optimizer types
FUSED_OPTIMIZERS = {
    "sgd": "EXACT_SGD",
    "rowwise_adagrad": "EXACT_ROWWISE_ADAGRAD",
    "adagrad": "EXACT_ADAGRAD",
    "adam": "ADAM",
}
#: fused optimizers FBGEMM runs on CUDA only ("Optimizer adam is not supported in CPU mode")
GPU_ONLY_FUSED_OPTIMIZERS = ("adam",)


def embedding_collections(module: nn.Module) -> dict[str, nn.Module]:
    """The module's ``EmbeddingBagCollection``s by their qualified name."""
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    return {name: m for name, m in module.named_modules() if isinstance(m, EmbeddingBagCollection)}


def _check_sharding_type(value: str, where: str, device_type: str) -> None:
    known = CPU_SHARDING_TYPES + GPU_ONLY_SHARDING_TYPES
    if value not in known:
        raise ValueError(f"{where}: unknown sharding type {value!r}; expected one of {list(known)}")
    if value in GPU_ONLY_SHARDING_TYPES and device_type != "cuda":
        raise ValueError(
            f"{where}: sharding type {value!r} needs CUDA (TorchRec offers only {list(CPU_SHARDING_TYPES)} on the CPU)"
        )


def sharding_constraints(
    collections: Mapping[str, nn.Module],
    sharding_type: str,
    table_sharding: Optional[Mapping[str, str]],
    device_type: str,
    column_shard_dim: Optional[int] = None,
) -> dict[str, Any]:
    """One ``ParameterConstraints`` per table: its sharding type (``table_sharding[table or feature]``, else
    ``sharding_type``) and kernel (``dense`` for data_parallel, ``fused`` otherwise); ``column_shard_dim``: the
    width of a column-wise shard (TorchRec's ``min_partition``; its planner keeps a small table in one shard
    otherwise). Keys of ``table_sharding`` naming no table (e.g. fields that prune removed) are ignored."""
    from torchrec.distributed.planner.types import ParameterConstraints

    _check_sharding_type(sharding_type, "sharding_type", device_type)
    overrides = dict(table_sharding or {})
    constraints: dict[str, Any] = {}
    used: set[str] = set()
    for ebc in collections.values():
        for config in ebc.embedding_bag_configs():  # type: ignore[operator]
            keys = [config.name, *config.feature_names]
            chosen = next((overrides[k] for k in keys if k in overrides), sharding_type)
            used.update(k for k in keys if k in overrides)
            _check_sharding_type(chosen, f"table_sharding[{config.name!r}]", device_type)
            kernel = "dense" if chosen == "data_parallel" else "fused"
            extra = {"min_partition": column_shard_dim} if column_shard_dim and "column" in chosen else {}
            constraints[config.name] = ParameterConstraints(sharding_types=[chosen], compute_kernels=[kernel], **extra)
    unknown = sorted(set(overrides) - used)
    if unknown:  # e.g. fields that prune removed: one strategy configuration serves pretrain and finetune
        rank_zero_info(f"torchrec strategy: table_sharding entries for no table of this model, ignored: {unknown}")
    return constraints


def _fused_params(optimizer: str, lr: float, eps: float, weight_decay: float) -> dict[str, Any]:
    from fbgemm_gpu.split_embedding_configs import EmbOptimType

    if optimizer not in FUSED_OPTIMIZERS:
        raise ValueError(f"unknown fused_optimizer {optimizer!r}; expected one of {sorted(FUSED_OPTIMIZERS)}")
    if lr <= 0:
        raise ValueError(f"fused_lr must be > 0, got {lr}")
    return {
        "optimizer": getattr(EmbOptimType, FUSED_OPTIMIZERS[optimizer]),
        "learning_rate": lr,
        "eps": eps,
        "weight_decay": weight_decay,
    }


def _local_copy(target: Any, full: torch.Tensor) -> None:
    """Copy the parts of ``full`` this rank holds into ``target`` (a ShardedTensor, a DTensor or a tensor)."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor
    from torch.distributed.tensor import DTensor

    with torch.no_grad():
        if isinstance(target, ShardedTensor):
            for shard in target.local_shards():
                index = tuple(slice(o, o + s) for o, s in zip(shard.metadata.shard_offsets, shard.metadata.shard_sizes))
                shard.tensor.copy_(full[index])
        elif isinstance(target, DTensor):
            from torch.distributed.tensor import distribute_tensor

            local = distribute_tensor(full.to(target.dtype), target.device_mesh, target.placements).to_local()
            target.to_local().copy_(local)
        else:
            target.copy_(full)


def load_full_state_dict(module: nn.Module, state: Mapping[str, torch.Tensor], strict: bool = True) -> None:
    """Load ``state`` (whole tables, as :func:`gather_state_dict` returns) into ``module``, whose tables may be
    sharded: each rank copies the slices it holds; other entries load as usual."""
    own = module.state_dict()
    if strict:
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            raise RuntimeError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    for key, target in own.items():
        if key in state and not _is_sharded(state[key]):  # sharded entries: loaded in place by load_sharded
            _local_copy(target, state[key])


def gather_state_dict(module: nn.Module) -> dict[str, Any]:
    """``module.state_dict()`` with every sharded table gathered whole on rank 0 (a collective: call it on
    every rank). Other ranks get ``None`` in place of the sharded tables."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor
    from torch.distributed.tensor import DTensor

    state = module.state_dict()
    rank = dist.get_rank() if dist.is_initialized() else 0
    for key, value in state.items():
        if isinstance(value, ShardedTensor):
            with warnings.catch_warnings():  # TorchRec 1.8 still shards into ShardedTensor, which torch deprecates
                warnings.simplefilter("ignore", FutureWarning)
                out = torch.empty(value.size(), dtype=value.dtype) if rank == 0 else None
                value.gather(dst=0, out=out)
            state[key] = out
        elif isinstance(value, DTensor):
            state[key] = value.full_tensor()
    return state


#: file of a sharded checkpoint directory holding everything but the model's tensors (rank 0 writes it)
DCP_METADATA = "lightning.pt"


def save_sharded(
    state: dict[str, Any],
    directory: Path,
    rest: Optional[dict[str, Any]] = None,
    fused_state: Optional[dict[str, Any]] = None,
) -> None:
    """Write ``state`` (a module's state dict, sharded tables as they are) with ``torch.distributed.checkpoint``
    into ``directory``: each rank writes its own shards (a collective: call it on every rank). ``fused_state``
    (:func:`fused_optimizer_state`) is written beside it, shard-wise too. ``rest`` (picklable, e.g. a Lightning
    checkpoint without its ``state_dict``) goes to ``DCP_METADATA`` from rank 0."""
    import torch.distributed.checkpoint as dcp

    directory.mkdir(parents=True, exist_ok=True)
    content: dict[str, Any] = {"state_dict": state}
    if fused_state is not None:
        content[DCP_FUSED_STATE] = fused_state
    dcp.save(content, checkpoint_id=str(directory))
    if rest is not None and (not dist.is_initialized() or dist.get_rank() == 0):
        torch.save(rest, directory / DCP_METADATA)
    if dist.is_initialized():
        dist.barrier()


def load_sharded(module: nn.Module, directory: Path) -> dict[str, Any]:
    """Load a :func:`save_sharded` directory into ``module``, in place, whatever the world size or sharding
    that wrote it and whatever ``module``'s own (sharded or whole tables; DCP reads the pieces each rank needs).
    Returns the directory's ``DCP_METADATA`` dict (empty without one) with the loaded ``state_dict``."""
    import torch.distributed.checkpoint as dcp

    state = module.state_dict()
    dcp.load({"state_dict": state}, checkpoint_id=str(directory))
    own = module.state_dict()
    for key, value in state.items():  # DCP reads into the given tensors; make sure plain entries reached the module
        if not _is_sharded(value) and isinstance(value, torch.Tensor):
            _local_copy(own[key], value)
    rest = read_dcp_metadata(directory)
    rest["state_dict"] = state
    return rest


def is_sharded_checkpoint(path: Path) -> bool:
    """Whether ``path`` is a complete ``torch.distributed.checkpoint`` directory (DCP writes ``.metadata`` last,
    once every rank has written its shards)."""
    return path.is_dir() and (path / ".metadata").is_file()


def read_sharded_whole(directory: Path) -> dict[str, Any]:
    """A :func:`save_sharded` directory as one checkpoint dict with whole tensors: its ``DCP_METADATA`` dict plus
    ``state_dict``, read by this process alone (no collective, no module needed; any world size wrote it). Each
    tensor is allocated whole from DCP's metadata, so this costs the whole model's memory, as a single file would."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    if not is_sharded_checkpoint(directory):
        raise ValueError(f"{str(directory)!r} is not a complete torch.distributed.checkpoint directory (no .metadata)")
    metadata = dcp.FileSystemReader(str(directory)).read_metadata()
    prefix = "state_dict."
    state: dict[str, Any] = {}
    for fqn, item in metadata.state_dict_metadata.items():
        if fqn.startswith(prefix):
            if not isinstance(item, TensorStorageMetadata):
                raise ValueError(f"{directory}: entry {fqn!r} is not a tensor; expected a module's state dict")
            state[fqn[len(prefix) :]] = torch.empty(item.size, dtype=item.properties.dtype)
    dcp.load({"state_dict": state}, checkpoint_id=str(directory), no_dist=True)
    rest = read_dcp_metadata(directory)
    rest["state_dict"] = state
    return rest


def read_dcp_metadata(directory: Path) -> dict[str, Any]:
    """The ``DCP_METADATA`` dict of a :func:`save_sharded` directory (empty without one)."""
    meta = directory / DCP_METADATA
    return torch.load(meta, map_location="cpu", weights_only=False) if meta.exists() else {}


def load_fused_sharded(fused_state: dict[str, Any], directory: Path) -> None:
    """Read a :func:`save_sharded` directory's fused optimizer state into ``fused_state``
    (:func:`fused_optimizer_state`, whose tensors are the optimizer's own: loaded in place), whatever world size
    wrote it (a collective)."""
    import torch.distributed.checkpoint as dcp

    dcp.load({DCP_FUSED_STATE: fused_state}, checkpoint_id=str(directory))


def _is_sharded(value: Any) -> bool:
    from torch.distributed._shard.sharded_tensor import ShardedTensor
    from torch.distributed.tensor import DTensor

    return isinstance(value, (ShardedTensor, DTensor))


#: checkpoint entry of the fused embedding optimizer's state (:func:`fused_optimizer_state`)
FUSED_STATE_KEY = "torchrec_fused_optimizer"
#: name of the fused optimizer's state in a ``dcp`` directory, beside ``state_dict``
DCP_FUSED_STATE = "fused_optimizer"


def fused_optimizer_state(optimizer: Any) -> dict[str, Any]:
    """This rank's part of a DMP ``fused_optimizer`` (TorchRec's ``CombinedOptimizer``) state, flat:
    ``{"<parameter>/<state>": ShardedTensor}``, e.g. ``ebc.embedding_bags.t_C1.weight/t_C1.momentum1`` (row-wise
    Adagrad: one accumulator per row, ``[rows]``; Adagrad: ``[rows, dim]``; SGD: none). A rank lists only the
    tables it holds a shard of."""
    return {
        f"{param}/{name}": value
        for param, states in optimizer.state_dict()["state"].items()
        for name, value in states.items()
    }


def _local_pieces(key: str, value: Any) -> list[tuple[list[int], torch.Tensor]]:
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    if not isinstance(value, ShardedTensor):
        raise TypeError(
            f"fused optimizer state {key!r} is a {type(value).__name__}; only ShardedTensor states (TorchRec's "
            "default) are gathered into a single-file checkpoint: use checkpoint_format 'dcp'"
        )
    return [(list(s.metadata.shard_offsets), s.tensor.detach().clone()) for s in value.local_shards()]


def gather_fused_state(state: Mapping[str, Any]) -> Optional[dict[str, torch.Tensor]]:
    """Whole tensors of :func:`fused_optimizer_state` on rank 0 (None on the others): every rank sends its shards
    (``gather_object``; a collective). Raises if the shards do not cover a state exactly once."""
    mine = {k: (list(v.size()), v.dtype, _local_pieces(k, v)) for k, v in state.items()}
    world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
    parts: list[Any] = [None] * world
    if world > 1:
        dist.gather_object(mine, parts if rank == 0 else None, dst=0)
    else:
        parts = [mine]
    if rank != 0:
        return None
    whole: dict[str, torch.Tensor] = {}
    covered: dict[str, int] = {}
    for part in parts:
        for key, (size, dtype, pieces) in part.items():
            out = whole.setdefault(key, torch.zeros(size, dtype=dtype))
            for offsets, tensor in pieces:
                out[tuple(slice(o, o + n) for o, n in zip(offsets, tensor.shape))] = tensor
                covered[key] = covered.get(key, 0) + tensor.numel()
    wrong = {k: (covered.get(k, 0), v.numel()) for k, v in whole.items() if covered.get(k, 0) != v.numel()}
    if wrong:
        raise RuntimeError(f"fused optimizer shards do not cover their states exactly once: {wrong} (elements, size)")
    return whole


def _global_shapes(state: Mapping[str, Any]) -> dict[str, list[int]]:
    """``{key: global shape}`` of a :func:`fused_optimizer_state` over all ranks (a collective)."""
    mine = {k: list(v.size()) for k, v in state.items()}
    found: list[Any] = [mine]
    if dist.is_initialized() and dist.get_world_size() > 1:
        found = [None] * dist.get_world_size()
        dist.all_gather_object(found, mine)
    return {k: v for part in found for k, v in sorted(part.items())}


def _check_fused_state(saved: Mapping[str, Any], state: Mapping[str, Any], where: str) -> None:
    """Raise (on every rank) unless the saved states (``{key: shape}``) are exactly those of the fused optimizer
    across ranks, with the same shapes. A row-wise Adagrad state of a column-wise table has one accumulator per
    row and column shard (``rows * shards``), so it loads only where the table has as many column shards."""
    expected = _global_shapes(state)
    saved_shapes = {k: list(v) for k, v in saved.items()}
    if saved_shapes != expected:
        missing = sorted(set(expected) - set(saved_shapes))
        unexpected = sorted(set(saved_shapes) - set(expected))
        shapes = {
            k: (saved_shapes[k], expected[k]) for k in expected if k in saved_shapes and saved_shapes[k] != expected[k]
        }
        raise ValueError(
            f"{where}: the fused optimizer's state does not match this run's (same fused_optimizer, tables and "
            f"column shards expected): missing {missing}, unexpected {unexpected}, shapes (saved, here) {shapes}"
        )


def shard_embeddings(
    module: nn.Module,
    *,
    sharding_type: str = "table_wise",
    table_sharding: Optional[Mapping[str, str]] = None,
    column_shard_dim: Optional[int] = None,
    fused_optimizer: str = "rowwise_adagrad",
    fused_lr: float = 0.01,
    fused_eps: float = 1e-8,
    fused_weight_decay: float = 0.0,
    device: Optional[torch.device] = None,
    process_group: Optional[dist.ProcessGroup] = None,
    data_parallel_kwargs: Optional[dict[str, Any]] = None,
) -> nn.Module:
    """``DistributedModelParallel(module)``: its EmbeddingBagCollections sharded in place by a plan from
    ``EmbeddingShardingPlanner`` (see the module docstring), the rest wrapped in DDP. Needs the default process
    group. Returns the DMP wrapper; ``module`` itself now holds the sharded collections."""
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.model_parallel import DefaultDataParallelWrapper, DistributedModelParallel
    from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
    from torchrec.distributed.types import ShardingEnv

    device = device or torch.device("cpu")
    if device.type != "cuda" and fused_optimizer in GPU_ONLY_FUSED_OPTIMIZERS:
        raise ValueError(
            f"fused_optimizer {fused_optimizer!r} needs CUDA (FBGEMM's CPU kernels offer "
            f"{sorted(set(FUSED_OPTIMIZERS) - set(GPU_ONLY_FUSED_OPTIMIZERS))})"
        )
    pg = process_group or dist.group.WORLD
    assert pg is not None
    world = dist.get_world_size(pg)
    collections = embedding_collections(module)
    if not collections:
        raise ValueError(f"{type(module).__name__} has no EmbeddingBagCollection for the torchrec strategy to shard")
    constraints = sharding_constraints(collections, sharding_type, table_sharding, device.type, column_shard_dim)
    full = {  # whole tables (not on meta) to copy into the shards after sharding
        name: {k: v.detach().clone() for k, v in ebc.state_dict().items()}
        for name, ebc in collections.items()
        if not any(p.is_meta for p in ebc.parameters())
    }
    sharder = EmbeddingBagCollectionSharder(
        fused_params=_fused_params(fused_optimizer, fused_lr, fused_eps, fused_weight_decay)
    )
    planner = EmbeddingShardingPlanner(
        topology=Topology(world_size=world, compute_device=device.type), constraints=constraints
    )
    plan = planner.collective_plan(module, [sharder], pg)
    # the CLI passes every DDP argument with its default (jsonargparse follows DDPStrategy's **kwargs): drop Nones
    ddp_kwargs = {k: v for k, v in (data_parallel_kwargs or {}).items() if v is not None}
    for fixed in _DMP_SETS_THESE:  # DMP passes these to DDP itself
        ddp_kwargs.pop(fixed, None)
    # TorchRec initialises the shards it creates from the global RNG, as many draws as this rank's shards: without
    # fork_rng the ranks' RNG streams (e.g. the gates' noise) would part from each other and from one process
    with torch.random.fork_rng(devices=[]):
        dmp = DistributedModelParallel(
            module,
            env=ShardingEnv.from_process_group(pg),
            device=device,
            plan=plan,
            sharders=[sharder],
            data_parallel_wrapper=DefaultDataParallelWrapper(
                bucket_cap_mb=int(ddp_kwargs.pop("bucket_cap_mb", 25)),
                static_graph=bool(ddp_kwargs.pop("static_graph", False)),
                find_unused_parameters=bool(ddp_kwargs.pop("find_unused_parameters", False)),
                ddp_kwargs=ddp_kwargs,
            ),
        )
    for name, state in full.items():
        load_full_state_dict(module.get_submodule(name), state)
    dmp.sharding_plan = plan
    return dmp


_DMP_SETS_THESE = ("module", "device_ids", "process_group", "gradient_as_bucket_view", "broadcast_buffers")


def fused_parameter_ids(module: nn.Module) -> set[int]:
    """Parameters of the module's sharded tables, which the fused kernels update in backward (their state dict
    entries are ShardedTensor or DTensor); data_parallel tables are plain tensors and stay with the dense
    optimizer."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor
    from torch.distributed.tensor import DTensor

    names = {k for k, v in module.state_dict().items() if isinstance(v, (ShardedTensor, DTensor))}
    return {id(p) for name, p in module.named_parameters() if name in names}


class TorchRecStrategy(DDPStrategy):
    """Lightning strategy around TorchRec's ``DistributedModelParallel`` (see the module docstring).

    Args:
        sharding_type: default sharding type of every table: ``table_wise`` (default), ``column_wise``,
            ``table_column_wise``, ``data_parallel``; ``row_wise`` / ``table_row_wise`` on CUDA only.
        table_sharding: per-table sharding types, ``{table or feature name: type}``.
        column_shard_dim: width of a column-wise shard (default: TorchRec's planner chooses, and keeps small
            tables whole).
        fused_optimizer: optimizer of the fused (table-wise / column-wise) tables: ``rowwise_adagrad``
            (default), ``adagrad``, ``sgd``, ``adam``.
        fused_lr: its learning rate (default: the LightningModule's ``lr``, else 0.01).
        fused_eps, fused_weight_decay: its epsilon and weight decay.
        checkpoint_format: ``file`` (default: one Lightning file, tables gathered whole on rank 0) or ``dcp``
            (a directory by ``torch.distributed.checkpoint``, each rank writing its shards, plus
            ``lightning.pt`` with the rest; loadable by any world size as ``ckpt_path``). Light-FMP's stage
            checkpoints (``pretrain.ckpt``, ``pruned.ckpt``, ``finetune.ckpt``) follow it.
        Other arguments: as Lightning's ``DDPStrategy`` (``timeout``, ``process_group_backend``, ...);
        ``static_graph`` / ``find_unused_parameters`` and other DDP keyword arguments go to the DDP around the
        dense part.
    """

    strategy_name = "torchrec"

    def __init__(
        self,
        sharding_type: str = "table_wise",
        table_sharding: Optional[dict[str, str]] = None,
        column_shard_dim: Optional[int] = None,
        fused_optimizer: str = "rowwise_adagrad",
        fused_lr: Optional[float] = None,
        fused_eps: float = 1e-8,
        fused_weight_decay: float = 0.0,
        checkpoint_format: str = "file",
        accelerator: Optional[Any] = None,
        parallel_devices: Optional[list[torch.device]] = None,
        cluster_environment: Optional[ClusterEnvironment] = None,
        checkpoint_io: Optional[CheckpointIO] = None,
        precision_plugin: Optional[Precision] = None,
        process_group_backend: Optional[str] = None,
        timeout: Optional[timedelta] = timedelta(minutes=30),
        start_method: str = "popen",
        **kwargs: Any,
    ) -> None:
        if start_method != "popen":
            raise ValueError(
                f"the torchrec strategy runs with start_method 'popen' only, got {start_method!r} "
                "(DistributedModelParallel fails at the end of a spawned fit)"
            )
        _check_sharding_type(sharding_type, "sharding_type", "cuda")  # the device is checked again at setup
        for name, value in (table_sharding or {}).items():
            _check_sharding_type(value, f"table_sharding[{name!r}]", "cuda")
        _fused_params(fused_optimizer, fused_lr or 0.01, fused_eps, fused_weight_decay)
        if checkpoint_format not in ("file", "dcp"):
            raise ValueError(f"checkpoint_format must be 'file' or 'dcp', got {checkpoint_format!r}")
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
            process_group_backend=process_group_backend,
            timeout=timeout,
            start_method="popen",
            **kwargs,
        )
        self.sharding_type = sharding_type
        self.table_sharding = dict(table_sharding or {})
        self.column_shard_dim = column_shard_dim
        self.fused_optimizer = fused_optimizer
        self.fused_lr = fused_lr
        self.fused_eps = fused_eps
        self.fused_weight_decay = fused_weight_decay
        self.checkpoint_format = checkpoint_format
        self.sharding_plan: Optional[Any] = None
        self._fused: Optional[Any] = None  # DMP's fused_optimizer, kept past teardown (a checkpoint after fit)

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        if "torchrec" not in strategy_registry:
            strategy_registry.register(
                "torchrec", cls, description="TorchRec DistributedModelParallel: sharded embedding tables"
            )

    @override
    def configure_ddp(self) -> None:
        """Shard the module's tables and wrap the dense part in DDP, both by DMP."""
        module = self.lightning_module
        assert module is not None
        if embedding_collections(module):
            lr = self.fused_lr if self.fused_lr is not None else float(getattr(module, "lr", 0.01))
            self.model = shard_embeddings(
                module,
                sharding_type=self.sharding_type,
                table_sharding=self.table_sharding,
                column_shard_dim=self.column_shard_dim,
                fused_optimizer=self.fused_optimizer,
                fused_lr=lr,
                fused_eps=self.fused_eps,
                fused_weight_decay=self.fused_weight_decay,
                device=self.root_device,
                data_parallel_kwargs=dict(self._ddp_kwargs),
            )
            self.sharding_plan = self.model.sharding_plan
            self._fused = self.model.fused_optimizer
            rank_zero_info(f"torchrec strategy: sharding plan\n{self.sharding_plan}")
        else:
            from torchrec.distributed.types import ShardedModule

            if any(isinstance(m, ShardedModule) for m in module.modules()):
                raise RuntimeError(
                    "the torchrec strategy got a module whose tables an earlier fit already sharded; fit a freshly "
                    "built (or loaded) module instead"
                )
            super().configure_ddp()  # no tables at all (e.g. only dense fields kept): plain DDP

    @override
    def setup_optimizers(self, trainer: Any) -> None:
        """The module's optimizers, without the parameters that the fused kernels update in backward."""
        super().setup_optimizers(trainer)
        assert self.lightning_module is not None
        fused = fused_parameter_ids(self.lightning_module)
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                group["params"] = [p for p in group["params"] if id(p) not in fused]
            for param in [p for p in optimizer.state if id(p) in fused]:  # e.g. Adagrad creates its state eagerly
                del optimizer.state[param]

    @property
    def fused_embedding_optimizer(self) -> Optional[Any]:
        """DMP's ``fused_optimizer`` (TorchRec's ``CombinedOptimizer`` of the fused tables) once the tables are
        sharded; None before, or without tables."""
        return self._fused

    def _sharded_format(self) -> bool:
        return self.checkpoint_format == "dcp"

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        """Whole tables gathered on rank 0, or (``dcp``) the sharded state dict as it is. Every rank must call
        it, as Lightning's ``save_checkpoint`` does."""
        assert self.lightning_module is not None
        if self._sharded_format():
            return self.lightning_module.state_dict()
        return gather_state_dict(self.lightning_module)

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Optional[Any] = None) -> None:
        """Every rank calls it (Lightning's ``Trainer.save_checkpoint``). A checkpoint with the optimizers' state
        (not ``weights_only``) also gets the fused optimizer's (:data:`FUSED_STATE_KEY`): ``file`` gathers it whole
        to rank 0, ``dcp`` writes each rank's shards into the directory."""
        fused = (
            fused_optimizer_state(self._fused) if self._fused is not None and "optimizer_states" in checkpoint else None
        )
        sharded = self._sharded_format()
        if fused is not None:
            shapes = _global_shapes(fused)
            entry: dict[str, Any] = {"optimizer": self.fused_optimizer, "shapes": shapes}
            if not sharded:
                entry["state"] = gather_fused_state(fused)
            checkpoint = {**checkpoint, FUSED_STATE_KEY: entry}
        if not sharded:
            super().save_checkpoint(checkpoint, filepath, storage_options)
            return
        rest = {k: v for k, v in checkpoint.items() if k != "state_dict"}
        save_sharded(checkpoint["state_dict"], Path(filepath), rest, fused)

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: Optional[bool] = None) -> dict[str, Any]:
        """A ``dcp`` directory is read into the module directly (any world size wrote it); a file as usual. The
        fused optimizer's state is loaded later, once the tables are sharded (:meth:`load_optimizer_state_dict`)."""
        if Path(checkpoint_path).is_dir():
            assert self.lightning_module is not None
            checkpoint = load_sharded(self.lightning_module, Path(checkpoint_path))
            if FUSED_STATE_KEY in checkpoint:
                checkpoint[FUSED_STATE_KEY]["directory"] = str(checkpoint_path)
            return checkpoint
        return super().load_checkpoint(checkpoint_path, weights_only)

    @override
    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        """The dense optimizers' state as usual, then the fused optimizer's into this rank's shards (from the
        whole tensors of a ``file`` checkpoint, or read from a ``dcp`` directory by DCP): any world size may have
        written it. A checkpoint without it (written before it was saved) warns and leaves the state fresh."""
        super().load_optimizer_state_dict(checkpoint)
        if self._fused is None:
            return
        state = fused_optimizer_state(self._fused)
        entry = checkpoint.get(FUSED_STATE_KEY)
        if entry is None:
            if _global_shapes(state):
                rank_zero_warn(
                    "torchrec strategy: the checkpoint holds no fused optimizer state; the fused embedding optimizer "
                    f"({self.fused_optimizer}) starts from a fresh state"
                )
            return
        if entry["optimizer"] != self.fused_optimizer:
            raise ValueError(
                f"the checkpoint's fused optimizer is {entry['optimizer']!r}, this run's fused_optimizer is "
                f"{self.fused_optimizer!r}; resume with the same one"
            )
        _check_fused_state(entry["shapes"], state, "resuming")
        if "state" in entry:
            for key, target in state.items():  # every rank read the whole file
                _local_copy(target, entry["state"][key])
        else:
            load_fused_sharded(state, Path(entry["directory"]))

    @override
    def remove_checkpoint(self, filepath: Any) -> None:
        if Path(filepath).is_dir():
            if self.is_global_zero:
                shutil.rmtree(filepath)
            return
        super().remove_checkpoint(filepath)

    @override
    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        assert self.lightning_module is not None
        load_full_state_dict(self.lightning_module, checkpoint["state_dict"], strict=strict)

    @override
    def teardown(self) -> None:
        from torchrec.distributed.model_parallel import DistributedModelParallel

        if isinstance(self.model, DistributedModelParallel):
            self.model = self.lightning_module  # the module keeps its sharded tables (e.g. for trainer.test)
        super().teardown()


def register_torchrec_strategy() -> None:
    """Register ``torchrec`` with Lightning's strategy registry (done on ``import lightfmp``)."""
    TorchRecStrategy.register_strategies(StrategyRegistry)
