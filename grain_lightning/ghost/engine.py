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

What it cannot do exactly is never computed silently: ``BatchNorm`` in training mode couples samples (the
per-sample output gradients are then not per-sample gradients), parameters shared by several modules
(tied weights), ``Conv`` with ``groups > 1`` or non-zero padding modes, attention ``bias_k``/``bias_v``, and
modules of unknown type that own parameters; and, checked at every step by walking the autograd graph,
a parameter that reaches the losses other than through its own module's recorded calls. With
``unsupported="raise"`` the engine raises
:class:`UnsupportedModuleError` naming the module; with ``"fallback"`` those parameters get exact per-group
gradients from the reference engine (one extra backward per group, through the same graph) and join the
Gram, and a sample-coupling module sends *every* parameter to the reference engine.

Precision: per-term products in float32 (float64 for float64 models; bf16/fp16 activations are upcast, and
under autocast the layer input is rounded to the autocast dtype as the layer itself sees it), the Gram
summed over terms in float64.

Block-wise mode (:meth:`GhostEngine.blockwise_backward`): one min-norm solve per module, done as soon as
that module's output gradients arrive.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from grain_lightning.config import PolicyOptions
from grain_lightning.ghost.registry import couples_samples, rule_for, supported_types
from grain_lightning.ghost.rules.base import GhostRule, RecordedCall, UnsupportedModuleError
from grain_lightning.ghost.terms import MatrixTerm, Term
from grain_lightning.groups import GroupAssignment
from grain_lightning.policy import StepPolicy
from grain_lightning.reference import GroupGradients, group_gradients
from grain_lightning.solver import MinNormResult

__all__ = ["BlockwiseResult", "Capture", "GhostEngine", "GhostGradients"]

