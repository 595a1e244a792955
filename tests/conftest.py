"""Fixtures shared by the whole suite (package-specific ones live in tests/<package>/conftest.py)."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest
import torch


def free_port() -> int:
    """A TCP port free on the loopback interface now (for a process group's ``MASTER_PORT``)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def float64_default() -> Iterator[None]:
    """Run a test with ``torch.float64`` as the default dtype (references agree to rounding)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.fixture
def restore_environ() -> Iterator[None]:
    """Restore ``os.environ`` and tear down a process group a test initialised in this process."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
