r"""The interface between :class:`~grain_lightning.GrainMixin` and a distributed GRAIN strategy.

At the end of each accumulation cycle with ``world_size > 1``, the mixin builds a :class:`MixinCycle`
(what this rank has) and calls the strategy's one method, :meth:`GrainStrategy.combine_mixin_cycle`; the
strategy combines the ranks and returns whether ``.grad`` now holds the step's gradient. The mixin then
clips and steps (or skips) itself. Neither side reads the other's private members.

Two ways to combine. The mixin picks one from the strategy's ``needs_group_gradients`` (and its own
``aggregation``), and the strategy dispatches on ``cycle.policy`` (set on every rank alike, even on a rank whose
cycle is invalid, so that all ranks enter the same collectives):

- ``cycle.policy is None`` (hierarchical): ``.grad`` already holds this rank's own direction (its GRAIN step,
  or its mean gradient with ``aggregation="mean"``); the strategy combines one vector per rank.
- ``cycle.policy`` set (global): the cycle carries this rank's ``k_r`` group gradients and mean weights (``None``
  when invalid), and the module's step policy (its solver and collapse options) decides over every group of
  every rank.

A strategy whose ranks' gradients are combined *inside* a backward pass (``grain_fsdp``: FSDP reduces each
parameter group's gradient to shards as its backward finishes, so no full ``.grad`` is ever written) sets
``combines_in_backward``: the mixin then writes no ``.grad`` itself but hands over ``cycle.loss``, the loss whose
backward gives this rank's direction (``sum_j w_j L_j`` for its GRAIN weights), and the strategy runs that
backward and the combination. Every rank hands one over, even an invalid or skipping one, so that every rank
runs the same collectives. Where the one-backward engine's weighted loss does not give the step exactly (global
groups, the reference engine, accumulation over micro-batches, a self-checked step, one problem per module with
``GrainConfig(blockwise=True)``: ``cycle.blocks``), the mixin instead hands over
each micro-batch's group losses to the strategy's ``exchange_group_losses(losses, check_gram=None)`` (one backward
per group, each group's gradient reduced to shards) and ends the cycle with ``cycle.groups_exchanged`` set: the
strategy then combines those groups, globally or hierarchically, deciding with ``cycle.policy`` (the module's).

A module that runs GRAIN itself is a :class:`GrainModule`; a GRAIN strategy must not synchronise that module's
backward passes (its cycle is combined once, at the end).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Protocol, runtime_checkable

from torch import Tensor

if TYPE_CHECKING:
    from grain_lightning.policy import StepPolicy
    from grain_lightning.reference import GroupGradients

__all__ = ["RAISED_ON_EVERY_RANK", "GrainModule", "GrainStrategy", "MixinCycle", "raised_on_every_rank"]

#: Attribute set (to ``True``) on an exception that every rank raises alike at the same point (a refused
#: configuration): a strategy's fault handling (:mod:`grain_lightning.distributed.faults`, which reads the same
#: name) then does not post it to the other ranks as one rank's failure.
RAISED_ON_EVERY_RANK = "_grain_raised_on_every_rank"


def raised_on_every_rank(exc: BaseException) -> BaseException:
    """Mark ``exc`` as raised by every rank alike (see :data:`RAISED_ON_EVERY_RANK`); returns it."""
    setattr(exc, RAISED_ON_EVERY_RANK, True)
    return exc


@dataclass
class MixinCycle:
    """What one rank's :class:`~grain_lightning.GrainMixin` has at the end of an accumulation cycle.

    Attributes:
        params: the trainable parameters the optimizers step (the same on every rank).
        invalid: this rank has no valid gradient (a non-finite loss or gradient in the cycle).
        vote_skip: hierarchical: this rank's own policy chose to skip (collapse with ``on_collapse="skip"``).
        group_gradients: global: this rank's ``k_r`` group gradients (``None`` when ``invalid``).
        mean_weights: global: ``(k_r,)`` plain-mean weights of those groups (summing to 1 on this rank).
        policy: global: the module's step policy (its collapse options decide for every group).
        loss: ``combines_in_backward`` strategies: the loss whose backward gives this rank's direction.
        groups_exchanged: ``combines_in_backward`` strategies: this cycle's groups went through the strategy's
            ``exchange_group_losses``; ``mean_weights``, ``policy`` and ``keys`` describe them.
        keys: ``(k_r, 2)`` group keys ``[micro-batch, key]`` (``-1``: unknown) for the policy's warm start.
        blocks: with ``groups_exchanged`` and ``GrainConfig(blockwise=True)``: the parameters of each block (one
            per module, as the one-backward engine's block-wise mode); one min-norm problem per block.
    """

    params: list[Tensor]
    invalid: bool = False
    vote_skip: bool = False
    group_gradients: Optional[GroupGradients] = None
    mean_weights: Optional[Tensor] = None
    policy: Optional[StepPolicy] = None
    loss: Optional[Tensor] = None
    groups_exchanged: bool = False
    keys: Optional[Tensor] = None
    blocks: Optional[list[list[Tensor]]] = None


@runtime_checkable
class GrainModule(Protocol):
    """A LightningModule that runs GRAIN itself (:class:`~grain_lightning.GrainMixin`)."""

    grain_policy: StepPolicy

    def grain_step(self, losses: Tensor, batch: Any = None, groups: Optional[Tensor] = None) -> Tensor:
        """One micro-batch of per-sample losses; steps at the end of an accumulation cycle."""
        ...


@runtime_checkable
class GrainStrategy(Protocol):
    """A Lightning strategy that combines the ranks of a :class:`~grain_lightning.GrainMixin` module."""

    @property
    def needs_group_gradients(self) -> bool:
        """Whether :meth:`combine_mixin_cycle` needs the group gradients (global groups)."""
        ...

    @property
    def combines_in_backward(self) -> bool:
        """Whether the ranks are combined inside the backward of ``cycle.loss`` (``.grad`` is not written first)."""
        ...

    def combine_mixin_cycle(self, cycle: MixinCycle) -> bool:
        """Combine the ranks' cycles into ``.grad`` of ``cycle.params``; ``False``: every rank skips the step."""
        ...
