r"""Faults across data-parallel ranks: one rank's error reaches every rank, and no rank waits forever.

Two failures that plain DDP turns into a hang or a misleading backend error:

- **Unequal batch counts.** Every optimizer step combines the gradients of every rank, so every rank must
  run the same number of batches. :func:`check_batch_counts` compares the ranks' ``num_training_batches``
  once per epoch (one tiny all-reduce); for loaders without a length, :func:`end_of_data_slots` adds each
  rank's "my data ends at this batch" flag to a small all-reduce the strategy already does every step, and
  :func:`check_end_of_data` raises on every rank at the step where one rank's data ends before another's.
  Both raise :class:`UnequalBatchesError` on every rank, naming the batch counts and the remedy.
- **An exception on one rank.** :class:`FaultMonitor`: the failing rank posts ``"rank R failed: Type:
  message"`` to the process group's store (from ``Strategy.on_exception``) and waits until every other
  rank's watchdog thread has read it (milliseconds; at most ``ACK_WAIT_MAX_S`` when a rank never does);
  then its exception goes on (its process exits, which makes every peer's pending collective fail at
  once). A rank whose collective then fails (or times out after ``fault_timeout`` seconds, the
  process-group timeout, when the failing process stays alive) raises :class:`RankFailedError` quoting the
  failing rank's error; the watchdog also logs it as soon as it is seen. Exceptions raised on every rank at
  the same point (marked with :func:`on_every_rank`) are not posted: no rank is left waiting.

A gloo collective cannot be interrupted from another thread (``ProcessGroup.abort`` and
``destroy_process_group`` leave a peer's pending receive blocked); only the peer's exit or the timeout ends
it, hence the bound ``fault_timeout``. Strategy-independent: ``grain_ddp`` uses it, any other strategy can.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Optional

import torch
import torch.distributed as dist

__all__ = [
    "DEFAULT_FAULT_TIMEOUT",
    "FaultMonitor",
    "RankFailedError",
    "UnequalBatchesError",
    "check_batch_counts",
    "check_end_of_data",
    "check_fault_timeout",
    "end_of_data_slots",
    "on_every_rank",
]

log = logging.getLogger(__name__)

#: Default process-group timeout (seconds) of the strategies using this module: how long a rank waits in a
#: collective for a rank that neither answers nor exits. Lightning's default is 30 minutes.
DEFAULT_FAULT_TIMEOUT = 300.0
POLL_S = 0.1  # watchdog period
ACK_WAIT_MAX_S = 30.0  # the failing rank waits at most this long (and at most fault_timeout) for the others
_MAX_MESSAGE = 2000
# = protocol.RAISED_ON_EVERY_RANK (set by the mixin's refusals; this module imports no grain module)
_EVERY_RANK = "_grain_raised_on_every_rank"
_generations = itertools.count()  # one key prefix per monitored run; every rank starts runs in the same order

EQUAL_SHARES_HINT = (
    "every optimizer step combines the gradients of every rank, so every rank must run the same number of "
    "batches: give each rank an equal share (a map-style dataset: Trainer(use_distributed_sampler=True), or "
    "DistributedSampler(..., drop_last=True); an iterable dataset: yield the same number of batches on every "
    "rank, e.g. drop the remainder), or cap the epoch with Trainer(limit_train_batches=N) at most the "
    "smallest count"
)


class RankFailedError(RuntimeError):
    """Another rank failed; the message quotes its error (``"rank 1 failed: ValueError: ..."``)."""


class UnequalBatchesError(ValueError):
    """The ranks have different numbers of training batches (raised on every rank)."""


def check_fault_timeout(owner: str, value: Any) -> float:
    """``value`` (seconds) if it is a positive finite number; else ``ValueError`` naming it."""
    if isinstance(value, timedelta):
        value = value.total_seconds()
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    if not ok:
        raise ValueError(f"{owner}: fault_timeout must be a positive number of seconds, got {value!r}")
    return float(value)


def on_every_rank(exc: BaseException) -> BaseException:
    """Mark ``exc`` as raised by every rank at the same point: :class:`FaultMonitor` does not post it."""
    setattr(exc, _EVERY_RANK, True)
    return exc


@contextmanager
def raised_on_every_rank() -> Iterator[None]:
    """Exceptions raised inside are marked with :func:`on_every_rank` (code that every rank runs alike)."""
    try:
        yield
    except Exception as exc:
        on_every_rank(exc)
        raise


def _is_every_rank(exc: BaseException) -> bool:
    return isinstance(exc, UnequalBatchesError) or bool(getattr(exc, _EVERY_RANK, False))


def _gather_per_rank(value: float, rank: int, world: int, device: torch.device) -> list[float]:
    slots = torch.zeros(world, dtype=torch.float64, device=device)
    slots[rank] = value
    dist.all_reduce(slots)
    return slots.cpu().tolist()


def _counts_text(counts: list[Any]) -> str:
    return ", ".join(f"rank {r}: {c}" for r, c in enumerate(counts))


def check_batch_counts(
    num_batches: float, rank: int, world: int, *, owner: str = "grain_ddp", device: Optional[torch.device] = None
) -> bool:
    """Compare every rank's number of training batches this epoch (one all-reduce of ``world`` numbers).

    Returns ``True`` when every rank's count is known (finite) and they agree; ``False`` when some rank's
    loader has no length (the per-step guard, :func:`check_end_of_data`, then catches a difference).
    Raises :class:`UnequalBatchesError` on every rank when the known counts differ.
    """
    known = math.isfinite(num_batches)
    every = _gather_per_rank(float(num_batches) if known else -1.0, rank, world, device or torch.device("cpu"))
    if any(c < 0 for c in every):
        return False
    counts = [int(c) for c in every]
    if len(set(counts)) > 1:
        raise UnequalBatchesError(
            f"{owner}: the ranks have different numbers of training batches per epoch ({_counts_text(counts)}); "
            f"{EQUAL_SHARES_HINT}"
        )
    return True


def end_of_data_slots(world: int, rank: int, last: bool, batches: int) -> torch.Tensor:
    """``2 world`` float64 slots to sum across ranks: this rank's "data ends here" flag and batch count."""
    slots = torch.zeros(2 * world, dtype=torch.float64)
    slots[rank], slots[world + rank] = float(last), float(batches)
    return slots


