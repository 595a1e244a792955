r"""The generic rule: exact per-sample gradients of any module's own parameters with ``torch.func``.

Used for every module with trainable parameters that has no registered rule (``LlamaRMSNorm``,
``T5LayerNorm`` and other RMSNorm-like norms, ViT's embeddings with their ``cls_token`` and position
embeddings, your own layers) and for configurations a registered rule refuses (``Conv`` with ``groups > 1``).
For sample ``i`` with recorded inputs ``x_i`` and output gradient ``B_i``:

    g_i = vjp_theta[ f(theta, x_i) ](B_i)          (f: the module's functional call on a batch of one)

vmapped over the ``n`` samples (``torch.func.vmap`` of ``torch.func.vjp`` of ``functional_call``), inside
the engine's one backward: no extra backward of the model. Cost: one forward and one backward of *this
module* on the recorded inputs, vectorised over the samples, and ``n x m`` numbers for the per-sample
gradients of its ``m`` own parameters (a :class:`~grain_lightning.ghost.terms.VectorTerm` per parameter);
for a norm layer ``O(n T m)``, for a module with large weight matrices a registered rule is much cheaper.

The rule only holds for modules that treat samples independently. On its first step in train mode and its
first in eval mode it checks that: the module, re-run per sample under ``vmap``, must reproduce the batched
output it recorded. Every tensor input is checked for in-place changes at every step. A module that
couples samples is refused and, since its backward mixes the samples' output gradients of every module
below it, sends every parameter to the reference engine; one that draws random numbers or is not
``vmap``-able is refused alone, naming the reason. Only the
first tensor output is tapped; parameters that reach the losses through other outputs are caught by the
engine's graph check.
"""

from __future__ import annotations

import contextlib
from typing import Any, NamedTuple, Optional

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from grain_lightning.ghost.rules.base import GhostRule, RecordedCall
from grain_lightning.ghost.terms import Term, VectorTerm

__all__ = ["FunctionalRule"]


def _detach(v: Any) -> Any:
    return v.detach() if isinstance(v, torch.Tensor) else v


class _Call(NamedTuple):
    """What the generic rule keeps of a call besides its inputs."""

    versions: list[tuple[torch.Tensor, int]]  # every tensor input and its version counter at the call
    output: Optional[torch.Tensor]  # the batched output, until the probe for this training flag has run
    autocast: Optional[tuple[str, torch.dtype]]  # the autocast of the call, re-entered per sample
    training: bool


