"""Dynamic batching in front of one backend (one model version's instance group).

Shape of the thing (after Ray Serve's `_BatchQueue` and pytriton's `@batch`): `submit` validates a
request, appends it to a bounded deque with a future and a monotonic deadline, and awaits the
future. One background task forms batches: it takes a free instance slot, waits until the queue
holds `max_batch_size` rows (or the smallest preferred size) or the oldest request has waited
`max_queue_delay_us`, drops cancelled and expired requests, and hands the batch to a worker
thread that concatenates, runs `backend.infer`, checks the output batch and slices it back per
request. Results are set from a done-callback on the event loop, never on a future that is
already done. There is no polling: the task sleeps on one future, woken by `submit` or a timer.
When a dispatch comes just before a burst of event-loop work (a finished batch's handlers), the
loop hands the GIL to the worker until it is inside the backend (see `_dispatch`): otherwise the
worker waits out the burst and the model idles (+6-16 % served throughput at concurrency 16-64,
benchmarks/RESULTS-serving.md).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

import numpy as np

from serving.backends.base import Backend, validate_inputs
from serving.errors import (
    BackendError,
    DeadlineExceededError,
    KilnError,
    ModelUnavailableError,
    QueueFullError,
)

__all__ = ["BatchObserver", "DynamicBatcher"]

log = logging.getLogger(__name__)

_HANDOFF_TIMEOUT_S = 0.001  # longest the loop waits for a worker to pick a batch up (see _dispatch)


class BatchObserver(Protocol):
    """Timing hooks (e.g. Prometheus via `KilnMetrics.batch_observer`); called on the event loop."""

    def on_batch(
        self, *, rows: int, requests: int, queue_seconds: Sequence[float], compute_seconds: float
    ) -> None: ...

    def on_dropped(self, reason: str, count: int = 1) -> None: ...


@dataclass(slots=True, eq=False)
class _Request:
    inputs: Mapping[str, np.ndarray]
    rows: int
    future: asyncio.Future[dict[str, np.ndarray]]
    deadline: float | None  # time.monotonic() value
    enqueued: float


class DynamicBatcher:
    """Batches concurrent `submit` calls into `backend.infer` calls; see the module docstring."""

    def __init__(
        self,
        backend: Backend,
        *,
        max_batch_size: int | None = None,
        max_queue_delay_us: int = 0,
        preferred_batch_sizes: Sequence[int] = (),
        max_queue_size: int = 1024,
        instances: int | None = None,
        executor: Executor | None = None,
        observer: BatchObserver | None = None,
        name: str = "model",
    ) -> None:
        self._backend, self._name, self._observer = backend, name, observer
        self._max_batch = backend.max_batch_size if max_batch_size is None else max_batch_size
        if not 1 <= self._max_batch <= backend.max_batch_size:
            raise ValueError(
                f"max_batch_size must be in [1, {backend.max_batch_size}], got {self._max_batch}"
            )
        self._preferred = frozenset(preferred_batch_sizes)
        if any(not 1 <= p <= self._max_batch for p in self._preferred):
            raise ValueError(
                f"preferred_batch_sizes must lie in [1, {self._max_batch}], got {sorted(self._preferred)}"
            )
        if max_queue_delay_us < 0 or max_queue_size < 1:
            raise ValueError(
                f"need max_queue_delay_us >= 0 and max_queue_size >= 1, "
                f"got {max_queue_delay_us} and {max_queue_size}"
            )
        self._delay = max_queue_delay_us / 1e6
        self._trigger = min(self._preferred, default=self._max_batch)  # rows that end the wait early
        self._max_queue = max_queue_size
        self._instances = instances or getattr(backend, "instances", 1)
        self._executor, self._owns_executor = executor, executor is None
        self._queue: collections.deque[_Request] = collections.deque()
        self._queued_rows = self._inflight = 0
        self._resolved = 0  # requests answered since the last dispatch (see _dispatch)
        self._waiter: asyncio.Future[None] | None = None
        self._wake_rows = 1
        self._running: set[asyncio.Future[None]] = set()
        self._task: asyncio.Task[None] | None = None
        self._accepting = self._closing = False
        self.dropped = {"expired": 0, "cancelled": 0}

    @property
    def queue_depth(self) -> int:
        """Requests waiting (not yet in a batch)."""
        return len(self._queue)

    @property
    def inflight(self) -> int:
        """Requests in batches being computed."""
        return self._inflight

    @property
    def max_batch_size(self) -> int:
        """Largest batch (rows) this batcher forms."""
        return self._max_batch

    def start(self) -> None:
        """Start the batching task on the running event loop."""
        if self._task is not None or self._closing:
            raise RuntimeError(f"batcher {self._name!r} was already started")
        self._loop = asyncio.get_running_loop()
        self._slots = asyncio.Semaphore(self._instances)
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self._instances, thread_name_prefix=f"kiln-{self._name}")
        self._accepting = True
        self._task = self._loop.create_task(self._run(), name=f"kiln-batcher-{self._name}")

    async def stop(self, *, drain: bool = True) -> None:
        """Stop accepting; finish queued work (drain) or fail it with UNAVAILABLE; await running batches."""
        self._accepting = False
        if self._task is None:
            return
        if not drain:
            self._fail_queued(
                ModelUnavailableError(
                    f"model {self._name!r} stopped before running the request", reason="stopped"
                )
            )
        self._closing = True
        self._wake()
        await self._task
        if self._running:
            await asyncio.wait(set(self._running))
        if self._owns_executor and self._executor is not None:
            self._executor.shutdown(wait=False)

    async def submit(
        self, inputs: Mapping[str, np.ndarray], *, deadline: float | None = None
    ) -> dict[str, np.ndarray]:
        """Queue one request (any batch up to max_batch_size rows) and await its outputs.

        `deadline` is a `time.monotonic()` value; an expired request never reaches the backend.
        Raises InvalidInputError, QueueFullError, DeadlineExceededError, ModelUnavailableError or
        the batch's BackendError.
        """
        if not self._accepting:
            raise ModelUnavailableError(f"model {self._name!r} is not accepting requests", reason="stopped")
        rows = validate_inputs(self._backend.inputs, inputs, self._max_batch)
        now = time.monotonic()
        if deadline is not None and deadline <= now:
            self._drop("expired")
            raise DeadlineExceededError(f"deadline expired before the request for {self._name!r} was queued")
        if len(self._queue) >= self._max_queue:
            raise QueueFullError(
                f"queue of model {self._name!r} is full ({self._max_queue} requests waiting)"
            )
        future: asyncio.Future[dict[str, np.ndarray]] = self._loop.create_future()
        self._queue.append(_Request(inputs, rows, future, deadline, now))
        self._queued_rows += rows
        if self._queued_rows >= self._wake_rows:
            self._wake()
        return await future

    # -- the batching task (event loop) --------------------------------------------------------

    async def _run(self) -> None:
        try:
            while True:
                await self._slots.acquire()  # a free instance first: the queue fills while all are busy
                batch = await self._next_batch()
                if batch is None:
                    return
                self._dispatch(batch)
        except asyncio.CancelledError:
            self._accepting = False
            self._fail_queued(
                ModelUnavailableError(f"batcher of {self._name!r} was cancelled", reason="stopped")
            )
            raise
        except Exception as exc:  # a bug: fail loudly but never leave waiters hanging
            log.exception("batcher of %r crashed", self._name)
            self._accepting = False
            self._fail_queued(
                ModelUnavailableError(f"batcher of {self._name!r} failed: {exc!r}", reason="failed")
            )

    async def _next_batch(self) -> list[_Request] | None:
        while True:
            if not self._queue:
                if self._closing:
                    return None
                await self._wait(None, wake_rows=1)
                continue
            now = time.monotonic()
            due = self._queue[0].enqueued + self._delay
            if self._closing or now >= due or self._queued_rows >= self._trigger:
                batch = self._take(now, timed_out=self._closing or now >= due)
                if batch:
                    return batch
                continue
            await self._wait(due, wake_rows=self._trigger)

    def _take(self, now: float, *, timed_out: bool) -> list[_Request]:
        """FIFO requests up to max rows, dropping cancelled/expired ones; honours preferred sizes."""
        queue, taken, rows = self._queue, [], 0
        while queue:
            req = queue[0]
            if not req.future.done() and (req.deadline is None or req.deadline > now):
                if rows + req.rows > self._max_batch:
                    break
                taken.append(req)
                rows += req.rows
            elif not req.future.done():
                req.future.set_exception(
                    DeadlineExceededError(f"deadline expired after {now - req.enqueued:.4f}s in the queue")
                )
                self._drop("expired")
            else:
                self._drop("cancelled")
            queue.popleft()
            self._queued_rows -= req.rows
        if timed_out or rows == self._max_batch:
            return taken
        if not queue and rows < self._trigger:  # drops shrank the batch below the trigger: wait again
            keep = 0
        else:  # early trigger: the longest prefix whose size is preferred (else all of it)
            sizes = np.cumsum([r.rows for r in taken]).tolist()
            keep = max((i + 1 for i, s in enumerate(sizes) if s in self._preferred), default=len(taken))
        for req in reversed(taken[keep:]):
            queue.appendleft(req)
            self._queued_rows += req.rows
        return taken[:keep]

    async def _wait(self, until: float | None, *, wake_rows: int) -> None:
        waiter = self._waiter = self._loop.create_future()
        self._wake_rows = wake_rows
        timer = (
            None if until is None else self._loop.call_later(max(0.0, until - time.monotonic()), self._wake)
        )
        try:
            await waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _dispatch(self, batch: list[_Request]) -> None:
        now = time.monotonic()
        waits = [now - r.enqueued for r in batch]
        self._inflight += len(batch)
        tracker = self._loop.create_future()  # what stop() awaits
        self._running.add(tracker)
        started = threading.Event()
        try:
            work = self._executor.submit(
                self._compute, [r.inputs for r in batch], [r.rows for r in batch], started
            )
        except RuntimeError as exc:  # e.g. a caller-owned executor that was shut down
            work = concurrent.futures.Future()
            work.set_exception(exc)
        else:
            # GIL handoff: when the loop is about to run a burst (the handlers of a batch that just
            # finished, more queued requests), a worker woken now would wait for the GIL, up to
            # the 5 ms switch interval, while the cores idle. Waiting here releases the GIL until
            # the worker is inside the backend, which releases it again within microseconds.
            # Our own executor has a free thread for every slot, so the wait is short.
            burst = self._resolved > 1 or bool(self._queue)
            if burst and self._owns_executor:
                started.wait(_HANDOFF_TIMEOUT_S)
        self._resolved = 0
        # The worker hands the result straight to _finish with one call_soon_threadsafe; the
        # run_in_executor/wrap_future chain would cost one more event-loop pass per batch.
        work.add_done_callback(partial(self._from_worker, batch, waits, tracker))

    def _from_worker(
        self,
        batch: list[_Request],
        waits: list[float],
        tracker: asyncio.Future[None],
        work: concurrent.futures.Future[Any],
    ) -> None:
        """Runs in the worker thread (or inline if `work` was already done)."""
        if not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._finish, batch, waits, tracker, work)

    def _finish(
        self,
        batch: list[_Request],
        waits: list[float],
        tracker: asyncio.Future[None],
        work: concurrent.futures.Future[Any],
    ) -> None:
        self._slots.release()
        self._running.discard(tracker)
        tracker.set_result(None)
        self._inflight -= len(batch)
        self._resolved += len(batch)
        rows = sum(r.rows for r in batch)
        exc = (
            ModelUnavailableError("batch cancelled", reason="stopped")
            if work.cancelled()
            else work.exception()
        )
        if exc is not None:
            if isinstance(exc, KilnError):
                log.warning("model %r: batch of %d rows failed: %s", self._name, rows, exc)
            else:
                log.error("model %r: batch of %d rows failed", self._name, rows, exc_info=exc)
                exc = BackendError(f"model {self._name!r}: batch of {rows} rows failed: {exc}")
            for req in batch:  # one exception fanned out to every waiter of this batch only
                if not req.future.done():
                    req.future.set_exception(exc)
            return
        results, compute_seconds = work.result()
        for req, out in zip(batch, results, strict=True):
            if not req.future.done():
                req.future.set_result(out)
        if self._observer is not None:
            self._observer.on_batch(
                rows=rows, requests=len(batch), queue_seconds=waits, compute_seconds=compute_seconds
            )

    def _drop(self, reason: str) -> None:
        self.dropped[reason] += 1
        if self._observer is not None:
            self._observer.on_dropped(reason)

    def _fail_queued(self, exc: KilnError) -> None:
        while self._queue:
            req = self._queue.popleft()
            if not req.future.done():
                req.future.set_exception(exc)
        self._queued_rows = 0

    # -- worker thread ---------------------------------------------------------------------------

    def _compute(
        self,
        inputs: list[Mapping[str, np.ndarray]],
        rows: list[int],
        started: threading.Event | None = None,
    ) -> tuple[list[dict[str, np.ndarray]], float]:
        """Concatenate, infer, check the output batch, slice back per request (off the event loop)."""
        merged = (
            inputs[0] if len(inputs) == 1 else {k: np.concatenate([i[k] for i in inputs]) for k in inputs[0]}
        )
        if started is not None:
            started.set()  # the dispatching loop may go on: infer releases the GIL right away
        start = time.perf_counter()
        outputs = self._backend.infer(merged)
        seconds = time.perf_counter() - start
        total = sum(rows)
        for name, array in outputs.items():
            if array.ndim == 0 or array.shape[0] != total:
                raise BackendError(f"output {name!r} has batch {array.shape[:1]}, expected {total} rows")
        results, offset = [], 0
        for n in rows:
            results.append({k: v[offset : offset + n] for k, v in outputs.items()})
            offset += n
        return results, seconds
