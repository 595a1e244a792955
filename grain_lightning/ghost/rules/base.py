r"""The rule interface: how one module's trainable parameters become gradient terms in one backward.

A rule records each forward call of its module (the input, prepared by :meth:`GhostRule.prepare`) and taps
the output; the engine's backward delivers each call's output gradient; :meth:`GhostRule.terms` then turns
the ``n`` samples' recorded inputs and output gradients into :mod:`~grain_lightning.ghost.terms`. A rule is
also one block of the block-wise mode. Subclass it, implement ``terms`` (and ``why_unsupported`` for
configurations you cannot handle exactly), and register it with
:func:`~grain_lightning.ghost.registry.register_rule`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, Protocol

import torch
from torch import nn

from grain_lightning.ghost.tensors import Tap, cat_calls, work
from grain_lightning.ghost.terms import MatrixTerm, Term, VectorTerm

__all__ = ["GhostRule", "RecordedCall", "RuleHost", "UnsupportedModuleError", "weight_bias_terms"]


class UnsupportedModuleError(TypeError):
    """A module with trainable parameters that the one-backward engine cannot handle exactly."""


@dataclass
class RecordedCall:
    """One forward call of a layer: what its rule needs, plus the output gradient once backward delivers it.

    ``batch`` holds the sizes of the batch dimension of the call's input and output (checked against the
    number of losses at every step); ``source`` and ``version`` the raw input and its autograd version
    counter at the call, so that an input modified in place afterwards is detected instead of misused.
    """

    inputs: Any
    info: Any = None
    grad: Optional[torch.Tensor] = None
    batch: tuple[int, int] = (-1, -1)
    source: Optional[torch.Tensor] = None
    version: int = 0
    input_fns: list = field(default_factory=list)  # autograd nodes of the inputs: where the module's graph ends
    shape: tuple[int, ...] = ()  # the input's shape (the engine's call signature)

    @property
    def output_grad(self) -> torch.Tensor:
        """The output gradient (only read once the backward delivered it)."""
        if self.grad is None:
            raise RuntimeError("the output gradient of this call has not arrived")
        return self.grad


class RuleHost(Protocol):
    """What a rule needs of its engine (:class:`~grain_lightning.ghost.engine.GhostEngine` provides it)."""

    linear_gram: str  # "auto", "ghost" or "materialize": the Gram form of matrix terms

    @property
    def anchor(self) -> Optional[torch.Tensor]:
        """The scalar every tap hangs on (the one backward is taken with respect to it)."""
        ...

    def counts(self, p: torch.Tensor) -> bool:
        """Whether ``p``'s gradient comes from the rules' terms this step."""
        ...

    def key(self, p: torch.Tensor) -> int:
        """``id`` of the parameter ``p`` stands for (FSDP2 swaps a module's sharded parameter for an unsharded
        one while it runs: both have the sharded parameter's key)."""
        ...

    def receive(self, rule: GhostRule, call: RecordedCall, grad: torch.Tensor) -> None:
        """A tap's backward delivers a call's output gradient."""
        ...

    def observe_batch(self, x: torch.Tensor, batch_dim: int) -> None:
        """Learn the forward's batch size ``n`` from a call's input (the first one with more than one row)."""
        ...

    def broadcast(self, x: torch.Tensor, output: torch.Tensor, batch_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A call whose input and output have a batch of 1 while the forward's batch is ``n > 1`` (position ids
        ``(1, S)`` broadcast over the batch afterwards): both expanded to ``n``, so that each sample's output
        gradient arrives separately. Other calls are returned unchanged."""
        ...


class GhostRule(ABC):
    """How one module's trainable parameters are handled exactly from one backward.

    Args:
        engine: the engine the rule belongs to.
        name: the module's qualified name (for messages).
        module: the module.
        batch_dim: where the batch lives in the module's inputs and outputs (1 for the layers of a
            sequence-first ``TransformerEncoderLayer``/``DecoderLayer``, else 0).
    """

    def __init__(self, engine: RuleHost, name: str, module: nn.Module, batch_dim: int = 0) -> None:
        self.engine, self.name, self.module, self.batch_dim = engine, name, module, batch_dim
        self.calls: list[RecordedCall] = []

    # ------------------------------------------------------------------ what the rule covers
    @classmethod
    def why_unsupported(cls, module: nn.Module) -> Optional[str]:
        """Why this module cannot be handled exactly (``None``: it can). Checked when the engine is built."""
        return None

    @classmethod
    def own_parameters(cls, module: nn.Module) -> list[nn.Parameter]:
        """The parameters this rule accounts for (default: the module's own, not its children's)."""
        return list(module.parameters(recurse=False))

    @classmethod
    def claimed_children(cls, module: nn.Module) -> list[nn.Module]:
        """Submodules whose parameters this rule accounts for, so that they get no rule of their own."""
        return []

    def owns(self) -> set[int]:
        """Ids of the parameters this rule's calls may use."""
        return {self.engine.key(p) for p in self.own_parameters(self.module)}

    def counted(self, p: Optional[torch.Tensor]) -> bool:
        """Whether ``p`` is a parameter this step's one-backward terms must cover."""
        return p is not None and self.engine.counts(p)

    @property
    def params(self) -> list[nn.Parameter]:
        return [p for p in self.own_parameters(self.module) if self.counted(p)]

    # ------------------------------------------------------------------ recording
    def attach(self) -> list[Any]:
        """Install the hooks that record calls; returns their handles (removed after the forward)."""
        return [self.module.register_forward_hook(self._forward_hook)]

    def detach(self) -> None:  # noqa: B027  (optional hook: most rules only add hooks)
        """Undo anything :meth:`attach` did besides hooks (called when the capture ends)."""

    #: parameter names this rule's terms cover; a module of the type with other own parameters (added by a
    #: parametrisation, pruning or weight norm) gets the generic rule instead. ``None``: not checked.
    expects: ClassVar[Optional[frozenset[str]]] = None

    def _forward_hook(self, module: nn.Module, args: tuple, output: Any) -> Any:
        if not isinstance(output, torch.Tensor) or not output.requires_grad or not args:
            return None
        x = args[0]
        self.engine.observe_batch(x, self.batch_dim)
        if self.expands_broadcast(x):
            x, output = self.engine.broadcast(x, output, self.batch_dim)
        return self.record(x, output)

    def expands_broadcast(self, x: torch.Tensor) -> bool:
        """Whether a batch-of-one call with input ``x`` is expanded to the batch (default: no, it is refused).

        Only safe where the output of such a call is, in practice, broadcast over the batch by the code that
        uses it (position ids of an embedding); elsewhere it may be indexed or reduced, which an expansion
        would turn into a wrong attribution (or even a different forward).
        """
        return False

    def record(self, x: torch.Tensor, output: torch.Tensor, info: Any = None) -> torch.Tensor:
        """Record a call with input ``x``; returns the tapped ``output`` to use in its place."""
        kept = self.prepare(x)
        aliased = isinstance(kept, torch.Tensor) and kept.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
        # an input the rule keeps by reference must not change in place afterwards; a copy is immune
        call = RecordedCall(kept, info, batch=self.call_batch(x, output), source=x.detach() if aliased else None)
        call.version, call.shape = x._version, tuple(x.shape)
        call.input_fns = [x.grad_fn] if x.grad_fn is not None else []
        self.calls.append(call)
        return Tap.apply(output, self.engine.anchor, self, lambda g: self.engine.receive(self, call, g))

    def call_batch(self, x: torch.Tensor, output: torch.Tensor) -> tuple[int, int]:
        """Sizes of the batch dimension of a call's input and output (``-1``: the tensor has no such dim)."""
        d = self.batch_dim
        return (x.shape[d] if x.ndim > d else -1, output.shape[d] if output.ndim > d else -1)

    def check_call(self, call: RecordedCall, n: int) -> Optional[str]:
        """Why this call's records cannot give the ``n`` samples' gradients exactly (``None``: they can).

        Checked by the engine for every call at every step, before the backward: the input and output must
        carry the ``n`` samples in the batch dimension (not broadcast, flattened or reshaped), and the
        recorded input must not have been modified in place since the call.
        """
        if call.source is not None and call.source._version != call.version:
            return "its input was modified in place after the call (the recorded input is no longer the one used)"
        if call.batch != (n, n):
            return (
                f"the batch dim {self.batch_dim} of its input/output has size {call.batch[0]}/{call.batch[1]}, not the "
                f"{n} samples of the losses (a broadcast, flattened or reshaped batch)"
            )
        return None

    def prepare(self, x: torch.Tensor) -> Any:
        """What to keep of the input (default: the detached tensor)."""
        return x.detach()

    def ready(self) -> bool:
        return all(c.grad is not None for c in self.calls)

    # ------------------------------------------------------------------ helpers for terms
    def samples(self, t: torch.Tensor, batch_dim: int, n: int) -> torch.Tensor:
        """``(n, T, f)`` view of a per-position tensor whose batch lives in ``batch_dim``."""
        if t.ndim < 2 or t.shape[batch_dim] != n:
            raise RuntimeError(
                f"module {self.name!r}: expected the batch of {n} samples in dim {batch_dim} of a tensor with "
                f"at least 2 dims, got shape {tuple(t.shape)} (samples must not be mixed in one row)"
            )
        return work(t.movedim(batch_dim, 0).reshape(n, -1, t.shape[-1]))

    @staticmethod
    def concat(parts: list[torch.Tensor]) -> torch.Tensor:
        """Concatenate per-call ``(n, T_c, f)`` tensors along ``T`` (a module called several times)."""
        return cat_calls(parts)

    @abstractmethod
    def terms(self, n: int, k: int) -> list[Term]:
        """The gradient terms of this module's calls, once their output gradients have arrived."""


def weight_bias_terms(rule: GhostRule, m: Any, a: torch.Tensor, b: torch.Tensor, k: int) -> list[Term]:
    """Terms of a Linear-like layer from inputs ``a`` (n, T, d) and output gradients ``b`` (n, T, p)."""
    out: list[Term] = []
    if rule.counted(m.weight):
        out.append(MatrixTerm(m.weight, None, a.to(b.dtype), b, rule.engine.linear_gram, k))
    if rule.counted(m.bias):
        out.append(VectorTerm(m.bias, None, b.sum(1)))
    return out