def check_end_of_data(summed: torch.Tensor, world: int, *, owner: str = "grain_ddp") -> None:
    """Raise :class:`UnequalBatchesError` (on every rank) when some ranks' data end at this step and others not.

    ``summed``: every rank's :func:`end_of_data_slots`, summed (every rank sees the same numbers).
    """
    last = [bool(v > 0) for v in summed[:world].tolist()]
    if not any(last) or all(last):
        return
    batches = [int(v) for v in summed[world : 2 * world].tolist()]
    counts = [f"{b}" if done else f"more than {b}" for b, done in zip(batches, last)]
    ended = [r for r, done in enumerate(last) if done]
    raise UnequalBatchesError(
        f"{owner}: the ranks have different numbers of training batches this epoch: the data of rank(s) {ended} "
        f"ended while other ranks have more ({_counts_text(counts)}); {EQUAL_SHARES_HINT}"
    )


class FaultMonitor:
    """One rank's part in reporting faults across ranks through the default process group's store.

    :meth:`start` after the process group exists (``setup_environment``), :meth:`stop` at teardown,
    :meth:`on_exception` from ``Strategy.on_exception``, and :meth:`collective` around the strategy's own
    collectives (a failure there after another rank's fault becomes :class:`RankFailedError`).
    """

    def __init__(self, timeout_s: float, owner: str = "grain_ddp") -> None:
        self.timeout_s, self.owner = timeout_s, owner
        self.rank, self.world = 0, 1
        self.failures: dict[int, str] = {}  # other ranks' posted errors, as seen by the watchdog
        self._store: Optional[Any] = None
        self._prefix = ""
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.RLock()  # the store client is shared by the watchdog and the main thread

    @property
    def running(self) -> bool:
        return self._store is not None

    # ------------------------------------------------------------------ life cycle
    def start(self) -> None:
        """Start watching (no-op unless a process group of several ranks exists)."""
        self.stop()
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        store = dist.distributed_c10d._get_default_store()
        clone = getattr(store, "clone", None)  # the watchdog's own connection, with its own timeout
        if clone is not None:
            store = clone()
        store.set_timeout(timedelta(seconds=min(self.timeout_s, 10.0)))
        self._store, self._prefix = store, f"grain_faults/{next(_generations)}/"
        self.failures = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name=f"{self.owner}-fault-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5 * POLL_S + 1.0)
        self._thread, self._store = None, None

    def _key(self, what: str, rank: int) -> str:
        return f"{self._prefix}{what}{rank}"

    def _watch(self) -> None:
        store, stop, seen = self._store, self._stop, 0
        assert store is not None
        while not stop.wait(POLL_S):
            try:
                with self._lock:
                    posted = store.add(f"{self._prefix}count", 0)
                    if posted > seen:
                        seen = posted
                        self._read_failures(store)
            except Exception:  # the store is gone (its host exited): nothing more to read
                return

    def _read_failures(self, store: Any) -> None:
        """Record, log and acknowledge the errors other ranks posted (call with ``self._lock`` held)."""
        for r in range(self.world):
            if r == self.rank or r in self.failures or not store.check([self._key("error", r)]):
                continue
            text = store.get(self._key("error", r)).decode(errors="replace")
            self.failures[r] = text
            log.error(
                f"[rank {self.rank}] {self.owner}: {text}; this rank stops at its next collective (at the latest "
                f"after fault_timeout={self.timeout_s:g} s)"
            )
            store.add(self._key("ack", r), 1)

    def remote_failure(self) -> Optional[str]:
        """The first other rank's posted error (``"rank R failed: ..."``), or ``None``."""
        with self._lock:
            if not self.failures and self._store is not None:
                try:  # the watchdog may not have polled yet
                    self._read_failures(self._store)
                except Exception:
                    pass
            return self.failures[min(self.failures)] if self.failures else None

    # ------------------------------------------------------------------ the failing rank
    def on_exception(self, exc: BaseException) -> None:
        """From ``Strategy.on_exception``: post this rank's own error, or name another rank's in ``exc``."""
        if not self.running or isinstance(exc, RankFailedError) or _is_every_rank(exc):
            return
        if not isinstance(exc, Exception):  # KeyboardInterrupt, SystemExit: Lightning's own handling
            return
        remote = self.remote_failure()
        if remote is not None:  # this rank failed because another one did: say which
            _prepend(exc, f"{self.owner}: {remote}; then on rank {self.rank}: ")
            return
        self.post(exc)

    def post(self, exc: BaseException) -> None:
        """Post ``exc`` for the other ranks; wait (bounded) until each has read it."""
        store = self._store
        if store is None:
            return
        text = f"rank {self.rank} failed: {type(exc).__name__}: {exc}"
        if len(text) > _MAX_MESSAGE:
            text = text[:_MAX_MESSAGE] + " [...]"
        try:
            with self._lock:
                store.set(self._key("error", self.rank), text)
                store.add(f"{self._prefix}count", 1)
            deadline = time.monotonic() + min(self.timeout_s, ACK_WAIT_MAX_S)
            while time.monotonic() < deadline:
                with self._lock:
                    if store.add(self._key("ack", self.rank), 0) >= self.world - 1:
                        break
                time.sleep(POLL_S / 5)
        except Exception as store_error:  # never hide the original error behind a store problem
            log.warning(f"[rank {self.rank}] {self.owner}: could not post this rank's error: {store_error}")

    # ------------------------------------------------------------------ the other ranks
    @contextmanager
    def collective(self) -> Iterator[None]:
        """Collectives inside: :class:`RankFailedError` quoting another rank's posted error, instead of waiting.

        Raised at once when the watchdog has already seen such an error (no collective is started that the
        failing rank would never join), or when a collective inside fails (or times out) after one.
        """
        with self._lock:
            known = self.failures[min(self.failures)] if self.running and self.failures else None
        if known is not None:
            raise RankFailedError(f"{self.owner}: {known} (rank {self.rank} stopped before its next collective)")
        try:
            yield
        except Exception as exc:
            if isinstance(exc, RankFailedError) or _is_every_rank(exc) or not self.running:
                raise
            remote = self.remote_failure()
            if remote is None:
                raise
            first_line = str(exc).splitlines()[0] if str(exc) else ""
            raise RankFailedError(
                f"{self.owner}: {remote} (rank {self.rank} stopped: its collective failed with "
                f"{type(exc).__name__}: {first_line})"
            ) from exc


def _prepend(exc: BaseException, text: str) -> None:
    if exc.args and isinstance(exc.args[0], str):
        exc.args = (text + exc.args[0], *exc.args[1:])
    else:
        exc.args = (text + str(exc), *exc.args[1:])