_SEQ_FIRST_PARENTS = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


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

    Every supported layer must see the batch in dim 0 of its input (dim 1 for the layers of a
    ``TransformerEncoderLayer``/``DecoderLayer`` with ``batch_first=False``; ``MultiheadAttention`` follows
    its ``batch_first``); the shapes are checked. Parameters must be used only by their module's forward.
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
        counted = {id(p) for p in trainable}

        owners: dict[int, list[str]] = {}
        for name, sub in module.named_modules(remove_duplicate=False):
            for p in sub.parameters(recurse=False):
                if id(p) in counted:
                    owners.setdefault(id(p), []).append(name)
        tied = {i for i, names in owners.items() if len(set(names)) > 1}

        self.rules: list[GhostRule] = []
        self.fallback_reasons: dict[str, str] = {}
        self.coupling: list[tuple[str, nn.Module]] = []
        fallback: set[int] = set()
        claimed: set[int] = set()
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
            own = rule_cls.own_parameters(sub) if rule_cls is not None else sub.parameters(recurse=False)
            mine = [p for p in own if id(p) in counted]
            if rule_cls is not None:
                claimed.update(id(m) for c in rule_cls.claimed_children(sub) for m in c.modules())
            if not mine:
                continue
            if rule_cls is None:
                reason: Optional[str] = (
                    "unsupported module type with trainable parameters (supported: "
                    f"{', '.join(supported_types())}; see grain_lightning.ghost.register_rule)"
                )
            else:
                reason = rule_cls.why_unsupported(sub)
            if reason is None and any(id(p) in tied for p in mine):
                shared = [owners[id(p)] for p in mine if id(p) in tied][0]
                reason = f"a parameter is shared by modules {shared} (tied weights)"
            if reason is not None or rule_cls is None:
                if unsupported == "raise":
                    raise UnsupportedModuleError(
                        f"module {label}: {reason}; use unsupported='fallback' (reference engine for these "
                        "parameters) or the reference engine"
                    )
                self.fallback_reasons[label] = str(reason)
                fallback.update(id(p) for p in mine)
                continue
            self.rules.append(rule_cls(self, name, sub, 1 if id(sub) in seq_first else 0))
        self._fallback_ids = fallback
        self._ghost_ids = counted - fallback
        self._outside: set[int] = set()  # this step: parameters used outside their recorded calls
        if unsupported == "raise":
            self._check_coupling()
        self._anchor: Optional[torch.Tensor] = None
        self._listening = False
        self._captured = False
        self._terms: list[Term] = []
        self._reached: set[int] = set()
        self._state: Optional[tuple] = None
        self._second: Optional[tuple] = None
        self._on_ready: Optional[Callable[[GhostRule], None]] = None

    def _coupled(self) -> list[str]:
        return [label for label, m in self.coupling if couples_samples(m)]

    def _check_coupling(self) -> None:
        coupled = self._coupled()
        if coupled:
            raise UnsupportedModuleError(
                f"module {coupled[0]} couples the samples of a batch (batch statistics in training mode): "
                "per-sample output gradients are not per-sample gradients; use eval mode for it, "
                "unsupported='fallback' or the reference engine"
            )

    @property
    def unsupported_modules(self) -> list[str]:
        """Modules whose parameters go to the reference engine (unsupported, tied, or coupling samples now)."""
        return list(self.fallback_reasons) + [c for c in self._coupled() if c not in self.fallback_reasons]

    @property
    def fully_supported(self) -> bool:
        """Whether every counted parameter is handled by the one-backward rules (no fallback, no coupling)."""
        return not self._fallback_ids and not self._coupled()

    # ------------------------------------------------------------------ capture
    def capture(self) -> Capture:
        """Context manager recording each layer's input and tapping its output during the forward pass."""
        return Capture(self)

    @property
    def captured(self) -> bool:
        """Whether a forward has been captured and not yet consumed by a backward."""
        return self._captured

    def counts(self, p: torch.Tensor) -> bool:
        """Whether ``p``'s gradient comes from the rules' terms this step (not the reference engine)."""
        return id(p) in self._ghost_ids and id(p) not in self._outside

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
    def _begin(self, losses: torch.Tensor, assignment: GroupAssignment):
        if losses.ndim != 1:
            raise ValueError(f"expected (n,) per-sample losses, got shape {tuple(losses.shape)}")
        if not self._captured:
            raise RuntimeError("no captured forward: compute the losses inside `with engine.capture():`")
        if assignment.index.shape != losses.shape:
            raise ValueError(f"assignment of {assignment.index.shape[0]} samples for {losses.shape[0]} losses")
        n, k = losses.shape[0], assignment.num_groups
        index = assignment.index.to(losses.device)
        onehot = torch.zeros(
            n, k, dtype=torch.float64 if losses.dtype == torch.float64 else torch.float32, device=losses.device
        )
        onehot[torch.arange(n, device=losses.device), index] = 1.0
        coupled = self._coupled()
        if coupled and self.unsupported == "raise":
            self._reset()
            self._check_coupling()
        self._outside = set() if coupled else self._uses_outside_layers(losses)
        if self._outside and self.unsupported == "raise":
            names = {id(p): n for n, p in self._named}
            bad = [names.get(i, "?") for i in self._outside]
            self._reset()
            raise UnsupportedModuleError(
                f"parameters {bad} reach the losses outside their module's recorded forward (used functionally, "
                "or their module was not called inside capture()); use unsupported='fallback' or the reference engine"
            )
        fb_ids = {id(p) for p in self.params} if coupled else self._fallback_ids | self._outside
        fb_params = [p for p in self.params if id(p) in fb_ids]
        fallback = None
        if fb_params:
            fallback = group_gradients(assignment.group_means(losses), fb_params, retain_graph=not coupled)
        return n, k, index, onehot, fb_params, fallback, coupled

    def _uses_outside_layers(self, losses: torch.Tensor) -> set[int]:
        """Ids of one-backward parameters whose gradient does not flow only through their own rule's taps.

        Walks the autograd graph from the losses, remembering the last tap passed; reaching a parameter's
        ``AccumulateGrad`` with no tap, or under another module's tap, means a use the rules do not see.
        """
        owned = {id(r): r.owns() for r in self.rules}
        bad: set[int] = set()
        seen: set = set()
        stack: list = [(losses.grad_fn, None)]
        while stack:
            node, rule = stack.pop()
            if node is None or (node, rule) in seen:
                continue
            seen.add((node, rule))
            var = getattr(node, "variable", None)
            if var is not None:
                if id(var) in self._ghost_ids and (rule is None or id(var) not in owned[id(rule)]):
                    bad.add(id(var))
                continue
            rule = getattr(node, "ghost_rule", rule)
            stack.extend((fn, rule) for fn, _ in node.next_functions if fn is not None)
        return bad

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
            call.inputs = call.grad = None
        rule.calls = []
        self._reached.update(id(t.param) for t in terms)
        return terms

    def backward(self, losses: torch.Tensor, assignment: GroupAssignment) -> GhostGradients:
        """One backward of ``sum_i l_i / n_{group(i)}``: the ``(k, k)`` float64 group Gram.

        Each layer's Gram term is computed as soon as its output gradients arrive; the combined gradient
        is written by :meth:`write_gradients` (or returned by ``GhostGradients.combine``).
        """
        n, k, index, onehot, fb_params, fallback, coupled = self._begin(losses, assignment)
        gram = torch.zeros(k, k, dtype=torch.float64)
        terms: list[Term] = []
        self._reached = set()

        second = self.combine == "backward" and not coupled

        def on_ready(rule: GhostRule) -> None:
            nonlocal gram
            for term in self._rule_terms(rule, n, k):
                if second and isinstance(term, MatrixTerm):
                    term.store = False
                gram += term.gram(onehot).cpu()
                if not second:
                    terms.append(term)

        self._on_ready = on_ready
        try:
            self._run_backward(losses, assignment, index, coupled, retain=second)
            if not coupled:
                for rule in self.rules:  # layers whose outputs got no gradient, or partly
                    if rule.calls:
                        on_ready(rule)
        finally:
            self._on_ready = None
            self._reset()
        if fallback is not None:
            gram += fallback.gram()
        self._terms = [] if coupled else terms
        self._state = (assignment, onehot, fb_params, fallback)
        self._second = (losses, self._reached) if second else None
        return GhostGradients(self, gram, k)

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

    def write_gradients(self, weights: torch.Tensor) -> None:
        """Set ``p.grad = sum_j w_j g_j`` for every counted parameter (``None`` where no group reached it)."""
        for p, g in zip(self.params, self._combine(weights)):
            p.grad = g
        self.release()

    def release(self) -> None:
        """Drop the activations (or the graph) kept for the combined gradient."""
        self._terms, self._state, self._second = [], None, None

    def group_gradients(self, losses: torch.Tensor, assignment: GroupAssignment) -> GroupGradients:
        """The ``(k, *p.shape)`` group gradients of every counted parameter, from one backward.

        Same result as the reference :func:`~grain_lightning.reference.group_gradients` of
        ``assignment.group_means(losses)`` (used for gradient accumulation across micro-batches, where the
        Gram needs gradients of groups from different micro-batches).
        """
        n, k, index, onehot, fb_params, fallback, coupled = self._begin(losses, assignment)
        self._reached = set()
        try:
            self._run_backward(losses, assignment, index, coupled)
            terms = [] if coupled else [t for r in self.rules for t in self._rule_terms(r, n, k)]
        finally:
            self._reset()
        grads = {id(p): torch.zeros((k, *p.shape), dtype=p.dtype, device=p.device) for p in self.params}
        for term in terms:
            full = grads[id(term.param)]
            g = term.group_grads(onehot)
            for j in range(k):
                term.slot(full[j]).copy_(g[j].reshape(term.slot(full[j]).shape))
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
        n, k, index, onehot, fb_params, fallback, coupled = self._begin(losses, assignment)
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
                call.inputs = call.grad = None
            rule.calls = []
        self._listening = False
        self._captured = False
        self._anchor = None


class Capture:
    def __init__(self, engine: GhostEngine) -> None:
        self.engine = engine
        self.handles: list = []

    def __enter__(self) -> GhostEngine:
        eng = self.engine
        eng._reset()
        eng.release()
        eng._anchor = torch.zeros((), requires_grad=True)
        self.handles = [h for rule in eng.rules for h in rule.attach()]
        return eng

    def __exit__(self, *exc: Any) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        for rule in self.engine.rules:
            rule.detach()
        self.engine._captured = exc[0] is None
