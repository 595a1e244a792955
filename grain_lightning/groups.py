r"""How a batch of ``n`` samples splits into ``k`` groups.

A grouping maps the batch to a :class:`GroupAssignment`: ``index`` (``(n,)`` long, group of each sample,
values ``0..k-1``), the key of each group, and the number of samples in it. Group ``j``'s loss is the mean
of its samples' losses, ``L_j = (1 / n_j) sum_{i: index_i = j} l_i``, and its gradient ``g_j = grad L_j``.
The plain mean gradient of the batch is ``sum_j (n_j / n) g_j``.

Only groups that occur in the batch are returned: an absent label or domain is *not* a group with a zero
gradient (which would make the min-norm direction zero), it is simply not a group this step.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

import torch

__all__ = ["ByKey", "Chunks", "GroupAssignment", "Grouping", "PerSample", "as_grouping"]


@dataclass(frozen=True)
class GroupAssignment:
    """Result of a grouping for one batch.

    Attributes:
        index: ``(n,)`` long tensor, ``index[i]`` is the group of sample ``i`` (in ``0..k-1``).
        keys: ``(k,)`` tensor, the key of each group (label value, chunk number or sample position).
        counts: ``(k,)`` float tensor, samples per group (all ``>= 1``).
    """

    index: torch.Tensor
    keys: torch.Tensor
    counts: torch.Tensor

    @property
    def num_groups(self) -> int:
        return int(self.counts.shape[0])

    @property
    def fractions(self) -> torch.Tensor:
        """``(k,)`` float64 ``n_j / n``: the weights that turn group gradients into the plain mean."""
        c = self.counts.double()
        return c / c.sum()

    def group_means(self, losses: torch.Tensor) -> torch.Tensor:
        """``(k,)`` mean loss of each group from ``(n,)`` per-sample losses (differentiable)."""
        if losses.shape != self.index.shape:
            raise ValueError(f"expected {tuple(self.index.shape)} per-sample losses, got shape {tuple(losses.shape)}")
        total = torch.zeros(self.num_groups, dtype=losses.dtype, device=losses.device)
        total = total.index_add(0, self.index.to(losses.device), losses)
        return total / self.counts.to(device=losses.device, dtype=losses.dtype)

    @staticmethod
    def from_index(index: torch.Tensor) -> GroupAssignment:
        """Assignment from arbitrary integer group ids per sample (ids need not be contiguous). Floating-point ids
        are accepted when every one is a whole number (e.g. the 1-5 ratings of a regression target) and refused,
        naming one, otherwise: casting 0.5 and 0.0 to the same group would be silent."""
        index = torch.as_tensor(index)
        if index.ndim != 1 or index.numel() == 0:
            raise ValueError(f"group ids must be a non-empty 1-D tensor, got shape {tuple(index.shape)}")
        if index.is_complex():
            raise ValueError(f"group ids must be integers (or bool), got dtype {index.dtype}")
        if index.is_floating_point():
            whole = torch.isfinite(index) & (index == index.round())
            if not bool(whole.all()):
                bad = index[~whole][0].item()
                raise ValueError(
                    f"group ids must be integers (or bool, or whole-valued floats), got {bad!r} in a {index.dtype} "
                    "tensor; group a continuous target by binning it into integer ids first"
                )
            index = index.long()
        keys, inverse, counts = torch.unique(index, sorted=True, return_inverse=True, return_counts=True)
        return GroupAssignment(index=inverse.long(), keys=keys, counts=counts.double())


class Grouping(ABC):
    """Base class: ``assign(batch_size, batch)`` returns the :class:`GroupAssignment` of a batch."""

    #: whether the same group key means the same group across steps (enables the solver's warm start)
    stable_keys: bool = True

    @abstractmethod
    def assign(self, batch_size: int, batch: Any = None) -> GroupAssignment:
        """Split a batch of ``batch_size`` samples into groups."""


class PerSample(Grouping):
    """One group per sample (``k = n``): the finest grouping."""

    stable_keys = False

    def assign(self, batch_size: int, batch: Any = None) -> GroupAssignment:
        idx = torch.arange(batch_size)
        return GroupAssignment(index=idx, keys=idx.clone(), counts=torch.ones(batch_size, dtype=torch.float64))

    def __repr__(self) -> str:
        return "PerSample()"


class Chunks(Grouping):
    """``num_chunks`` contiguous chunks of (almost) equal size, as :func:`torch.chunk` splits them.

    A batch smaller than ``num_chunks`` gives one group per sample (chunks are never empty).
    """

    def __init__(self, num_chunks: int) -> None:
        if not isinstance(num_chunks, int) or isinstance(num_chunks, bool) or num_chunks < 1:
            raise ValueError(f"num_chunks must be a positive int, got {num_chunks!r}")
        self.num_chunks = num_chunks

    def assign(self, batch_size: int, batch: Any = None) -> GroupAssignment:
        size = -(-batch_size // self.num_chunks)  # ceil, like torch.chunk
        return GroupAssignment.from_index(torch.arange(batch_size) // size)

    def __repr__(self) -> str:
        return f"Chunks({self.num_chunks})"


class ByKey(Grouping):
    """Groups by the value of a key tensor of the batch: a label, a domain or a task id.

    Args:
        key: where the ``(n,)`` integer tensor lives in the batch: a mapping key (``batch[key]``), a
            position in a tuple/list batch (``batch[1]``), or a callable ``batch -> tensor``.
    """

    def __init__(self, key: Union[str, int, Callable[[Any], torch.Tensor]]) -> None:
        if not (isinstance(key, (str, int)) or callable(key)) or isinstance(key, bool):
            raise ValueError(f"key must be a str, an int or a callable, got {key!r}")
        self.key = key

    def _lookup(self, batch: Any) -> torch.Tensor:
        if callable(self.key):
            return self.key(batch)
        if isinstance(self.key, str):
            if not isinstance(batch, Mapping) or self.key not in batch:
                found = list(batch.keys()) if isinstance(batch, Mapping) else type(batch).__name__
                raise KeyError(f"ByKey({self.key!r}): the batch has no key {self.key!r}; found {found}")
            return batch[self.key]
        if not isinstance(batch, Sequence) or not -len(batch) <= self.key < len(batch):
            raise KeyError(
                f"ByKey({self.key}): the batch is not a sequence with index {self.key}: {type(batch).__name__}"
            )
        return batch[self.key]

    def assign(self, batch_size: int, batch: Any = None) -> GroupAssignment:
        values = torch.as_tensor(self._lookup(batch)).detach().cpu()
        if values.ndim == 2 and values.shape[1] == 1:
            values = values[:, 0]
        if values.shape != (batch_size,):
            raise ValueError(f"{self!r}: expected a ({batch_size},) key tensor, got shape {tuple(values.shape)}")
        return GroupAssignment.from_index(values)

    def __repr__(self) -> str:
        return f"ByKey({self.key!r})"


#: the forms :func:`as_grouping` accepts, for its error message
_GROUPING_FORMS = (
    "'sample' (one group per sample), 'key:NAME' (groups by a key of the batch), a positive int k or a "
    "string of digits such as '4' (k contiguous chunks), or a Grouping"
)


def as_grouping(spec: Union[Grouping, str, int]) -> Grouping:
    """The :class:`Grouping` that ``spec`` names.

    ``"sample"`` -> :class:`PerSample`; an int ``k >= 1`` or a string of digits (``"4"``, as a command line
    or a YAML string hands it over) -> :class:`Chunks` ``(k)``; ``"key:NAME"`` -> :class:`ByKey` ``("NAME")``
    (``"key:1"``: position 1 of a tuple batch); a Grouping as is. Anything else: ``ValueError`` naming the
    value and these forms.
    """
    if isinstance(spec, Grouping):
        return spec
    if isinstance(spec, int) and not isinstance(spec, bool) and spec >= 1:
        return Chunks(spec)
    if isinstance(spec, str):
        text = spec.strip()
        if text in ("sample", "per_sample"):
            return PerSample()
        if re.fullmatch(r"[0-9]+", text) and int(text) >= 1:
            return Chunks(int(text))
        if text.startswith("key:") and len(text) > 4:
            name = text[4:]
            return ByKey(int(name) if re.fullmatch(r"-?[0-9]+", name) else name)
    raise ValueError(f"grouping must be {_GROUPING_FORMS}; got {spec!r}")
