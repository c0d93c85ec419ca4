"""A request alone in the process is computed on the event loop (serving/runtime/solo.py): the gate's
two tests (nothing else in flight; the loop slept since the last request left), and DynamicBatcher's
inline path against a real in-process backend (which thread ran each batch, its answers, its
statistics and failures, and that concurrent or delayed requests still batch on the worker)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Mapping

import numpy as np
import pytest

from serving.errors import BackendError, DeadlineExceededError
from serving.runtime.backends.base import LOOP_HAS_WORK
from serving.runtime.batcher import DynamicBatcher
from serving.runtime.solo import MIN_IDLE_S, SoloGate
from tests.unit.test_batcher_dynamic import RecordingBackend, run, wait_entered, x


class ThreadRecordingBackend(RecordingBackend):
    """RecordingBackend that also notes the thread each batch ran on and the batcher's hint
    whether the event loop has other requests meanwhile (LOOP_HAS_WORK)."""

    def __init__(self, **kwargs: int) -> None:
        super().__init__(**kwargs)
        self.threads: list[str] = []
        self.loop_had_work: list[bool] = []

    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.threads.append(threading.current_thread().name)
        self.loop_had_work.append(LOOP_HAS_WORK.get())
        return super().infer(inputs)


class Observer:
    def __init__(self) -> None:
        self.batches: list[tuple[int, int]] = []

    def on_batch(self, *, rows: int, requests: int, queue_seconds: object, compute_seconds: float) -> None:
        self.batches.append((rows, requests))

    def on_dropped(self, reason: str, count: int = 1) -> None:
        pass


def _busy(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


# -- the gate -----------------------------------------------------------------------------------


def _next_is_alone(gate: SoloGate, between: Callable[[], object]) -> bool:
    """Whether a request is alone when `between` is what the loop did since the last one left."""
    gate.enter()
    gate.leave()
    between()
    gate.enter()
    try:
        return gate.alone(time.monotonic())
    finally:
        gate.leave()


def test_a_request_after_an_idle_spell_is_alone() -> None:
    # the loop slept: the next request came from outside
    assert _next_is_alone(SoloGate(0.002, memory_s=0.0), lambda: time.sleep(0.002))


def test_two_requests_in_flight_are_not_alone_and_the_gate_remembers() -> None:
    gate = SoloGate(0.002, memory_s=0.05)
    gate.enter()
    gate.enter()  # company
    assert not gate.alone(time.monotonic())
    gate.leave()
    assert not gate.alone(time.monotonic())  # one left, but company was just seen
    gate.leave()
    time.sleep(0.06)
    gate.enter()
    assert gate.alone(time.monotonic())
    gate.leave()


def test_a_request_taken_without_the_loop_sleeping_is_not_alone() -> None:
    """What a loop does after an inline compute under load: the next request was already waiting,
    and the loop worked the whole gap (gRPC handing over the next call)."""
    assert not _next_is_alone(SoloGate(0.002, memory_s=0.0), lambda: _busy(4 * MIN_IDLE_S))


def test_gate_settings_are_checked() -> None:
    with pytest.raises(ValueError):
        SoloGate(0.0)
    with pytest.raises(ValueError):
        SoloGate(0.001, memory_s=-1)


# -- the batcher's inline path ------------------------------------------------------------------


def _started(
    backend: ThreadRecordingBackend, max_compute_s: float = 1.0, **options: object
) -> DynamicBatcher:
    """A started batcher with its own gate (no memory: each request is judged on its own)."""
    batcher = DynamicBatcher(backend, solo=SoloGate(max_compute_s, memory_s=0.0), **options)  # type: ignore[arg-type]
    batcher.start()
    return batcher


async def _lone(batcher: DynamicBatcher, value: float) -> dict[str, np.ndarray]:
    await asyncio.sleep(0.002)  # a lone client's round trip: the loop idles between requests
    return await batcher.submit(x(value))


def test_lone_requests_run_on_the_event_loop_once_their_cost_is_known() -> None:
    async def main() -> None:
        backend, observer = ThreadRecordingBackend(), Observer()
        batcher = _started(backend, observer=observer)
        loop_thread = threading.current_thread().name
        for value in range(4):
            out = await _lone(batcher, value)
            np.testing.assert_array_equal(out["y"], [[2 * value + 1, -2 * value + 1]])
        await batcher.stop()
        # the first taught the batcher what a lone batch costs; the rest ran on the loop
        assert backend.threads[0] != loop_thread
        assert backend.threads[1:] == [loop_thread] * 3
        assert batcher.inline_batches == 3
        assert observer.batches == [(1, 1)] * 4  # statistics see inline batches as any other

    run(main())


def test_concurrent_requests_are_batched_by_the_worker_not_inline() -> None:
    async def main() -> None:
        backend = ThreadRecordingBackend()
        batcher = _started(backend)
        await _lone(batcher, 0)
        await _lone(batcher, 1)  # inline from now on, while alone
        backend.gate = threading.Event()
        burst = [asyncio.ensure_future(batcher.submit(x(v))) for v in range(2, 7)]
        await asyncio.sleep(0.05)
        backend.gate.set()
        results = await asyncio.gather(*burst)
        await batcher.stop()
        for value, out in zip(range(2, 7), results, strict=True):
            np.testing.assert_array_equal(out["y"], [[2 * value + 1, -2 * value + 1]])
        assert batcher.inline_batches == 1  # the second lone request only
        # the burst came without the loop sleeping in between: all of it on the worker, batched
        # (the first may leave alone before the others are queued; the rest wait for it together)
        burst_rows = backend.rows()[2:]
        assert sum(burst_rows) == 5 and len(burst_rows) <= 2, burst_rows
        assert all(t.startswith("kiln-") for t in backend.threads[2:])

    run(main())


def test_a_request_predicted_too_slow_goes_to_the_worker() -> None:
    async def main() -> None:
        backend = ThreadRecordingBackend()
        batcher = _started(backend, 1e-9)  # nothing is short enough
        for value in range(3):
            await _lone(batcher, value)
        await batcher.stop()
        assert batcher.inline_batches == 0
        assert all(t.startswith("kiln-") for t in backend.threads)

    run(main())


def test_a_queue_delay_keeps_lone_requests_waiting_for_company() -> None:
    async def main() -> None:
        backend = ThreadRecordingBackend()
        batcher = _started(backend, max_queue_delay_us=1_000)
        for value in range(3):
            await _lone(batcher, value)
        await batcher.stop()
        assert batcher.inline_batches == 0

    run(main())


def test_an_inline_failure_reaches_its_request_only_and_the_batcher_goes_on() -> None:
    async def main() -> None:
        backend = ThreadRecordingBackend()
        batcher = _started(backend)
        await _lone(batcher, 0)
        backend.fail_if = lambda batch: bool((batch[:, 0] == 13).any())
        with pytest.raises(BackendError, match="kaboom"):
            await _lone(batcher, 13)
        backend.fail_if = lambda batch: False
        out = await _lone(batcher, 2)
        assert batcher.inline_batches == 2
        np.testing.assert_array_equal(out["y"], [[5, -3]])
        backend.bad_output_rows = True  # a broken model: the batch's check, inline as on the worker
        with pytest.raises(BackendError, match="expected 1 rows"):
            await _lone(batcher, 3)
        await batcher.stop()

    run(main())


def test_an_expired_deadline_is_refused_before_any_compute() -> None:
    async def main() -> None:
        backend = ThreadRecordingBackend()
        batcher = _started(backend)
        await _lone(batcher, 0)
        await asyncio.sleep(0.002)
        with pytest.raises(DeadlineExceededError):
            await batcher.submit(x(1), deadline=time.monotonic() - 0.001)
        await batcher.stop()
        assert backend.rows() == [1]

    run(main())


def test_the_worker_tells_the_backend_whether_other_requests_are_in_flight() -> None:
    async def main() -> None:
        backend = ThreadRecordingBackend(max_batch_size=1)  # one request per batch: 3 waits for 2
        gate = SoloGate(1.0, memory_s=0.0)
        batcher = DynamicBatcher(backend, solo=gate)
        batcher.start()
        await _lone(batcher, 0)  # worker, nothing else in flight
        await _lone(batcher, 1)  # inline: the loop computes, so it has nothing else to do
        # from now on nothing is short enough to go inline (the executor thread that wait_entered
        # uses may take the GIL just then, which the gate cannot tell from the loop sleeping)
        gate.max_compute_s = 1e-12
        backend.gate, backend.entered = threading.Event(), threading.Semaphore(0)
        first = asyncio.ensure_future(batcher.submit(x(2)))
        await wait_entered(backend)  # the worker took request 2 while it was alone in flight
        rest = [asyncio.ensure_future(batcher.submit(x(v))) for v in (3, 4)]
        await asyncio.sleep(0.02)
        backend.gate.set()
        await asyncio.gather(first, *rest)
        await batcher.stop()
        assert backend.rows() == [1] * 5
        assert backend.threads[1] == threading.current_thread().name
        # request 3's batch was taken with 4 (at least) waiting: the loop had work meanwhile
        assert backend.loop_had_work[:4] == [False, False, False, True]

    run(main())
