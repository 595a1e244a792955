"""What a stage-1 model was trained on: the data's content and the options that decide its rows and encoding.

A checkpoint's vocabularies and embedding rows only mean something for the data they were fitted on. Stage 1
stores :func:`data_fingerprint` in its checkpoint (the ``"data"`` entry of the Light-FMP extra), prune and
finetune carry it on, and :func:`check_same_data` refuses a stage given other data: another file, a changed
file, another schema, or other split / preprocessing options. Given a foreign checkpoint, prune and finetune
would otherwise encode every value as out-of-vocabulary, or train on stage 1's test rows, and carry on.

The content digest is BLAKE2b over the file size and up to 64 blocks of 64 KiB spread evenly over the file
(the whole file when it is under 4 MiB): at most 4 MiB read whatever the file's size, so a 11 GB Criteo log
costs milliseconds. It tells files apart, and catches truncation, appended rows and most edits; an edit of a
few bytes between two sampled blocks of a large file of unchanged size is not seen. A directory (MovieLens) is
the digest of its files' names and digests. The path itself is not compared: a moved or copied file is the same
data.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Optional

__all__ = ["CONTENT_OPTIONS", "content_digest", "check_same_data", "data_fingerprint"]

BLOCK = 64 * 1024
BLOCKS = 64

#: datamodule options that decide which rows stage 1 saw, how they split and how they were encoded
CONTENT_OPTIONS = (
    "format", "split", "val_fraction", "test_fraction", "pretrain_fraction", "pretrain_rows", "seed", "max_rows",
    "min_count",
    "hash_threshold", "synthetic_rows", "synthetic_dense", "synthetic_sparse", "synthetic_cardinality",
    "synthetic_informative", "synthetic_num_informative", "synthetic_interaction",
)  # fmt: skip


def _file_digest(path: Path) -> str:
    size = path.stat().st_size
    h = hashlib.blake2b(str(size).encode(), digest_size=16)
    with path.open("rb") as f:
        if size <= BLOCK * BLOCKS:
            h.update(f.read())
        else:
            step = (size - BLOCK) // (BLOCKS - 1)
            for i in range(BLOCKS):
                f.seek(i * step)
                h.update(f.read(BLOCK))
    return h.hexdigest()


def content_digest(path: Path) -> str:
    """The sampled digest of a file, or of a directory's files (see the module docstring)."""
    if path.is_dir():
        h = hashlib.blake2b(digest_size=16)
        for child in sorted(p for p in path.rglob("*") if p.is_file()):
            h.update(f"{child.relative_to(path).as_posix()}:{_file_digest(child)}\n".encode())
        return h.hexdigest()
    return _file_digest(path)


def data_fingerprint(options: dict[str, Any]) -> dict[str, Any]:
    """The fingerprint of a ``CTRDataModule``'s data from its hyper-parameters ``options``: the content digest of
    ``path`` and of ``schema`` (None for the packaged or synthetic data, or no schema file) and the
    :data:`CONTENT_OPTIONS`. The ``path`` is kept for messages only."""
    path: Optional[str] = options.get("path")
    schema: Optional[str] = options.get("schema")
    fingerprint: dict[str, Any] = {k: options.get(k) for k in CONTENT_OPTIONS}
    fingerprint["content"] = content_digest(Path(path)) if path and options.get("format") != "synthetic" else None
    fingerprint["schema"] = content_digest(Path(schema)) if schema else None
    fingerprint["path"] = str(Path(path).resolve()) if path else None
    return fingerprint


def check_same_data(
    saved: Optional[dict[str, Any]], current: dict[str, Any], checkpoint: Any, allow_mismatch: bool
) -> list[str]:
    """Compare the checkpoint's fingerprint ``saved`` with the data's ``current`` one; returns the differences.

    Raises ``ValueError`` naming each difference (and the override) when there are any and not
    ``allow_mismatch``. A checkpoint from before fingerprints (``saved`` None) is not checked.
    """
    if saved is None:
        return []
    differ = []
    for key in (*CONTENT_OPTIONS, "content", "schema"):
        if saved.get(key) != current.get(key):
            if key == "content":
                differ.append(f"the data file's content ({current.get('path')} vs stage 1's {saved.get('path')})")
            elif key == "schema":
                differ.append("the schema file's content")
            else:
                differ.append(f"{key}={current.get(key)!r} (stage 1: {saved.get(key)!r})")
    if differ and not allow_mismatch:
        raise ValueError(
            f"the data given differs from the data the stage-1 checkpoint {str(checkpoint)!r} was trained on: "
            f"{'; '.join(differ)}. Its vocabularies and splits would not match (values read as out-of-vocabulary, "
            "test rows trained on). Pass the same --data.* options and file as stage 1, or --allow_data_mismatch "
            "true to go on anyway"
        )
    return differ
