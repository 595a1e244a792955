"""Peak resident-set growth of one call, for the benchmarks' memory columns.

Run each measurement in a fresh process (:func:`in_fresh_process`) with glibc's mmap threshold fixed at
64 KiB (``MALLOC_MMAP_THRESHOLD_``), so that freed tensors return to the OS and the RSS follows the live
tensors; a thread samples the RSS every 0.5 ms while the call runs (:func:`peak_growth`).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence


def rss_bytes() -> int:
    """This process's resident set size."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_growth(fn: Callable[[], None]) -> int:
    """Bytes by which the RSS peaks above its value before ``fn()`` while ``fn`` runs (warm it up first)."""
    peak, stop = [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(0.0005)

    base = rss_bytes()
    thread = threading.Thread(target=sample)
    thread.start()
    fn()
    stop.set()
    thread.join()
    return max(peak[0], rss_bytes()) - base


def in_fresh_process(script: str, args: Sequence[str]) -> float:
    """MiB printed (as bytes, last line) by ``python script *args`` run with the fixed mmap threshold."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, script, *args], env=env, capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]) / 2**20
