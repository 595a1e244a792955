r"""One-backward engine: exact group Gram and combined gradient from layer activations (the engine proper:
capture, backward, combination; the per-layer mathematics is in the rules and terms).

For a Linear layer with input ``A_i`` (``T x d``) and output gradient ``B_i`` (``T x p``) of sample ``i``,
the per-sample weight gradient is ``g_i = B_i^T A_i`` and

    <g_i, g_j> = sum_{t,s} (A_i A_j^T)_{ts} (B_i B_j^T)_{ts}          ("ghost" inner product)

The group Gram is ``S^T K S`` (``K``: ``n x n`` sample Gram, ``S``: ``n x k`` one-hot group assignment).
One backward of ``sum_i l_i / n_{group(i)}`` gives every ``B_i`` already divided by its group size. The
backward is taken with respect to the layer *outputs* only (through an identity "tap" on each output), so
autograd's own weight-gradient GEMMs are skipped and nothing flows below the first tapped layer. The
combined gradient ``sum_j w_j g_j = sum_i w_{group(i)} B_i^T A_i`` comes from the same ``A`` and ``B``
("book-keeping"): no second backward.

Per layer and parameter ("term"), the Gram is computed in whichever form costs fewer flops:

    ghost        (n T)^2 (d + p)                      keeps A, B for the combined gradient
    materialise  n T p d + k^2 p d                    the k group gradients G_j = sum_{i in j} B_i^T A_i

and a materialised term keeps ``G`` (``k p d`` numbers) or ``A, B`` (``n T (d + p)``), whichever is smaller;
when it keeps ``A, B``, the ``G_j`` are formed in cache-sized slices of output rows and never all at once.
With ``combine="backward"`` nothing is kept: the combined gradient comes from one weighted second backward.

Rules (all exact, samples independent), one module per family in :mod:`grain_lightning.ghost.rules`, found
by module type through :mod:`grain_lightning.ghost.registry` (register your own with ``register_rule``):

* ``Linear`` (any leading dims), ``Conv1d``/``Conv2d`` (``groups=1``, zero padding; the input is unfolded so
  that ``T`` = output positions, ``d = C_in kh kw``), and the packed projections of
  ``MultiheadAttention`` (captured while the module runs, with the sequence-first layout it uses inside).
* ``Embedding``: ``<g_i, g_j> = sum_{t,s} [id_i(t) = id_j(s)] <B_i(t), B_j(s)>`` (``padding_idx`` masked);
  materialised over the rows the batch touches when that is cheaper.
* ``LayerNorm``/``RMSNorm`` weights and every bias: per-sample vectors, materialised.
* A module called several times: its calls are concatenated along ``T`` (still exact).

* ``transformers``' ``Conv1D`` (GPT-2): a Linear with a transposed weight.
* Any other module with trainable parameters (RMSNorm-like norms, ViT embeddings, your own layers), and
  configurations a registered rule refuses: the generic ``torch.func`` rule
  (:class:`~grain_lightning.ghost.rules.functional.FunctionalRule`), exact at the cost of a vmapped
  forward and backward of that module.
* A parameter used by several modules (tied weights: GPT-2's ``wte``/``lm_head``): one term per use and the
  cross terms between uses (:meth:`~grain_lightning.ghost.terms.Term.cross`).

Checked at every step, before the backward (a failed check is never computed silently):

* every recorded call carries the ``n`` samples of the losses in its batch dimension, in its input and its
  output. An embedding called with ids of batch one (position ids ``(1, S)`` broadcast over the batch
  afterwards, as BERT and GPT-2 do) is expanded to the forward's batch size when it is recorded, which is
  exact: every sample used the same ids, and each sample's output gradient then arrives separately. Any
  other call with a batch of one is refused (its output may be indexed or reduced, not broadcast). The
  batch size is the one given to :meth:`GhostEngine.capture`, else the batch dim of the first recorded call;
* a recorded input was not modified in place after the call;
* ``BatchNorm`` in training mode (samples coupled: every parameter goes to the reference engine);
* by walking the autograd graph, that each parameter reaches the losses only through its own module's
  recorded calls.

A module that fails a check is refused: with ``unsupported="raise"`` the engine raises
:class:`UnsupportedModuleError` naming the module and why; with ``"fallback"`` its parameters get exact
per-group gradients from the reference engine (one extra backward per group, through the same graph) and
join the Gram, with a warning. The self-check (``backward(..., self_check=True)``,
:mod:`~grain_lightning.ghost.self_check`) compares the result with autograd on random group weights, for
what no shape can reveal (a batch moved to another dimension of the same size).

Precision: per-term products in float32 (float64 for float64 models; bf16/fp16 activations are upcast, and
under autocast the layer input is rounded to the autocast dtype as the layer itself sees it), the Gram
summed over terms in float64.

Block-wise mode (:meth:`GhostEngine.blockwise_backward`): one min-norm solve per module, done as soon as
that module's output gradients arrive.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from grain_lightning.config import PolicyOptions
from grain_lightning.ghost.fsdp import foreign_pre_hooks, is_fsdp_managed, sharded_keys
from grain_lightning.ghost.registry import couples_samples, rule_for
from grain_lightning.ghost.rules.base import GhostRule, RecordedCall, UnsupportedModuleError
from grain_lightning.ghost.rules.functional import FunctionalRule
from grain_lightning.ghost.self_check import SelfCheckError, SelfCheckReport, compare, random_weights
from grain_lightning.ghost.terms import MatrixTerm, Term
from grain_lightning.groups import GroupAssignment
from grain_lightning.policy import StepPolicy
from grain_lightning.reference import GroupGradients, group_gradients
from grain_lightning.solver import MinNormResult

__all__ = ["BlockwiseResult", "Capture", "GhostEngine", "GhostGradients", "check_losses"]

_SEQ_FIRST_PARENTS = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


def _rule_applies(rule_cls: type[GhostRule], module: nn.Module) -> bool:
    """A registered rule models its module only without forward pre-hooks (pruning, weight norm, spectral
    norm recompute the weight from other parameters), with the parameters it expects, in a configuration it
    does not refuse; otherwise the generic rule runs the module itself, hooks included."""
    if foreign_pre_hooks(module) or rule_cls.why_unsupported(module) is not None:
        return False
    names = {name for name, _ in module.named_parameters(recurse=False)}
    return rule_cls.expects is None or names <= rule_cls.expects


def check_losses(losses: Any, batch_size: Optional[int] = None) -> int:
    """Validate per-sample losses: a ``(n,)`` floating tensor with an autograd graph (and ``n == batch_size``
    when given). Returns ``n``; raises ``ValueError`` naming the expected and the received shape."""
    if not isinstance(losses, torch.Tensor):
        raise ValueError(f"expected (n,) per-sample losses as a tensor, got {type(losses).__name__}")
    expected = f"({batch_size},)" if batch_size is not None else "(n,)"
    if losses.ndim != 1 or losses.numel() == 0 or (batch_size is not None and losses.shape[0] != batch_size):
        raise ValueError(
            f"expected {expected} per-sample losses (one per sample, reduction='none'), got shape {tuple(losses.shape)}"
        )
    if not losses.requires_grad or losses.grad_fn is None:
        raise ValueError(
            f"the losses of shape {tuple(losses.shape)} have no autograd graph (computed under torch.no_grad(), "
            "detached, or from parameters that do not require grad)"
        )
    return int(losses.shape[0])


@dataclass
class BlockwiseResult:
    """What :meth:`GhostEngine.blockwise_backward` did: one min-norm solve per block (module)."""

    solves: dict[str, MinNormResult]
    grams: dict[str, torch.Tensor]

    def gram(self) -> torch.Tensor:
        """The global ``(k, k)`` Gram (sum of the block Grams)."""
        return torch.stack(list(self.grams.values())).sum(0)


class GhostGradients:
    """The result of :meth:`GhostEngine.backward`: the group Gram and, on demand, the combined gradient.

    Same protocol as the reference engine's :class:`~grain_lightning.reference.GroupGradients`
    (``num_groups``, ``gram()``, ``combine(weights)``), without storing ``k`` gradients per parameter.
    """

    def __init__(self, engine: GhostEngine, gram: torch.Tensor, k: int) -> None:
        self.engine, self._gram, self.num_groups = engine, gram, k

    def gram(self) -> torch.Tensor:
        return self._gram

    def combine(self, weights: torch.Tensor) -> list[Optional[torch.Tensor]]:
        """``sum_j w_j g_j`` for every parameter of ``engine.params`` (``None`` for unreached ones)."""
        return self.engine._combine(weights)

    def weighted_loss(self, weights: torch.Tensor) -> torch.Tensor:
        """The loss whose backward gives ``sum_j w_j g_j`` (:meth:`GhostEngine.weighted_loss`)."""
        return self.engine.weighted_loss(weights)

    def release(self) -> None:
        """Drop the activations the engine keeps for :meth:`combine`."""
        self.engine.release()


class GhostEngine:
    """Exact group Gram and combined gradient in one forward and one backward pass.

    Usage::

        engine = GhostEngine(model)                     # checks every module with trainable parameters
        with engine.capture():
            losses = loss_fn(model(x), y, reduction="none")      # (n,)
        grads = engine.backward(losses, assignment)     # GhostGradients; grads.gram(): (k, k) float64
        engine.write_gradients(weights)                 # p.grad = sum_j w_j g_j

    Args:
        module: the model.
        params: the parameters that count (default: every trainable parameter of ``module``); frozen ones
            are always ignored.
        linear_gram: ``"auto"`` (cheaper form per term), ``"ghost"`` or ``"materialize"``.
        unsupported: ``"raise"`` (:class:`UnsupportedModuleError` naming the module) or ``"fallback"``
            (reference engine for those parameters; every parameter if a module couples samples).
        combine: how the combined gradient is formed: ``"bookkeeping"`` (from the stored ``A, B`` or ``G``
            of every layer: no second backward, but that storage peaks at the end of the backward) or
            ``"backward"`` (keep the graph, store nothing, and run one weighted backward
            ``sum_i w_{group(i)} l_i / n_{group(i)}`` once the weights are known: peak memory of a plain
            step, one extra backward in time).

    Every layer must see the batch in dim 0 of its input and output (dim 1 for the layers of a
    ``TransformerEncoderLayer``/``DecoderLayer`` with ``batch_first=False``; ``MultiheadAttention`` follows
    its ``batch_first``), or for an embedding, ids of batch one broadcast afterwards (expanded when recorded);
    this is
    checked at every step. Parameters must be used only by their modules' forwards (checked on the graph).
    """

    def __init__(
        self,
        module: nn.Module,
        *,
        params: Optional[Iterable[torch.Tensor]] = None,
        linear_gram: str = "auto",
        unsupported: str = "raise",
        combine: str = "bookkeeping",
    ) -> None:
        if combine not in ("bookkeeping", "backward"):
            raise ValueError(f"combine must be 'bookkeeping' or 'backward', got {combine!r}")
        self.combine = combine
        if linear_gram not in ("auto", "ghost", "materialize"):
            raise ValueError(f"linear_gram must be 'auto', 'ghost' or 'materialize', got {linear_gram!r}")
        if unsupported not in ("raise", "fallback"):
            raise ValueError(f"unsupported must be 'raise' or 'fallback', got {unsupported!r}")
        self.linear_gram, self.unsupported = linear_gram, unsupported
        trainable: list[torch.Tensor] = [p for p in module.parameters() if p.requires_grad]
        if params is not None:
            module_ids = {id(p) for p in trainable}
            given = [p for p in dict.fromkeys(params) if p.requires_grad]
            foreign = [tuple(p.shape) for p in given if id(p) not in module_ids]
            if foreign:
                raise ValueError(f"params of shapes {foreign} are not trainable parameters of the module")
            trainable = given
        #: the parameters this engine writes, in order (ghost-handled and fallback ones)
        self.params: list[torch.Tensor] = trainable
        self._named = list(module.named_parameters())
        self._names = {id(p): name for name, p in self._named}
        self._module = module
        #: FSDP2: ``id`` of an unsharded parameter -> ``id`` of its sharded one (:mod:`~grain_lightning.ghost.fsdp`)
        self._alias: dict[int, int] = {}
        counted = {id(p) for p in trainable}

        self.rules: list[GhostRule] = []
        #: modules refused for good (label -> why): their parameters always go to the reference engine
        self.fallback_reasons: dict[str, str] = {}
        self.coupling: list[tuple[str, nn.Module]] = []
        claimed: set[int] = set()
        sharded: list[tuple[str, set[int]]] = []  # FSDP-managed modules only the generic rule could handle
        seq_first = {
            id(c)
            for m in module.modules()
            if isinstance(m, _SEQ_FIRST_PARENTS) and not m.self_attn.batch_first
            for c in m.children()
        }
        for name, sub in module.named_modules():
            label = f"{name or '<root>'!r} ({type(sub).__name__})"
            if couples_samples(sub) is not None:
                self.coupling.append((label, sub))
            if id(sub) in claimed:
                continue
            rule_cls = rule_for(sub)
            if rule_cls is not None:
                claimed.update(id(m) for c in rule_cls.claimed_children(sub) for m in c.modules())
                if not _rule_applies(rule_cls, sub):  # a configuration its rule does not model: generic rule
                    rule_cls = None
            own = rule_cls.own_parameters(sub) if rule_cls is not None else list(sub.parameters(recurse=False))
            if not any(id(p) in counted for p in own):
                continue
            if rule_cls is None and any(is_fsdp_managed(p) for p in own):
                sharded.append((label, {id(p) for p in own if id(p) in counted}))
            self.rules.append((rule_cls or FunctionalRule)(self, name, sub, 1 if id(sub) in seq_first else 0))
        self._labels = {id(r): f"module {r.name or '<root>'!r} ({type(r.module).__name__})" for r in self.rules}
        owners: dict[int, list[str]] = {}
        for rule in self.rules:
            for p in rule.own_parameters(rule.module):
                if id(p) in counted:
                    owners.setdefault(id(p), []).append(rule.name)
        #: parameters used by several modules (tied weights): their Gram adds the cross terms between uses
        self._shared = {i for i, names in owners.items() if len(names) > 1}
        self._fallback_ids: set[int] = set()
        self._ghost_ids = counted
        self._counted = counted
        self._refused: set[int] = set()  # this step: parameters of modules that failed a check
        self._warned: set[str] = set()
        for label, ids in sharded:
            why = (
                "FSDP shards its parameters and the generic torch.func rule needs them whole (register a rule for "
                "its type with grain_lightning.ghost.register_rule, or train it under grain_ddp)"
            )
            if unsupported == "raise":
                raise UnsupportedModuleError(f"module {label}: {why}")
            self._refuse_for_good(f"module {label}", why, ids)
        if unsupported == "raise":
            self._check_coupling()
        self._anchor: Optional[torch.Tensor] = None
        self._batch_size: Optional[int] = None
        self._batch_given = False
        self._low_precision: Optional[torch.dtype] = None  # the autocast dtype of the captured forward
        self._listening = False
        self._captured = False
        self._terms: list[Term] = []
        self._param_grams: dict[int, torch.Tensor] = {}
        self._reached: set[int] = set()
        self._state: Optional[tuple] = None
        self._second: Optional[tuple] = None
        self._on_ready: Optional[Callable[[GhostRule], None]] = None
        #: the last self-check's report (``None`` until one ran)
        self.last_self_check: Optional[SelfCheckReport] = None
        self._last_refused: list[str] = []

    def _coupled(self) -> list[str]:
        return [label for label, m in self.coupling if couples_samples(m)]

    def _check_coupling(self) -> None:
        coupled = self._coupled()
        if coupled:
            raise UnsupportedModuleError(
                f"module {coupled[0]} couples the samples of a batch (batch statistics, or gradients scaled by "
                "batch-wide frequencies): "
                "per-sample output gradients are not per-sample gradients; use eval mode for it, "
                "unsupported='fallback' or the reference engine"
            )

    @property
    def unsupported_modules(self) -> list[str]:
        """Modules whose parameters go to the reference engine (refused for good, or coupling samples now)."""
        return list(self.fallback_reasons) + [c for c in self._coupled() if c not in self.fallback_reasons]

    @property
    def fully_supported(self) -> bool:
        """Whether every counted parameter is handled by the one-backward rules (no fallback, no coupling)."""
        return not self._fallback_ids and not self._coupled()

    def call_signature(self) -> tuple:
        """The input shapes of every recorded call of the captured forward, per module: the self-check's
        ``"first"`` schedule checks every new signature once (a dimension that equals the batch size by
        chance, as T5's ``(S, S)`` relative positions when ``S == n``, shows up as a new signature)."""
        return tuple((i, tuple(c.shape for c in r.calls)) for i, r in enumerate(self.rules) if r.calls)

    def blocks(self) -> list[tuple[str, list[int]]]:
        """The blocks of :meth:`blockwise_backward`, for a strategy that solves them itself (``grain_fsdp``): per
        module with a rule, its label and the keys (:meth:`key`: the sharded parameter's ``id`` under FSDP2) of its
        one-backward parameters. Parameters sent to the reference engine for good form one last block
        ``"<fallback>"``. Raises ``UnsupportedModuleError`` for a parameter shared by several modules (tied
        weights), which :meth:`blockwise_backward` cannot split into blocks either."""
        self._alias = sharded_keys(self._module)
        out: list[tuple[str, list[int]]] = []
        for rule in self.rules:
            keys = [
                k for k in dict.fromkeys(self.key(p) for p in rule.own_parameters(rule.module)) if k in self._ghost_ids
            ]
            if keys and set(keys) & self._shared:
                raise UnsupportedModuleError(
                    f"{self._labels[id(rule)]}: block-wise mode cannot split a parameter shared with another module "
                    "(tied weights) into blocks"
                )
            if keys:
                out.append((self._labels[id(rule)], keys))
        fallback = [id(p) for p in self.params if id(p) in self._fallback_ids]
        if fallback:
            out.append(("<fallback>", fallback))
        return out

    @property
    def refused_last_step(self) -> list[str]:
        """Names of the parameters the last backward sent to the reference engine (for any reason)."""
        return list(self._last_refused)

    def _refuse_for_good(self, label: str, reason: str, ids: set[int]) -> None:
        self.fallback_reasons[label] = reason
        self._fallback_ids |= ids
        self._ghost_ids = self._counted - self._fallback_ids

    # ------------------------------------------------------------------ capture
    def capture(self, batch_size: Optional[int] = None) -> Capture:
        """Context manager recording each layer's input and tapping its output during the forward pass.

        Args:
            batch_size: the number of samples of the forward (default: the batch dim of the first recorded
                call). Embedding calls with ids of batch one are expanded to it (position ids),
                and the losses must have this length.
        """
        if batch_size is not None and (
            isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
        ):
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        return Capture(self, batch_size)

    def observe_batch(self, x: torch.Tensor, batch_dim: int) -> None:
        """Learn the forward's batch size from the first call with more than one row (unless given)."""
        if self._batch_size is None and x.ndim > batch_dim and x.shape[batch_dim] > 1:
            self._batch_size = int(x.shape[batch_dim])

    def broadcast(self, x: torch.Tensor, output: torch.Tensor, batch_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Expand a call with a batch of one to the forward's batch size (see :class:`RuleHost`)."""
        n = self._batch_size
        if n is None or n == 1 or x.ndim <= batch_dim or output.ndim <= batch_dim:
            return x, output
        if x.shape[batch_dim] == 1 and output.shape[batch_dim] == 1:
            grow = lambda t: t.expand(*t.shape[:batch_dim], n, *t.shape[batch_dim + 1 :])  # noqa: E731
            return grow(x), grow(output)
        return x, output

    @property
    def captured(self) -> bool:
        """Whether a forward has been captured and not yet consumed by a backward."""
        return self._captured

    def key(self, p: torch.Tensor) -> int:
        """``id`` of the parameter ``p`` stands for: under FSDP2 an unsharded parameter (what a module sees while
        it runs) stands for its sharded one (what the optimizer holds), see :mod:`~grain_lightning.ghost.fsdp`."""
        return self._alias.get(id(p), id(p))

    def counts(self, p: torch.Tensor) -> bool:
        """Whether ``p``'s gradient comes from the rules' terms this step (not the reference engine)."""
        pid = self.key(p)
        return pid in self._ghost_ids and pid not in self._refused

    @property
    def anchor(self) -> Optional[torch.Tensor]:
        """The scalar every tap hangs on: the one backward is taken with respect to it."""
        return self._anchor

    def receive(self, rule: GhostRule, call: RecordedCall, grad: torch.Tensor) -> None:
        """A tap's backward: store a call's output gradient; hand a complete rule to the current consumer."""
        if not self._listening:  # a fallback backward passing through the taps
            return
        call.grad = grad.detach()
        if self._on_ready is not None and rule.ready():
            self._on_ready(rule)

    # ------------------------------------------------------------------ backward
    def _begin(self, losses: torch.Tensor, assignment: GroupAssignment, *, retain: bool = False, split: bool = False):
        """Validate the losses, check every recorded call, and run the reference engine for refused parameters.

        ``retain``: keep the graph after the reference engine even when samples are coupled (self-check).
        ``split``: block-wise mode, where a parameter shared by several modules cannot be split into blocks.
        """
        if not self._captured:
            raise RuntimeError("no captured forward: compute the losses inside `with engine.capture():`")
        self._alias = sharded_keys(self._module)  # FSDP2 creates its unsharded parameters at the first forward
        try:
            n = check_losses(losses, self._batch_size if self._batch_given else None)
            seen = {c.batch[0] for r in self.rules for c in r.calls}
            if seen and n not in seen:
                raise ValueError(
                    f"expected one loss per sample: the recorded layers saw batches of {sorted(seen)} samples, "
                    f"got losses of shape {tuple(losses.shape)}"
                )
            if assignment.index.shape != losses.shape:
                raise ValueError(
                    f"assignment of {assignment.index.shape[0]} samples for losses of shape {tuple(losses.shape)}"
                )
        except ValueError:
            self._reset()
            raise
        k = assignment.num_groups
        index = assignment.index.to(losses.device)
        onehot = torch.zeros(
            n, k, dtype=torch.float64 if losses.dtype == torch.float64 else torch.float32, device=losses.device
        )
        onehot[torch.arange(n, device=losses.device), index] = 1.0
        coupled = self._coupled()
        if coupled and self.unsupported == "raise":
            self._reset()
            self._check_coupling()
        self._refused = set()
        if not coupled:
            problems = self._check_calls(n, split)
            walk, unreadable = self._uses_outside_layers(losses)
            if unreadable is not None:
                self._reset()
                raise UnsupportedModuleError(f"the model's autograd graph: {unreadable}")
            if walk:
                names = sorted(self._names.get(i, "?") for i in walk)
                problems[f"parameters {names}"] = (
                    "they reach the losses outside their module's recorded forward (used functionally, or their "
                    "module was not called inside capture())",
                    walk,
                )
            for label, (reason, ids) in problems.items():
                if self.unsupported == "raise":
                    self._reset()
                    raise UnsupportedModuleError(
                        f"{label}: {reason}; use unsupported='fallback' (reference engine for its parameters) "
                        "or the reference engine"
                    )
                if label + reason not in self._warned:
                    self._warned.add(label + reason)
                    warnings.warn(
                        f"GRAIN one-backward engine: {label}: {reason}; its parameters use the reference "
                        "engine (exact, one backward per group)",
                        RuntimeWarning,
                        stacklevel=3,
                    )
                self._refused |= ids
        fb_ids = {id(p) for p in self.params} if coupled else self._fallback_ids | self._refused
        fb_params = [p for p in self.params if id(p) in fb_ids]
        self._last_refused = [self._names.get(id(p), "?") for p in fb_params]
        fallback = None
        if fb_params:
            try:
                fallback = group_gradients(
                    assignment.group_means(losses), fb_params, retain_graph=not coupled or retain
                )
            except BaseException:
                self._reset()
                raise
        return n, k, index, onehot, fb_params, fallback, coupled

    def _check_calls(self, n: int, split: bool) -> dict[str, tuple[str, set[int]]]:
        """Every recorded call of every rule against the ``n`` samples: ``{module label: (why, parameter ids)}``."""
        problems: dict[str, tuple[str, set[int]]] = {}
        for rule in self.rules:
            ids = {self.key(p) for p in rule.own_parameters(rule.module)} & self._ghost_ids
            if not ids:
                continue
            if split and ids & self._shared:
                problems[self._labels[id(rule)]] = (
                    "block-wise mode cannot split a parameter shared with another module (tied weights) into blocks",
                    ids,
                )
                continue
            for call in rule.calls:
                reason = rule.check_call(call, n)
                if reason is not None:
                    if getattr(
                        rule, "couples", False
                    ):  # its backward mixes samples: no output gradient below is per-sample
                        reason += "; every parameter uses the reference engine"
                        ids = set(self._ghost_ids)
                    problems[self._labels[id(rule)]] = (reason, ids)
                    break
        # a shared parameter refused in one of its modules is refused in all of them
        refused = set().union(*(ids for _, ids in problems.values())) if problems else set()
        for rule in self.rules:
            own = {self.key(p) for p in rule.own_parameters(rule.module)} & self._ghost_ids
            label = self._labels[id(rule)]
            if own & refused & self._shared and label not in problems:
                problems[label] = ("it shares a parameter with a refused module", own & refused)
        return problems

    def _uses_outside_layers(self, losses: torch.Tensor) -> tuple[set[int], Optional[str]]:
        """Ids of one-backward parameters whose gradient does not flow only through their own rule's taps,
        and why the graph cannot be read at all (``None``: it can).

        Walks the autograd graph from the losses, remembering the last tap passed and leaving it again at
        that call's inputs; reaching a parameter's ``AccumulateGrad`` with no tap, or under another module's
        tap, means a use the rules do not see (e.g. a weight also used to compute its own module's input).
        Reentrant activation checkpointing hides its region from the graph (and from the hooks): refused.
        """
        owned = {id(r): r.owns() for r in self.rules}
        inputs = {id(r): {fn for c in r.calls for fn in c.input_fns} for r in self.rules}
        bad: set[int] = set()
        seen: set = set()
        stack: list = [(losses.grad_fn, None)]
        while stack:
            node, rule = stack.pop()
            if node is None or (node, rule) in seen:
                continue
            seen.add((node, rule))
            if type(node).__name__ == "CheckpointFunctionBackward":
                return bad, (
                    "reentrant activation checkpointing (torch.utils.checkpoint with use_reentrant=True) hides the "
                    "layers it wraps from the engine; use use_reentrant=False (Hugging Face: "
                    "gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False}))"
                )
            if rule is not None and node in inputs[id(rule)]:
                rule = None  # the module's input: whatever computed it is outside the module
            var = getattr(node, "variable", None)
            if var is not None:
                vid = self.key(var)
                if vid in self._ghost_ids and (rule is None or vid not in owned[id(rule)]):
                    bad.add(vid)
                continue
            rule = getattr(node, "ghost_rule", rule)
            stack.extend((fn, rule) for fn, _ in node.next_functions if fn is not None)
        return bad, None

    def _run_backward(self, losses, assignment, index, coupled, retain: bool = False) -> None:
        if coupled or not any(rule.calls for rule in self.rules):
            return
        scale = 1.0 / assignment.counts.to(device=losses.device, dtype=losses.dtype)[index]
        self._listening = True
        try:
            assert self._anchor is not None  # set by capture()
            torch.autograd.grad((losses * scale).sum(), [self._anchor], allow_unused=True, retain_graph=retain)
        finally:
            self._listening = False

    def _rule_terms(self, rule: GhostRule, n: int, k: int) -> list[Term]:
        if not rule.calls or not rule.ready():
            rule.calls = [c for c in rule.calls if c.grad is not None]
        terms = rule.terms(n, k) if rule.calls else []
        for call in rule.calls:  # the taps in the graph still reference their calls: let go of the tensors
            call.inputs = call.grad = call.source = call.info = None
        rule.calls = []
        self._reached.update(self.key(t.param) for t in terms)
        return terms

    def backward(
        self, losses: torch.Tensor, assignment: GroupAssignment, *, self_check: bool = False
    ) -> GhostGradients:
        """One backward of ``sum_i l_i / n_{group(i)}``: the ``(k, k)`` float64 group Gram.

        Each layer's Gram term is computed as soon as its output gradients arrive; the combined gradient
        is written by :meth:`write_gradients` (or returned by ``GhostGradients.combine``). With
        ``self_check=True`` the result is compared with autograd (:mod:`~grain_lightning.ghost.self_check`):
        one more backward; a mismatch raises :class:`~grain_lightning.ghost.self_check.SelfCheckError`
        naming the parameters (``unsupported="raise"``) or sends them to the reference engine for good.
        """
        second = self.combine == "backward"
        n, k, index, onehot, fb_params, fallback, coupled = self._begin(losses, assignment, retain=self_check)
        second = second and not coupled
        check = self_check and not coupled
        gram = torch.zeros(k, k, dtype=torch.float64)
        terms: list[Term] = []
        by_param: dict[int, list[Term]] = {}  # terms of shared parameters, for the cross terms between uses
        param_grams: dict[int, torch.Tensor] = {}
        self._reached = set()

        def on_ready(rule: GhostRule) -> None:
            nonlocal gram
            for term in self._rule_terms(rule, n, k):
                pid = self.key(term.param)
                shared = pid in self._shared
                if second and isinstance(term, MatrixTerm) and not shared:
                    term.store = False
                part = term.gram(onehot).cpu()
                for other in by_param.get(pid, []):
                    if term.overlaps(other):
                        cross = term.cross(other, onehot).cpu()
                        part = part + cross + cross.T
                if shared:
                    by_param.setdefault(pid, []).append(term)
                gram += part
                param_grams[pid] = part if pid not in param_grams else param_grams[pid] + part
                if not second or check:
                    terms.append(term)

        self._on_ready = on_ready
        try:
            self._run_backward(losses, assignment, index, coupled, retain=second or check)
            if not coupled:
                for rule in self.rules:  # layers whose outputs got no gradient, or partly
                    if rule.calls:
                        on_ready(rule)
        finally:
            self._on_ready = None
            self._reset()
        if fallback is not None:
            gram += fallback.gram()
        self._param_grams = param_grams
        if check:
            bad = self._self_check(losses, assignment, terms, param_grams, lambda u: None if second else u)
            if bad:
                gram, terms, fb_params, fallback = self._move_to_reference(
                    bad, losses, assignment, gram, terms, fb_params, fallback, retain=second
                )
            if second:
                terms = []
        self._terms = [] if coupled else terms
        self._state = (assignment, onehot, fb_params, fallback)
        self._second = (losses, self._reached) if second else None
        return GhostGradients(self, gram, k)

    def _self_check(self, losses, assignment, terms, param_grams, engine_side) -> dict[int, str]:
        """Compare the rules' combined gradient and Gram blocks with autograd on random group weights."""
        k = assignment.num_groups
        u = random_weights(k)
        index = assignment.index.to(losses.device)
        scale = (u.to(losses.device)[index] / assignment.counts.to(losses.device)[index]).to(losses.dtype)
        checked = [p for p in self.params if self.counts(p)]
        if not checked:
            return {}
        auto = torch.autograd.grad((losses * scale).sum(), checked, allow_unused=True, retain_graph=True)
        ws = u.to(losses.device)[index]
        mine = self._assemble(terms, ws, u.to(losses.device), None) if engine_side(u) is not None else None
        quad = [float(u @ param_grams[id(p)] @ u) if id(p) in param_grams else 0.0 for p in checked]
        engine_grads = (
            [mine.get(id(p), torch.zeros_like(p)) for p in checked] if mine is not None else [None] * len(checked)
        )
        low = self._low_precision  # under autocast, autograd's weight gradients are half-precision GEMM outputs
        report = compare(
            [self._names.get(id(p), "?") for p in checked],
            list(auto),
            engine_grads,
            quad,
            [low or p.dtype for p in checked],
        )
        self.last_self_check = report
        if report.ok:
            return {}
        if self.unsupported == "raise":
            raise SelfCheckError(
                "the one-backward engine's gradients differ from autograd's for parameters "
                + "; ".join(f"{name}: {why}" for name, why in report.mismatched.items())
                + " (use unsupported='fallback' to send them to the reference engine, or the reference engine)"
            )
        ids = {id(p): self._names.get(id(p), "?") for p in checked}
        return {i: report.mismatched[name] for i, name in ids.items() if name in report.mismatched}

    def _move_to_reference(self, bad, losses, assignment, gram, terms, fb_params, fallback, *, retain: bool):
        """Send parameters that failed the self-check to the reference engine, for this step and for good."""
        for pid, why in bad.items():
            label = f"parameter {self._names.get(pid, '?')!r}"
            warnings.warn(
                f"GRAIN self-check: {label}: {why}; it uses the reference engine from now on",
                RuntimeWarning,
                stacklevel=4,
            )
            self._refuse_for_good(label, f"failed the self-check ({why})", {pid})
            gram = gram - self._param_grams.pop(pid, torch.zeros_like(gram))
        if fallback is not None:
            gram = gram - fallback.gram()
        fb_params = [p for p in self.params if id(p) in {id(q) for q in fb_params} or id(p) in bad]
        fallback = group_gradients(assignment.group_means(losses), fb_params, retain_graph=retain)
        gram = gram + fallback.gram()
        terms = [t for t in terms if id(t.param) not in bad]
        self._reached -= set(bad)
        self._last_refused = [self._names.get(id(p), "?") for p in fb_params]
        return gram, terms, fb_params, fallback

    def _combine(self, weights: torch.Tensor) -> list[Optional[torch.Tensor]]:
        if self._state is None:
            raise RuntimeError("call backward() before combining gradients")
        assignment, onehot, fb_params, fallback = self._state
        k = assignment.num_groups
        if weights.shape != (k,):
            raise ValueError(f"expected ({k},) weights, got shape {tuple(weights.shape)}")
        wk = weights.to(device=onehot.device, dtype=torch.float64)
        ws = wk[assignment.index.to(onehot.device)]
        if self._second is not None:  # weighted second backward: autograd's own weight gradients
            losses, reached = self._second
            self._second = None
            scale = (
                ws.to(losses.dtype)
                / assignment.counts.to(device=losses.device, dtype=losses.dtype)[assignment.index.to(losses.device)]
            )
            wanted = [p for p in self.params if id(p) in reached]
            grads = torch.autograd.grad((losses * scale).sum(), wanted, allow_unused=True) if wanted else []
            out = {id(p): g for p, g in zip(wanted, grads) if g is not None}
        else:
            out = self._assemble(self._terms, ws, wk, onehot)
        result: list[Optional[torch.Tensor]] = []
        fb = dict(zip(map(id, fb_params), fallback.combine(weights))) if fallback is not None else {}
        for p in self.params:
            if id(p) in fb:
                result.append(fb[id(p)])
            elif id(p) in self._reached and out.get(id(p)) is not None:
                result.append(out[id(p)].to(p.dtype))
            else:
                result.append(None)
        return result

    @staticmethod
    def _assemble(terms: list[Term], ws, wk, onehot) -> dict[int, torch.Tensor]:
        """``sum_j w_j g_j`` per parameter id, adding up the terms (slices) of each parameter."""
        out: dict[int, torch.Tensor] = {}
        for term in terms:
            part = term.combine(ws, wk)
            grad = out.get(id(term.param))
            if grad is None and term.where is None:
                out[id(term.param)] = part.reshape(term.param.shape)
                continue
            if grad is None:
                grad = out[id(term.param)] = torch.zeros(term.param.shape, dtype=part.dtype, device=part.device)
            term.slot(grad).add_(part.reshape(term.slot(grad).shape))
        return out

    def weighted_loss(self, weights: torch.Tensor) -> torch.Tensor:
        """``sum_i w_{group(i)} l_i / n_{group(i)}`` of the last :meth:`backward` (``combine="backward"``): its
        backward gives ``sum_j w_j g_j`` through whatever the model's backward does (FSDP2 reduces it to shards).

        Consumes the graph kept by :meth:`backward`; needs every parameter handled by the rules (no fallback).
        """
        if self._state is None or self._second is None:
            raise RuntimeError("weighted_loss needs a backward() with combine='backward' before it")
        assignment, _, fb_params, _ = self._state
        if fb_params:
            raise RuntimeError(
                f"weighted_loss: parameters {self._last_refused} use the reference engine, whose group gradients "
                "are not in the weighted loss's backward"
            )
        k = assignment.num_groups
        if weights.shape != (k,):
            raise ValueError(f"expected ({k},) weights, got shape {tuple(weights.shape)}")
        losses, _ = self._second
        self._second = None
        index = assignment.index.to(losses.device)
        counts = assignment.counts.to(device=losses.device, dtype=losses.dtype)
        return (losses * (weights.to(device=losses.device, dtype=losses.dtype)[index] / counts[index])).sum()

    def write_gradients(self, weights: torch.Tensor) -> None:
        """Set ``p.grad = sum_j w_j g_j`` for every counted parameter (``None`` where no group reached it)."""
        for p, g in zip(self.params, self._combine(weights)):
            p.grad = g
        self.release()

    def release(self) -> None:
        """Drop the activations (or the graph) kept for the combined gradient."""
        self._terms, self._state, self._second = [], None, None

    def discard(self) -> None:
        """Drop a recorded forward that will not be differentiated by this engine (and anything kept)."""
        self.release()
        self._reset()

    def group_gradients(
        self, losses: torch.Tensor, assignment: GroupAssignment, *, self_check: bool = False
    ) -> GroupGradients:
        """The ``(k, *p.shape)`` group gradients of every counted parameter, from one backward.

        Same result as the reference :func:`~grain_lightning.reference.group_gradients` of
        ``assignment.group_means(losses)`` (used for gradient accumulation across micro-batches, where the
        Gram needs gradients of groups from different micro-batches). ``self_check``: as in :meth:`backward`.
        """
        n, k, index, onehot, fb_params, fallback, coupled = self._begin(losses, assignment, retain=self_check)
        check = self_check and not coupled
        self._reached = set()
        try:
            self._run_backward(losses, assignment, index, coupled, retain=check)
            terms = [] if coupled else [t for r in self.rules for t in self._rule_terms(r, n, k)]
        finally:
            self._reset()
        grads = {id(p): torch.zeros((k, *p.shape), dtype=p.dtype, device=p.device) for p in self.params}
        for term in terms:  # several terms of one parameter (slices, or the uses of a tied weight) add up
            full = grads[id(term.param)]
            g = term.group_grads(onehot)
            for j in range(k):
                term.slot(full[j]).add_(g[j].reshape(term.slot(full[j]).shape))
        if check:
            grams = {id(p): torch.zeros(k, k, dtype=torch.float64) for p in self.params if id(p) in self._reached}
            for pid in grams:
                flat = grads[pid].reshape(k, -1).double()
                grams[pid] = (flat @ flat.T).cpu()
            self._param_grams = grams
            bad = self._self_check(losses, assignment, terms, grams, lambda w: w)
            if bad:
                unused = torch.zeros(k, k, dtype=torch.float64)
                _, _, fb_params, fallback = self._move_to_reference(
                    bad, losses, assignment, unused, terms, fb_params, fallback, retain=False
                )
        fb = dict(zip(map(id, fb_params), zip(fallback.grads, fallback.reached))) if fallback is not None else {}
        out, reached = [], []
        for p in self.params:
            if id(p) in fb:
                out.append(fb[id(p)][0])
                reached.append(fb[id(p)][1])
            else:
                out.append(grads[id(p)])
                reached.append(id(p) in self._reached)
        return GroupGradients(out, reached)

    def blockwise_backward(
        self,
        losses: torch.Tensor,
        assignment: GroupAssignment,
        *,
        tol: float = 1e-12,
        policy: Optional[StepPolicy] = None,
    ) -> BlockwiseResult:
        r"""Block-wise GRAIN: a separate min-norm solve per module (block), written into ``.grad``.

        Block ``b`` gets ``d_b = sum_j w^b_j g^b_j`` with ``w^b = argmin_{w in simplex} w^T G_b w``. Since
        ``<d_b, g^b_j> >= ||d_b||^2`` for every block, ``<d, g_j> = sum_b <d_b, g^b_j> >= ||d||^2 >= 0`` for
        every group ``j``, as in the global solve; but ``||d||`` is at most the global min-norm step's (each
        block takes its own minimum), and ``d`` is no longer one convex combination of the ``g_j``. Each
        layer is solved and written as soon as its output gradients arrive and its activations are then
        dropped: no group gradients or Grams are kept across layers. Fallback parameters form one block.
        Each block's weights come from ``policy.solve``; ``tol`` is only used when no ``policy`` is given.
        """
        policy = policy if policy is not None else StepPolicy(PolicyOptions(solver_tol=tol))
        n, k, index, onehot, fb_params, fallback, coupled = self._begin(losses, assignment, split=True)
        solves: dict[str, MinNormResult] = {}
        grams: dict[str, torch.Tensor] = {}

        def on_ready(rule: GhostRule) -> None:
            terms = self._rule_terms(rule, n, k)
            if not terms:
                return
            gram = torch.stack([t.gram(onehot).cpu() for t in terms]).sum(0)
            solve = policy.solve(gram)
            wk = solve.weights.to(device=onehot.device, dtype=torch.float64)
            ws = wk[index]
            grads = self._assemble(terms, ws, wk, onehot)
            for p in rule.params:
                if id(p) in grads:
                    p.grad = grads[id(p)].to(p.dtype)
            solves[rule.name], grams[rule.name] = solve, gram

        self._on_ready = on_ready
        self._reached = set()
        try:
            self._run_backward(losses, assignment, index, coupled)
            if not coupled:
                for rule in self.rules:
                    if rule.calls:
                        on_ready(rule)
        finally:
            self._on_ready = None
            self._reset()
        for p in self.params:
            if id(p) not in self._reached and id(p) not in {id(q) for q in fb_params}:
                p.grad = None
        if fallback is not None:
            gram = fallback.gram()
            solve = policy.solve(gram)
            for p, d in zip(fb_params, fallback.combine(solve.weights)):
                p.grad = d
            solves["<fallback>"], grams["<fallback>"] = solve, gram
        return BlockwiseResult(solves, grams)

    def _reset(self) -> None:
        for rule in self.rules:
            for call in rule.calls:
                call.inputs = call.grad = call.source = call.info = None
            rule.calls = []
        self._listening = False
        self._captured = False
        self._anchor = None


class Capture:
    """What :meth:`GhostEngine.capture` returns: installs the rules' hooks for one forward."""

    def __init__(self, engine: GhostEngine, batch_size: Optional[int] = None) -> None:
        self.engine, self.batch_size = engine, batch_size
        self.handles: list = []

    def __enter__(self) -> GhostEngine:
        eng = self.engine
        eng._reset()
        eng.release()
        eng._batch_size, eng._batch_given = self.batch_size, self.batch_size is not None
        eng._low_precision = next(
            (torch.get_autocast_dtype(d) for d in ("cpu", "cuda") if torch.is_autocast_enabled(d)), None
        )
        eng._anchor = torch.zeros((), requires_grad=True)
        self.handles = [h for rule in eng.rules for h in rule.attach()]
        return eng

    def __exit__(self, *exc: Any) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        for rule in self.engine.rules:
            rule.detach()
        if exc[0] is not None:  # a failed forward: let go of what was recorded
            self.engine._reset()
        self.engine._captured = exc[0] is None