class FunctionalRule(GhostRule):
    """Exact per-sample gradients of a module's own parameters by ``vmap`` over ``vjp`` (see the module doc)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._probe: dict[bool, str] = {}  # per training flag: why the module failed its probe ("" if it passed)
        self.couples = False  # the probe found that it couples samples (then no module below it is exact)

    def attach(self) -> list[Any]:
        return [self.module.register_forward_hook(self._hook_kwargs, with_kwargs=True)]

    def _hook_kwargs(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if not isinstance(output, torch.Tensor) or not output.requires_grad:
            return None
        leaves, _ = tree_flatten((args, kwargs))
        first = next((t for t in leaves if isinstance(t, torch.Tensor)), None)
        if first is None:
            return None
        self.engine.observe_batch(first, self.batch_dim)  # a batch of one is refused, not expanded: see base
        device = first.device.type
        autocast = (device, torch.get_autocast_dtype(device)) if torch.is_autocast_enabled(device) else None
        tapped = self.record(first, output)
        call = self.calls[-1]
        call.inputs = tuple(_detach(v) for v in args), {k: _detach(v) for k, v in kwargs.items()}
        tensors = [t for t in leaves if isinstance(t, torch.Tensor)]
        # every input is kept by reference: none may change in place before the backward
        call.info = _Call(
            [(t.detach(), t._version) for t in tensors],
            output.detach() if module.training not in self._probe else None,  # what the probe must reproduce
            autocast,
            module.training,
        )
        call.input_fns = [t.grad_fn for t in tensors if t.grad_fn is not None]
        return tapped

    def prepare(self, x: torch.Tensor) -> Any:
        return None  # the whole call is kept by the hook

    # ------------------------------------------------------------------ the per-sample map
    def _per_sample(self, call: RecordedCall, n: int, grad: Optional[torch.Tensor]) -> Any:
        """vmap over samples of the module's output (``grad is None``) or of its parameters' vjp with ``grad``."""
        bd = self.batch_dim
        names = [name for name, p in self.module.named_parameters(recurse=False) if self.counted(p)]
        own = dict(self.module.named_parameters(recurse=False))
        primals = {name: own[name].detach() for name in names}
        leaves, spec = tree_flatten(call.inputs)
        dims = [bd if isinstance(t, torch.Tensor) and t.ndim > bd and t.shape[bd] == n else None for t in leaves]

        def one(sample_leaves: list, g: Optional[torch.Tensor]) -> Any:
            rebuilt = [t.unsqueeze(bd) if d is not None else t for t, d in zip(sample_leaves, dims)]
            args, kwargs = tree_unflatten(rebuilt, spec)

            def f(params: dict[str, torch.Tensor]) -> torch.Tensor:
                out = torch.func.functional_call(self.module, params, args, kwargs, strict=False)
                return out

            if g is None:
                return f(primals).squeeze(bd)
            pullback = torch.func.vjp(f, primals)[1]
            return pullback(g.unsqueeze(bd))[0]

        state = call.info.autocast
        autocast = torch.autocast(*state) if state is not None else contextlib.nullcontext()
        with autocast:  # the same precision as the recorded forward
            if grad is None:
                return torch.func.vmap(lambda s: one(s, None), in_dims=(dims,), out_dims=bd, randomness="error")(leaves)
            return torch.func.vmap(one, in_dims=(dims, bd), randomness="error")(leaves, grad)

    def check_call(self, call: RecordedCall, n: int) -> Optional[str]:
        reason = super().check_call(call, n)
        if reason is not None:
            return reason
        info: _Call = call.info
        if any(t._version != v for t, v in info.versions):
            return "an input was modified in place after the call (the recorded input is no longer the one used)"
        if info.training not in self._probe and info.output is not None:
            self._probe[info.training] = self._run_probe(call, n)
        return self._probe.get(info.training) or None

    def _run_probe(self, call: RecordedCall, n: int) -> str:
        """Re-run the module per sample (in train or eval mode, as recorded): ``""`` if it reproduces the
        batched output, else why not."""
        expected = call.info.output
        try:
            again = self._per_sample(call, n, None)
        except Exception as err:  # vmap or functional_call cannot run it: refuse, naming why
            return f"torch.func cannot run it per sample ({type(err).__name__}: {str(err)[:200]})"
        dtype = call.info.autocast[1] if call.info.autocast is not None else expected.dtype
        tol = {torch.float64: 1e-9, torch.float32: 1e-4}.get(dtype, 3e-2)
        if again.shape != expected.shape:
            return f"re-run per sample it gives shape {tuple(again.shape)}, not {tuple(expected.shape)}"
        if not torch.allclose(again, expected, rtol=tol, atol=tol * float(expected.abs().max())):
            self.couples = True
            return "re-run per sample it does not reproduce its batched output (it couples samples)"
        return ""

    def terms(self, n: int, k: int) -> list[Term]:
        if not self.params:  # refused this step, or nothing of it counts
            return []
        sums: dict[str, torch.Tensor] = {}
        for call in self.calls:
            for name, g in self._per_sample(call, n, call.output_grad).items():
                sums[name] = g if name not in sums else sums[name] + g
        own = dict(self.module.named_parameters(recurse=False))
        return [VectorTerm(own[name], None, g.reshape(n, -1)) for name, g in sums.items()]
