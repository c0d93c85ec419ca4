"""Dynamic batching in front of one backend (one model version's instance group).

Shape of the thing (Triton's dynamic batcher, in Python): `submit` validates a request on the
event loop, appends it with a future and a monotonic deadline to a bounded queue shared with one
worker thread per backend instance, and awaits the future. Each worker forms its own batches: it
waits until the queue holds `max_batch_size` rows (or the smallest preferred size) or the oldest
request has waited `max_queue_delay_us`, drops cancelled and expired requests, concatenates, runs
`backend.infer`, checks the output batch, slices it back per request and hands the results to the
event loop with one `call_soon_threadsafe` per batch. Just before that, the batch's taps see it
whole (inputs as run, outputs, compute time) in the worker: prediction metrics take its class
output (counted later, many batches at once) and a shadow candidate is offered a sampled copy,
per batch and off the event loop.

Fairness: the queue is one FIFO per client (the caller passes a key, e.g. the gRPC peer, so one
connection is one client) and batches are filled round-robin across clients, one request each
per pass. A client with a deep backlog (an abandoned stream, a bulk job) therefore cannot push
another client's request further back than the batches already running; and one client may hold
at most `max_queue_per_client` of the `max_queue_size` slots, so it can never fill the queue alone.

Why the workers take batches themselves rather than an event-loop task dispatching them: under
load the loop is busy with gRPC events, and every batch that waited for a loop pass to be formed
and dispatched left the model idle meanwhile (measured: benchmarks/RESULTS-serving.md). Now a
worker that finishes a batch starts the next one at once with whatever queued while it computed;
the loop only appends requests and delivers results.

Pipelining (`pipeline`, the `batch_pipelining` setting): under sustained load, a worker that took
every request outstanding into one batch leaves the event loop nothing to do while it computes,
and then finds nothing queued itself while the loop answers that batch and the clients send
again, and the next batch is a lone row (ResNet-20 at concurrency 16: a quarter of the batches
held 9-16 rows and 3.5 % one, and the model idled between them). So while
the workers compute back to back (the last batch ended less than its own compute time ago), a
batch takes at most half the rows outstanding (queued, or in batches not yet answered; at least
2): two batches stay in flight, one computing while the loop answers the other and gathers the
next. A burst that finds the workers idle still goes as one batch.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

# kiln serve's defaults (ServeConfig and config.pbtxt take the same ones)
from serving.contract.serving_defaults import MAX_QUEUE_DELAY_US, MAX_QUEUE_SIZE, PREFERRED_BATCH_SIZES
from serving.errors import (
    BackendError,
    DeadlineExceededError,
    KilnError,
    ModelUnavailableError,
    QueueFullError,
)
from serving.runtime.backends.base import LOOP_HAS_WORK, Backend, CheckedBatch, validate_inputs
from serving.runtime.latency_target import LatencyPolicy
from serving.runtime.solo import SoloGate

__all__ = ["BatchObserver", "BatchTap", "BatchTiming", "ComputedBatch", "DynamicBatcher"]

log = logging.getLogger(__name__)

_Outputs = dict[str, np.ndarray]


class BatchObserver(Protocol):
    """Timing hooks (e.g. Prometheus via `KilnMetrics.batch_observer`); called on the event loop."""

    def on_batch(
        self, *, rows: int, requests: int, queue_seconds: Sequence[float], compute_seconds: float
    ) -> None: ...

    def on_dropped(self, reason: str, count: int = 1) -> None: ...


@dataclass(frozen=True, slots=True, eq=False)
class BatchTiming:
    """The batch that served a request, one object per batch (its requests share it, so a caller
    whose rows went out in several requests can tell one batch from two)."""

    rows: int
    compute_seconds: float  # backend time of this batch alone, not of whatever finished last


_Served = tuple[_Outputs, BatchTiming]


@dataclass(frozen=True, slots=True, eq=False)
class ComputedBatch:
    """A batch the backend answered, as its taps see it (just before its answers are delivered)."""

    inputs: Mapping[str, np.ndarray]  # the batch as the backend ran it (requests concatenated)
    outputs: Mapping[str, np.ndarray]
    requests: int
    compute_seconds: float


BatchTap = Callable[[ComputedBatch], None]  # called in the worker thread; must not block


@dataclass(slots=True, eq=False)
class _Request:
    inputs: Mapping[str, np.ndarray]
    rows: int
    future: asyncio.Future[_Served]
    deadline: float | None  # time.monotonic() value
    enqueued: float
    client: Hashable


class DynamicBatcher:
    """Batches concurrent `submit` calls into `backend.infer` calls; see the module docstring."""

    def __init__(
        self,
        backend: Backend,
        *,
        max_batch_size: int | None = None,
        max_queue_delay_us: int = MAX_QUEUE_DELAY_US,
        preferred_batch_sizes: Sequence[int] = PREFERRED_BATCH_SIZES,
        max_queue_size: int = MAX_QUEUE_SIZE,  # requests, not rows
        max_queue_per_client: int | None = None,
        instances: int | None = None,
        observer: BatchObserver | None = None,
        name: str = "model",
        latency_target_us: int | None = None,
        taps: Sequence[BatchTap] = (),
        solo: SoloGate | None = None,
        pipeline: bool = False,
    ) -> None:
        self._backend, self._name, self._observer = backend, name, observer
        # see each computed batch in the worker thread (prediction metrics, shadow copies): per batch
        # and off the event loop, where per request counting cost ~17 % of served throughput at c16
        self._taps = list(taps)
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
        # latency_target_us replaces the fixed delay with one chosen per batch (runtime/latency_target.py)
        self._policy = (
            None if latency_target_us is None else LatencyPolicy(latency_target_us / 1e6, self._max_batch)
        )
        self._max_queue = max_queue_size
        self._max_per_client = max_queue_size if max_queue_per_client is None else max_queue_per_client
        if not 1 <= self._max_per_client <= max_queue_size:
            raise ValueError(
                f"max_queue_per_client must be in [1, {max_queue_size}], got {self._max_per_client}"
            )
        self._instances = instances or getattr(backend, "instances", 1)
        # a request alone in the process is computed on the event loop (serving/runtime/solo.py)
        self._solo = solo
        self._solo_row_s: float | None = None  # recent compute seconds per row of one-request batches
        self._pipeline = pipeline
        # Everything below is shared with the workers and guarded by _cond.
        self._cond = threading.Condition()
        # One FIFO per client; dict order is the round-robin ring (a served client moves to the end).
        self._queues: dict[Hashable, collections.deque[_Request]] = {}
        self._queued = self._queued_rows = self._inflight = self._inflight_rows = 0
        # when the last worker batch finished computing (time.monotonic()) and how long it took
        self._last_end = self._last_compute_s = 0.0
        self._accepting = self._closing = False
        self._workers: list[threading.Thread] = []
        self._batches_out = 0  # batches whose results the loop has not delivered yet
        self._drained: asyncio.Future[None] | None = None  # set when stop() waits on _batches_out
        self.dropped = {"expired": 0, "cancelled": 0}
        self.inline_batches = 0  # requests computed on the event loop (solo)

    @property
    def queue_depth(self) -> int:
        """Requests waiting (not yet in a batch)."""
        return self._queued

    @property
    def inflight(self) -> int:
        """Requests in batches being computed."""
        return self._inflight

    @property
    def pipelining(self) -> bool:
        """Whether batches under sustained load take at most half the rows outstanding."""
        return self._pipeline

    @property
    def max_batch_size(self) -> int:
        """Largest batch (rows) this batcher forms."""
        return self._max_batch

    def start(self) -> None:
        """Start one worker thread per backend instance; results go to the running event loop."""
        if self._workers or self._closing:
            raise RuntimeError(f"batcher {self._name!r} was already started")
        self._loop = asyncio.get_running_loop()
        self._accepting = True
        for i in range(self._instances):
            worker = threading.Thread(target=self._work, name=f"kiln-{self._name}-{i}", daemon=True)
            worker.start()
            self._workers.append(worker)

    async def stop(self, *, drain: bool = True) -> None:
        """Stop accepting; finish queued work (drain) or fail it with UNAVAILABLE; await running batches."""
        self._accepting = False
        if not self._workers:
            return
        if not drain:
            self._fail_queued(
                ModelUnavailableError(
                    f"model {self._name!r} stopped before running the request", reason="stopped"
                )
            )
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        workers = [w for w in self._workers if w.is_alive()]
        if workers:
            await asyncio.to_thread(lambda: [w.join() for w in workers])
        if self._batches_out:  # results the workers posted before exiting, not yet delivered
            self._drained = self._loop.create_future()
            await self._drained

    def hurry(self) -> None:
        """Stop waiting for fuller batches (the server is draining: no company is coming)."""
        with self._cond:
            self._delay, self._policy = 0.0, None
            self._cond.notify_all()

    def fail_queued(self, message: str) -> None:
        """Answer every queued request UNAVAILABLE (retryable) now; running batches finish."""
        self._fail_queued(ModelUnavailableError(message, reason="stopped"))

    async def submit(
        self, inputs: Mapping[str, np.ndarray], *, deadline: float | None = None, client: Hashable = None
    ) -> _Outputs:
        """Queue one request (any batch up to max_batch_size rows) and await its outputs.

        `deadline` is a `time.monotonic()` value; an expired request never reaches the backend.
        `client` keys the fair share (see the module docstring); None is one shared client.
        Raises InvalidInputError, QueueFullError, DeadlineExceededError, ModelUnavailableError or
        the batch's BackendError. The request is queued before the first await.
        """
        outputs, _ = await self.submit_timed(inputs, deadline=deadline, client=client)
        return outputs

    async def submit_timed(
        self, inputs: Mapping[str, np.ndarray], *, deadline: float | None = None, client: Hashable = None
    ) -> tuple[_Outputs, BatchTiming]:
        """As `submit`, plus the timing of the batch that served this very request."""
        if self._solo is None:
            return await self._enqueue(inputs, deadline, client)
        self._solo.enter()
        try:
            return await self._enqueue(inputs, deadline, client)
        finally:
            self._solo.leave()

    def _enqueue(
        self, inputs: Mapping[str, np.ndarray], deadline: float | None, client: Hashable
    ) -> asyncio.Future[_Served]:
        """Validate and queue one request now (no await: see ModelManager's hot swap)."""
        if not self._accepting:
            raise ModelUnavailableError(f"model {self._name!r} is not accepting requests", reason="stopped")
        rows = validate_inputs(self._backend.inputs, inputs, self._max_batch)
        now = time.monotonic()
        if deadline is not None and deadline <= now:
            self._drop("expired")
            raise DeadlineExceededError(f"deadline expired before the request for {self._name!r} was queued")
        future: asyncio.Future[_Served] = self._loop.create_future()
        request = _Request(inputs, rows, future, deadline, now, client)
        if self._solo is not None and self._inline(request):
            return future
        with self._cond:
            if self._queued >= self._max_queue:
                raise QueueFullError(
                    f"queue of model {self._name!r} is full ({self._max_queue} requests waiting; "
                    "max_queue_size)"
                )
            own = self._queues.get(client)
            if own is None:
                own = self._queues[client] = collections.deque()
            elif len(own) >= self._max_per_client:
                raise QueueFullError(
                    f"this client already has {len(own)} requests waiting for model {self._name!r} "
                    "(max_queue_per_client)"
                )
            own.append(request)
            self._queued += 1
            self._queued_rows += rows
            self._cond.notify()
        return future

    def _inline(self, request: _Request) -> bool:
        """Compute a request alone in the process here, on the event loop, if it is predicted to be
        short (serving/runtime/solo.py); its future is then done. False: queue it as usual."""
        assert self._solo is not None
        per_row = self._solo_row_s
        if per_row is None or per_row * request.rows > self._solo.max_compute_s:
            return False
        if not self._solo.alone(request.enqueued):
            return False
        with self._cond:  # nothing queued or running: no worker can want the instance meanwhile
            if self._queued or self._batches_out:
                return False
            if (self._delay if self._policy is None else self._policy.wait()) > 0:
                return False  # the settings ask lone requests to wait for company
            self._inflight += 1
            self._inflight_rows += request.rows
            self._batches_out += 1
        computed = None
        alone = LOOP_HAS_WORK.set(False)  # the loop itself computes: nothing else to do meanwhile
        try:
            results, computed = self._compute([request.inputs], [request.rows])
            outcome: tuple[list[_Outputs], float] | BaseException = (results, computed.compute_seconds)
            if self._policy is not None:
                with self._cond:
                    self._policy.computed(request.rows, computed.compute_seconds, 1)
        except Exception as exc:  # delivered to this request, as a worker would
            outcome = exc
        finally:
            LOOP_HAS_WORK.reset(alone)
        if computed is not None and self._taps:
            self._tap(computed)
        self._finish([request], [0.0], outcome)
        self.inline_batches += 1
        return True

    # -- worker threads ----------------------------------------------------------------------------

    def _work(self) -> None:
        while (batch := self._next_batch()) is not None:
            waits = [time.monotonic() - r.enqueued for r in batch]
            computed = None
            if self._solo is not None:  # requests beside this batch's: the loop's work meanwhile
                LOOP_HAS_WORK.set(self._solo.in_flight > len(batch))
            try:
                results, computed = self._compute([r.inputs for r in batch], [r.rows for r in batch])
                seconds = computed.compute_seconds
                with self._cond:
                    self._last_end, self._last_compute_s = time.monotonic(), seconds
                    if self._policy is not None:
                        self._policy.computed(sum(r.rows for r in batch), seconds, len(batch))
                outcome: tuple[list[_Outputs], float] | BaseException = (results, seconds)
            except BaseException as exc:  # delivered to this batch's waiters only
                outcome = exc
            if computed is not None and self._taps:
                self._tap(computed)  # before the answers go: a scrape after one sees its batch counted
            if not self._post(self._finish, batch, waits, outcome):
                return  # the event loop is gone: nobody is waiting any more

    def _next_batch(self) -> list[_Request] | None:
        """Block until a batch is due (see the module docstring); None once closing and empty."""
        with self._cond:
            while True:
                if not self._queued:
                    if self._closing:
                        return None
                    self._cond.wait()
                    continue
                now = time.monotonic()
                wait = self._delay if self._policy is None else self._policy.wait()
                due = min(q[0].enqueued for q in self._queues.values()) + wait
                if self._closing or now >= due or self._queued_rows >= self._trigger:
                    batch = self._take(now, timed_out=self._closing or now >= due)
                    if batch:
                        self._inflight += len(batch)
                        self._inflight_rows += sum(r.rows for r in batch)
                        self._batches_out += 1
                        return batch
                    continue
                self._cond.wait(due - now)

    def _take(self, now: float, *, timed_out: bool) -> list[_Request]:
        """Requests up to max rows, round-robin over clients, dropping cancelled/expired ones;
        honours preferred sizes.

        Called with _cond held. Futures are only read here; expired ones are failed on the loop.
        """
        taken, rows, expired = [], 0, []
        limit = self._limit(now)
        progress = True
        while progress and rows < limit and self._queued:
            progress = False
            for client in list(self._queues):  # one pass: at most one request per client
                queue = self._queues[client]
                req = queue[0]
                if req.future.done():
                    self._post(self._drop, "cancelled")
                elif req.deadline is not None and req.deadline <= now:
                    expired.append(req)
                elif rows + req.rows > (limit if taken else self._max_batch):
                    continue  # too big for what is left; it leads the next batch (it stays ahead)
                else:
                    taken.append(req)
                    rows += req.rows
                self._pop(client)
                progress = True
                if rows >= limit:
                    break
        if expired:
            self._post(self._expire, expired, now)
        if timed_out or rows >= limit:
            return taken
        if not self._queued and rows < self._trigger:  # drops shrank the batch below the trigger
            keep = 0
        else:  # early trigger: the longest prefix whose size is preferred (else all of it)
            sizes = np.cumsum([r.rows for r in taken]).tolist()
            keep = max((i + 1 for i, s in enumerate(sizes) if s in self._preferred), default=len(taken))
        for req in reversed(taken[keep:]):  # back to the head of their own client's queue
            self._queues.setdefault(req.client, collections.deque()).appendleft(req)
            self._queued += 1
            self._queued_rows += req.rows
        return taken[:keep]

    def _limit(self, now: float) -> int:
        """Rows the next batch may take: max_batch_size, or while pipelining under sustained load
        half the rows outstanding (see the module docstring). Called with _cond held."""
        if not self._pipeline or now - self._last_end >= self._last_compute_s:
            return self._max_batch
        half = -(-(self._queued_rows + self._inflight_rows) // 2)
        return min(self._max_batch, max(2, half))

    def _pop(self, client: Hashable) -> None:
        """Remove the head of `client`'s queue; the client moves to the end of the ring."""
        queue = self._queues.pop(client)
        req = queue.popleft()
        self._queued -= 1
        self._queued_rows -= req.rows
        if queue:
            self._queues[client] = queue

    def _compute(
        self, inputs: list[Mapping[str, np.ndarray]], rows: list[int]
    ) -> tuple[list[_Outputs], ComputedBatch]:
        """Concatenate, infer, check the output batch, slice back per request. Each request passed
        validate_inputs in `_enqueue`, so the batch goes as a CheckedBatch (not checked again)."""
        total = sum(rows)
        merged = CheckedBatch(
            inputs[0] if len(inputs) == 1 else {k: np.concatenate([i[k] for i in inputs]) for k in inputs[0]},
            total,
        )
        start = time.perf_counter()
        outputs = self._backend.infer(merged)
        seconds = time.perf_counter() - start
        for name, array in outputs.items():
            if array.ndim == 0 or array.shape[0] != total:
                raise BackendError(f"output {name!r} has batch {array.shape[:1]}, expected {total} rows")
        results, offset = [], 0
        for n in rows:
            results.append({k: v[offset : offset + n] for k, v in outputs.items()})
            offset += n
        return results, ComputedBatch(merged, outputs, len(rows), seconds)

    def _tap(self, computed: ComputedBatch) -> None:
        """Every tap; one that fails is the server's fault, not the batch's: logged once and dropped."""
        for tap in list(self._taps):
            try:
                tap(computed)
            except Exception:
                log.error("model %r: a batch tap failed; it is off from now on", self._name, exc_info=True)
                self._taps.remove(tap)

    def _post(self, callback: Callable[..., object], *args: object) -> bool:
        """Run `callback(*args)` on the event loop; False if the loop has closed."""
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # loop closed
            return False
        return True

    # -- event loop ----------------------------------------------------------------------------------

    def _finish(
        self,
        batch: list[_Request],
        waits: list[float],
        outcome: tuple[list[_Outputs], float] | BaseException,
    ) -> None:
        rows = sum(r.rows for r in batch)
        with self._cond:
            self._inflight -= len(batch)
            self._inflight_rows -= rows
            self._batches_out -= 1
        if self._batches_out == 0 and self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        if isinstance(outcome, BaseException):
            exc = outcome
            if isinstance(exc, KilnError):
                log.warning("model %r: batch of %d rows failed: %s", self._name, rows, exc)
            else:
                log.error("model %r: batch of %d rows failed", self._name, rows, exc_info=exc)
                exc = BackendError(f"model {self._name!r}: batch of {rows} rows failed: {exc}")
            for req in batch:  # one exception fanned out to every waiter of this batch only
                if not req.future.done():
                    req.future.set_exception(exc)
            return
        results, compute_seconds = outcome
        if self._solo is not None and len(batch) == 1:  # what the next lone request would cost inline
            last = compute_seconds / max(rows, 1)
            known = self._solo_row_s
            self._solo_row_s = last if known is None else 0.8 * known + 0.2 * last
        timing = BatchTiming(rows=rows, compute_seconds=compute_seconds)
        for req, out in zip(batch, results, strict=True):
            if not req.future.done():
                req.future.set_result((out, timing))
        if self._observer is not None:
            self._observer.on_batch(
                rows=rows, requests=len(batch), queue_seconds=waits, compute_seconds=compute_seconds
            )

    def _expire(self, expired: list[_Request], now: float) -> None:
        for req in expired:
            if req.future.done():
                self._drop("cancelled")
                continue
            req.future.set_exception(
                DeadlineExceededError(f"deadline expired after {now - req.enqueued:.4f}s in the queue")
            )
            self._drop("expired")

    def _drop(self, reason: str) -> None:
        self.dropped[reason] += 1
        if self._observer is not None:
            self._observer.on_dropped(reason)

    def _fail_queued(self, exc: KilnError) -> None:
        with self._cond:
            failed = [req for queue in self._queues.values() for req in queue]
            self._queues.clear()
            self._queued = self._queued_rows = 0
        for req in failed:
            if not req.future.done():
                req.future.set_exception(exc)
