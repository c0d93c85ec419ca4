"""Cores shared between the workers of one `kiln serve --workers N` (CPU).

Each worker's sessions get its share of the cores (cores / workers threads), so that N busy
workers never oversubscribe them. But SO_REUSEPORT places connections, not requests: with few
connections one worker may hold them all and compute at its share's speed while the others idle
(ResNet-50 at concurrency 16 over perf_analyzer's three connections: 0.46 x E with two workers,
benchmarks/RESULTS-serving.md). So each worker also opens a *wide* session per instance (every
core of the machine, split between its instances) and runs a batch on it while every other
worker has been idle for a while: one worker alone then computes as a one-worker server would.

Who computes lives in a small file-backed table that every worker maps (`CoreTable`): one float
per worker, 0 while it computes a batch, else when it last stopped (`time.monotonic()`, i.e.
CLOCK_MONOTONIC: the same clock in every process). "A while" is twice the worker's last batch
(at least MIN_IDLE_S): a peer that is only between two batches (its clients' answers and next
requests in flight) is not idle, and a peer that starts during a wide batch oversubscribes the
cores for the rest of that one batch only. Loading a model (its sessions, their "auto" timing
runs in batch_sessions.py, its warm-up) holds an flock on the table file, one worker at a time
(`one_worker_at_a_time`): two workers measuring at once each read a second thread as useless, and
one measuring while another warmed up dropped its spinning twin.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import numpy as np

from serving.runtime.backends.pool import Runner

__all__ = ["CoreTable", "SharedCoresRunner", "current", "join", "leave", "one_worker_at_a_time"]

MIN_IDLE_S = 0.002  # the least idle time of every peer before a batch takes their cores
_SLOT = np.dtype(np.float64)


class CoreTable:
    """One worker's view of the table: its own slot to mark, the others' to read."""

    def __init__(self, path: str | Path, slot: int, slots: int, *, cores: int) -> None:
        if not 0 <= slot < slots:
            raise ValueError(f"slot {slot} outside the table of {slots} workers")
        self.path, self.slot, self.slots, self.cores = Path(path), slot, slots, cores  # cores: the machine's
        with open(self.path, "r+b") as f:
            self._map = mmap.mmap(f.fileno(), slots * _SLOT.itemsize)
        self._times = np.frombuffer(self._map, dtype=_SLOT, count=slots)
        self._running = 0  # batches this process is computing (instances run at once)
        self._lock = threading.Lock()
        # counts each batch ("all": on the wide session); the server points it at its metrics
        self.on_batch: Callable[[bool], None] | None = None

    @staticmethod
    def create(path: str | Path, slots: int) -> None:
        """Write a table of `slots` workers, every one idle since now (the supervisor, once)."""
        data = np.full(slots, time.monotonic(), dtype=_SLOT).tobytes()
        with open(path, "wb") as f:
            f.write(data)

    def others_idle_for(self, seconds: float) -> bool:
        """Whether every other worker has computed nothing for at least `seconds`."""
        now = time.monotonic()
        for slot, stopped in enumerate(self._times.tolist()):
            if slot != self.slot and (stopped == 0.0 or now - stopped < seconds):
                return False
        return True

    def begin(self) -> None:
        """A batch of this worker starts (any instance)."""
        with self._lock:
            self._running += 1
            self._times[self.slot] = 0.0

    def mark_idle(self) -> None:
        """Idle since now (a worker taking over a slot whose last holder died while computing)."""
        with self._lock:
            if not self._running:
                self._times[self.slot] = time.monotonic()

    def end(self) -> None:
        """A batch of this worker ended; the slot reads idle once none runs."""
        with self._lock:
            self._running -= 1
            if not self._running:
                self._times[self.slot] = time.monotonic()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """One worker at a time (an flock on the table file): for what measures every core, such
        as the wide sessions' "auto" timing runs, which two workers at once would each read as
        "a second thread does nothing" and then keep every batch on one thread."""
        with open(self.path, "rb") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def close(self) -> None:
        del self._times  # the buffer's export ends before the map closes
        self._map.close()


class SharedCoresRunner:
    """An instance's runner that marks the table around every batch and runs a batch on `wide`
    (every core) while the other workers idle, on `own` (this worker's share) otherwise."""

    def __init__(self, own: Runner, wide: Runner | None, table: CoreTable) -> None:
        self.own, self.wide, self.table = own, wide, table
        self._last_s = 0.0  # the last batch's seconds: how long peers must have idled
        self.counts = {"own": 0, "all": 0}

    def run(self, inputs: Mapping[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
        idle = max(MIN_IDLE_S, 2 * self._last_s)
        wide = self.wide if self.wide is not None and self.table.others_idle_for(idle) else None
        runner = self.own if wide is None else wide
        self.table.begin()
        start = time.perf_counter()
        try:
            outputs = runner.run(inputs, rows)
        finally:
            self.table.end()
        self._last_s = time.perf_counter() - start
        self.counts["own" if wide is None else "all"] += 1
        if self.table.on_batch is not None:
            self.table.on_batch(wide is not None)
        return outputs

    def close(self) -> None:
        for runner in (self.own, self.wide):
            if runner is not None:
                runner.close()


_PROCESS: CoreTable | None = None
_HOLDING = threading.local()  # this thread is inside one_worker_at_a_time()


def join(path: str, slot: int, slots: int, cores: int) -> CoreTable:
    """Make this process the worker in `slot` of the table at `path` (the worker, at start)."""
    global _PROCESS
    leave()
    _PROCESS = CoreTable(path, slot, slots, cores=cores)
    # a replacement for a worker that died mid-batch starts idle, not "computing" for ever
    _PROCESS.mark_idle()
    return _PROCESS


def current() -> CoreTable | None:
    """This process's table, if it is one worker of several that share the cores."""
    return _PROCESS


@contextlib.contextmanager
def one_worker_at_a_time() -> Iterator[None]:
    """This worker's `exclusive()`, or nothing where it shares no cores: around what loads and
    measures a model (session creation, "auto" timing runs, warm-up), so that one worker's loading
    never skews another's measurements (a worker whose peer warmed up meanwhile read its spinning
    twin as not worth it, and served a lone row at 0.8 ms instead of 0.55). Re-entrant within a
    thread (a second flock on the file from the holder would wait for itself)."""
    if _PROCESS is None or getattr(_HOLDING, "yes", False):
        yield
        return
    with _PROCESS.exclusive():
        _HOLDING.yes = True
        try:
            yield
        finally:
            _HOLDING.yes = False


def leave() -> None:
    """Forget the table (tests; a worker simply exits)."""
    global _PROCESS
    if _PROCESS is not None:
        _PROCESS.close()
    _PROCESS = None
