"""The named methods a sweep compares: each is a list of CLI overrides for ``grain fit``.

=================== ====================================================================
name                overrides
=================== ====================================================================
``mean``            ``--model.grain.aggregation mean`` (plain mean-gradient training, the baseline)
``grain-sample``    ``--model.grain.grouping sample`` (one group per sample)
``grain-chunks4``   ``--model.grain.grouping 4`` (4 contiguous chunks)
``grain-chunks8``   ``--model.grain.grouping 8``
``grain-label``     ``--model.grain.grouping key:labels`` (one group per label value)
``grain-rescaled``  per sample, ``--model.grain.step_norm mean`` (GRAIN direction at the mean gradient's norm)
``grain-blockwise`` per sample, ``--model.grain.blockwise true`` (one min-norm solve per module)
=================== ====================================================================

A custom method is ``name=--opt value --opt2 value`` (split with :func:`shlex.split`). In a list, methods are
separated by commas outside quotes, so a value with a comma is quoted: ``mean,mine=--opt value --opt2 'a,b'``.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional, Union

__all__ = ["BASELINE", "BUILTIN_METHODS", "Method", "parse_methods", "split_list"]

BASELINE = "mean"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")  # a directory name on every filesystem


@dataclass(frozen=True)
class Method:
    """One compared method: a name (also a directory name) and the ``grain fit`` overrides that make it."""

    name: str
    overrides: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.name):
            raise ValueError(
                f"method name {self.name!r} must be letters, digits, '_', '.', '+', '-' (it names a directory)"
            )
        object.__setattr__(self, "overrides", tuple(self.overrides))


_SAMPLE = ("--model.grain.grouping", "sample")
BUILTIN_METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("mean", ("--model.grain.aggregation", "mean")),
        Method("grain-sample", _SAMPLE),
        Method("grain-chunks4", ("--model.grain.grouping", "4")),
        Method("grain-chunks8", ("--model.grain.grouping", "8")),
        Method("grain-label", ("--model.grain.grouping", "key:labels")),
        Method("grain-rescaled", (*_SAMPLE, "--model.grain.step_norm", "mean")),
        Method("grain-blockwise", (*_SAMPLE, "--model.grain.blockwise", "true")),
    )
}


def split_list(spec: str) -> list[str]:
    """``spec`` split at commas outside single or double quotes; items stripped, empty items dropped."""
    items: list[str] = []
    current: list[str] = []
    quote = ""
    for ch in spec:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == ",":
            items.append("".join(current))
            current = []
            continue
        current.append(ch)
    if quote:
        raise ValueError(f"unbalanced quote in {spec!r}")
    items.append("".join(current))
    return [item.strip() for item in items if item.strip()]


def _parse_one(item: str) -> Method:
    if "=" not in item:
        if item not in BUILTIN_METHODS:
            known = ", ".join(BUILTIN_METHODS)
            raise ValueError(f"unknown method {item!r}; known methods: {known} (or a custom 'name=--opt value ...')")
        return BUILTIN_METHODS[item]
    name, _, rest = item.partition("=")
    name = name.strip()
    if name in BUILTIN_METHODS:
        raise ValueError(f"custom method {name!r} has the name of a built-in method; choose another name")
    try:
        overrides = tuple(shlex.split(rest))
    except ValueError as err:
        raise ValueError(f"custom method {name!r}: cannot split {rest!r}: {err}") from None
    if overrides and not overrides[0].startswith("-"):
        raise ValueError(f"custom method {name!r}: overrides must start with an option (--...), got {rest!r}")
    return Method(name, overrides)


def parse_methods(spec: Union[str, Sequence[str]], baseline: Optional[str] = BASELINE) -> list[Method]:
    """The methods named in ``spec`` (``"mean,grain-sample"`` or a list of items), in order.

    Each item is a built-in name (:data:`BUILTIN_METHODS`) or ``name=--opt value ...``. Raises ``ValueError``
    for an unknown or repeated name, an empty list, or a ``baseline`` (unless ``None``) not among them.
    """
    items = split_list(spec) if isinstance(spec, str) else [i.strip() for i in spec if i.strip()]
    if not items:
        raise ValueError("no methods given; known methods: " + ", ".join(BUILTIN_METHODS))
    methods = [_parse_one(item) for item in items]
    names = [m.name for m in methods]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"method(s) given more than once: {', '.join(repeated)}")
    if baseline is not None and baseline not in names:
        raise ValueError(f"baseline {baseline!r} is not among the methods ({', '.join(names)})")
    return methods
