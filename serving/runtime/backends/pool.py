"""The instance pool every engine shares: N runners (ORT sessions, TensorRT contexts, timing
instances), each running one batch at a time; `run` checks a free one out, blocking until one is free.

Each instance's busy time (seconds inside `runner.run`), calls and rows are counted here, inside the
backend, so utilisation is measured rather than inferred from wall-clock guesses at the batcher.

Errors keep their meaning across engines: a closed pool is UNAVAILABLE, an engine failure is a
BackendError naming the engine and the batch, outputs of the wrong shape are a BackendError.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from serving.errors import BackendError, KilnError, ModelUnavailableError
from serving.runtime.backends.base import CheckedBatch, TensorSpec, check_outputs, validate_inputs

__all__ = ["InstanceBusy", "InstancePool", "PooledBackend", "Runner"]

log = logging.getLogger(__name__)

CLOSE_TIMEOUT_S = 30.0  # how long close() waits for a running batch


class Runner(Protocol):
    """One instance: runs a validated batch of `rows` rows; released by `close`."""

    def run(self, inputs: Mapping[str, np.ndarray], rows: int) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class InstanceBusy:
    """Cumulative counters of one instance since load (a snapshot; subtract two for a window)."""

    instance: int
    busy_seconds: float  # time inside runner.run (the instance held by a batch)
    calls: int  # device calls: one per batch the instance ran
    rows: int  # rows of those batches (before any padding the runner does)


class InstancePool:
    """Free-list of runners; see the module docstring."""

    def __init__(
        self,
        runners: Sequence[Runner],
        *,
        engine: str,
        inputs: Sequence[TensorSpec],
        outputs: Sequence[TensorSpec],
        max_batch_size: int,
    ) -> None:
        self._engine, self._inputs, self._outputs = engine, tuple(inputs), tuple(outputs)
        self._max_batch_size, self._size = max_batch_size, len(runners)
        self._free: queue.SimpleQueue[tuple[int, Runner]] = queue.SimpleQueue()
        for index, runner in enumerate(runners):
            self._free.put((index, runner))
        # [busy_seconds, calls, rows] per instance; the lock keeps snapshots consistent.
        self._busy = [[0.0, 0, 0] for _ in runners]
        self._busy_lock = threading.Lock()
        self.closed = False

    def __len__(self) -> int:
        return self._size

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Validate (unless the batcher did: CheckedBatch), run on a free instance, check the
        outputs' batch and shapes."""
        if self.closed:
            raise ModelUnavailableError("backend is closed", reason="closed")
        if isinstance(inputs, CheckedBatch):
            rows = inputs.rows
        else:
            rows = validate_inputs(self._inputs, inputs, self._max_batch_size)
        index, runner = self._free.get()
        start = time.perf_counter()
        try:
            outputs = runner.run(inputs, rows)
        except KilnError:
            raise
        except Exception as exc:
            raise BackendError(f"{self._engine} failed on a batch of {rows}: {exc}") from exc
        finally:
            self._count(index, time.perf_counter() - start, rows)
            self._free.put((index, runner))
        try:
            check_outputs(outputs, self._outputs, rows)
        except ValueError as exc:
            raise BackendError(str(exc)) from exc
        return outputs

    def _count(self, index: int, seconds: float, rows: int) -> None:
        with self._busy_lock:
            slot = self._busy[index]
            slot[0] += seconds
            slot[1] += 1
            slot[2] += rows

    def instance_stats(self) -> tuple[InstanceBusy, ...]:
        """Busy seconds, calls and rows of every instance since load, in instance order."""
        with self._busy_lock:
            return tuple(InstanceBusy(i, s, c, r) for i, (s, c, r) in enumerate(self._busy))

    def close(self) -> bool:
        """Close every runner once it is free; False if one was still running after the timeout."""
        if self.closed:
            return True
        self.closed = True
        for _ in range(self._size):
            try:
                self._free.get(timeout=CLOSE_TIMEOUT_S)[1].close()
            except queue.Empty:
                log.warning("%s backend closed while a call was still running", self._engine)
                return False
        return True


class PooledBackend:
    """What every engine's Backend shares once its runners are in an InstancePool: the specs and
    the batch limit (plain attributes), `infer`, the busy counters and `close`. A subclass sets
    `inputs`, `outputs` and `max_batch_size` in its constructor, then calls `_pool_runners`."""

    inputs: tuple[TensorSpec, ...]  # as the engine reports them (fp16 models report FP16)
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int  # largest batch `infer` accepts
    _pool: InstancePool

    def _pool_runners(self, runners: Sequence[Runner], engine: str) -> None:
        """Put the runners (one per instance) in the pool that `infer` runs on."""
        self._pool = InstancePool(
            runners,
            engine=engine,
            inputs=self.inputs,
            outputs=self.outputs,
            max_batch_size=self.max_batch_size,
        )

    @property
    def instances(self) -> int:
        """Instances (sessions, execution contexts) that can run at once."""
        return len(self._pool)

    def instance_stats(self) -> tuple[InstanceBusy, ...]:
        """Busy seconds, device calls and rows per instance since load (warm-up included)."""
        return self._pool.instance_stats()

    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Validate, run on a free instance (blocking until one is free), return outputs by name."""
        return self._pool.run(inputs)

    def close(self) -> None:
        """Wait for running calls (bounded), then release every instance."""
        self._pool.close()
