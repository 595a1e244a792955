r"""What the one-backward engine needs to know about FSDP2 (``torch.distributed.fsdp.fully_shard``).

FSDP2 keeps each parameter as a sharded DTensor (what the optimizer holds) and, while its module runs
forward and backward, swaps the module's attribute for an unsharded ``nn.Parameter`` (all-gathered) that
autograd sees. The engine counts parameters by the sharded one's ``id``; :func:`sharded_keys` maps the
unsharded parameters to it. FSDP2 also installs a forward pre-hook (the all-gather) on every module it
shards, which does not change what the module computes: :func:`foreign_pre_hooks` leaves it out.

Checked on torch 2.13 (CPU, gloo). Reads ``FSDPState._fsdp_param_groups`` and ``FSDPParam.sharded_param`` /
``_unsharded_param``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["foreign_pre_hooks", "is_fsdp_managed", "sharded_keys"]


def _fsdp_module() -> Any:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a build without distributed support
        return None
    return FSDPModule


def _states(root: nn.Module) -> list[Any]:
    cls = _fsdp_module()
    if cls is None:
        return []
    return [m._get_fsdp_state() for m in root.modules() if isinstance(m, cls)]


def sharded_keys(root: nn.Module) -> dict[int, int]:
    """``{id(unsharded parameter): id(sharded parameter)}`` for every FSDP2 parameter under ``root``."""
    out: dict[int, int] = {}
    for state in _states(root):
        for group in state._fsdp_param_groups:
            for fp in group.fsdp_params:
                unsharded = getattr(fp, "_unsharded_param", None)  # created at the first all-gather
                if unsharded is not None:
                    out[id(unsharded)] = id(fp.sharded_param)
    return out


def foreign_pre_hooks(module: nn.Module) -> list[Any]:
    """The module's forward pre-hooks other than FSDP2's own (its all-gather)."""
    cls = _fsdp_module()
    hooks = list(module._forward_pre_hooks.values())
    if cls is None or not isinstance(module, cls):
        return hooks
    state = module._get_fsdp_state()
    return [h for h in hooks if getattr(h, "__self__", None) is not state]


def is_fsdp_managed(p: Any) -> bool:
    """Whether ``p`` is a sharded DTensor parameter (FSDP2 holds it; its module sees it unsharded only while
    it runs)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return isinstance(p, DTensor)
