"""Atomic file writes: a file is either its old content or its complete new content, never a partial one.

``atomic_write(path, write)`` calls ``write(tmp)`` on a temporary name in ``path``'s directory, then renames it
onto ``path`` with ``os.replace`` (atomic on POSIX within one file system); the temporary file is removed if
``write`` fails. Standard library only, so every layer (and the sweep, which imports nothing heavy) uses it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Union

__all__ = ["atomic_write", "atomic_write_json", "atomic_write_text"]

PathLike = Union[str, Path]


def atomic_write(path: PathLike, write: Callable[[Path], Any]) -> None:
    """``write(tmp)`` to a temporary name next to ``path``, then rename it to ``path`` (``os.replace``)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: PathLike, data: Any) -> None:
    """Write ``data`` as indented JSON to ``path`` atomically (NaN and infinity refused: not JSON)."""
    atomic_write_text(path, json.dumps(data, indent=1, allow_nan=False) + "\n")
