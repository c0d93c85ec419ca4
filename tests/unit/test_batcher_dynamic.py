"""DynamicBatcher against a real in-process backend object that records what it was asked to run."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

import numpy as np
import pytest

from serving.errors import (
    BackendError,
    DeadlineExceededError,
    InvalidInputError,
    ModelUnavailableError,
    QueueFullError,
)
from serving.runtime.backends import TensorSpec
from serving.runtime.batcher import DynamicBatcher


class RecordingBackend:
    """y = 2x + 1 row-wise. Records every batch; `gate` (when set) holds infer until opened."""

    def __init__(self, *, max_batch_size: int = 8, instances: int = 1) -> None:
        self.inputs = (TensorSpec("x", "FP32", (-1, 2)),)
        self.outputs = (TensorSpec("y", "FP32", (-1, 2)),)
        self.max_batch_size = max_batch_size
        self.instances = instances
        self.batches: list[np.ndarray] = []
        self.gate: threading.Event | None = None
        self.entered = threading.Semaphore(0)  # released once per infer call, before the gate
        self.fail_if: Callable[[np.ndarray], bool] = lambda x: False
        self.bad_output_rows = False
        self.concurrent = self.max_concurrent = 0
        self._lock = threading.Lock()

    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = inputs["x"]
        with self._lock:
            self.batches.append(x.copy())
            self.concurrent += 1
            self.max_concurrent = max(self.max_concurrent, self.concurrent)
        self.entered.release()
        try:
            if self.gate is not None:
                assert self.gate.wait(10), "test gate never opened"
            if self.fail_if(x):
                raise RuntimeError("kaboom")
            y = x * 2 + 1
            return {"y": y[:-1] if self.bad_output_rows else y}
        finally:
            with self._lock:
                self.concurrent -= 1

    def close(self) -> None:
        pass

    def rows(self) -> list[int]:
        return [len(b) for b in self.batches]


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 20))


def x(*values: float) -> dict[str, np.ndarray]:
    """A request with one row per value: [[v, -v], ...]."""
    return {"x": np.array([[v, -v] for v in values], dtype=np.float32)}


async def wait_entered(backend: RecordingBackend, count: int = 1) -> None:
    for _ in range(count):
        assert await asyncio.to_thread(backend.entered.acquire, True, 10)


def test_concurrent_requests_form_one_batch_and_results_are_scattered() -> None:
    async def main() -> None:
        backend = RecordingBackend(max_batch_size=8)
        batcher = DynamicBatcher(backend, max_queue_delay_us=200_000)
        batcher.start()
        results = await asyncio.gather(*(batcher.submit(x(i)) for i in range(8)))
        await batcher.stop()
        assert backend.rows() == [8]  # full at max_batch_size: went before the 200 ms delay
        for i, out in enumerate(results):
            np.testing.assert_array_equal(out["y"], [[2 * i + 1, -2 * i + 1]])

    run(main())


def test_batches_never_exceed_max_batch_size() -> None:
    async def main() -> None:
        backend = RecordingBackend(max_batch_size=8)
        batcher = DynamicBatcher(backend, max_batch_size=4, max_queue_delay_us=50_000)
        batcher.start()
        await asyncio.gather(*(batcher.submit(x(i)) for i in range(10)))
        await batcher.stop()
        assert sum(backend.rows()) == 10
        assert max(backend.rows()) <= 4
        assert backend.rows()[:2] == [4, 4]

    run(main())


def test_queue_delay_is_honoured_for_a_lone_request() -> None:
    async def main() -> tuple[float, list[int]]:
        backend = RecordingBackend(max_batch_size=8)
        batcher = DynamicBatcher(backend, max_queue_delay_us=100_000)
        batcher.start()
        start = time.monotonic()
        await batcher.submit(x(1))
        elapsed = time.monotonic() - start
        await batcher.stop()
        return elapsed, backend.rows()

    elapsed, rows = run(main())
    assert rows == [1]
    assert 0.09 <= elapsed < 2.0  # waited for company (the delay), then went alone


def test_requests_within_the_delay_join_the_same_batch() -> None:
    async def main() -> None:
        backend = RecordingBackend(max_batch_size=8)
        batcher = DynamicBatcher(backend, max_queue_delay_us=300_000)
        batcher.start()
        first = asyncio.ensure_future(batcher.submit(x(1)))
        await asyncio.sleep(0.02)
        second = asyncio.ensure_future(batcher.submit(x(2, 3)))
        await asyncio.gather(first, second)
        await batcher.stop()
        assert backend.rows() == [3]

    run(main())


def test_preferred_batch_size_goes_without_waiting_for_the_delay() -> None:
    async def main() -> None:
        backend = RecordingBackend(max_batch_size=8)
        batcher = DynamicBatcher(backend, max_queue_delay_us=5_000_000, preferred_batch_sizes=(2,))
        batcher.start()
        start = time.monotonic()
        await asyncio.gather(batcher.submit(x(1)), batcher.submit(x(2)))
        assert time.monotonic() - start < 2.0  # not the 5 s delay
        await batcher.stop()
        assert backend.rows() == [2]

    run(main())


def test_preferred_size_is_cut_from_a_longer_queue() -> None:
    async def main() -> None:
        backend = RecordingBackend(max_batch_size=8)
        backend.gate = threading.Event()
        # The delay must outlast the blocker under a loaded CI box, or the 6 queued rows go together.
        batcher = DynamicBatcher(backend, max_queue_delay_us=500_000, preferred_batch_sizes=(4,))
        batcher.start()
        blocker = asyncio.ensure_future(batcher.submit(x(0, 0, 0, 0)))
        await wait_entered(backend)  # the only instance is busy: the next 6 rows queue up
        rest = [asyncio.ensure_future(batcher.submit(x(i))) for i in range(6)]
        await asyncio.sleep(0.01)
        backend.gate.set()
        await asyncio.gather(blocker, *rest)
        await batcher.stop()
        assert backend.rows() == [4, 4, 2]  # 4 preferred at once, the last 2 after the delay

    run(main())


def test_multi_row_requests_are_merged_and_sliced_back() -> None:
    async def main() -> None:
        backend = RecordingBackend(max_batch_size=8)
        batcher = DynamicBatcher(backend, max_queue_delay_us=100_000)
        batcher.start()
        a, b, c = await asyncio.gather(
            batcher.submit(x(1, 2, 3)), batcher.submit(x(4)), batcher.submit(x(5, 6))
        )
        await batcher.stop()
        assert backend.rows() == [6]
        np.testing.assert_array_equal(a["y"][:, 0], [3, 5, 7])
        np.testing.assert_array_equal(b["y"][:, 0], [9])
        np.testing.assert_array_equal(c["y"][:, 0], [11, 13])

    run(main())


def test_a_request_that_does_not_fit_waits_for_the_next_batch() -> None:
    async def main() -> None:
        backend = RecordingBackend(max_batch_size=4)
        batcher = DynamicBatcher(backend, max_queue_delay_us=50_000)
        batcher.start()
        await asyncio.gather(batcher.submit(x(1, 2, 3)), batcher.submit(x(4, 5)))
        await batcher.stop()
        assert backend.rows() == [3, 2]

    run(main())


def test_expired_request_never_reaches_the_backend() -> None:
    async def main() -> None:
        backend = RecordingBackend(max_batch_size=8)
        backend.gate = threading.Event()
        batcher = DynamicBatcher(backend, max_queue_delay_us=0)
        batcher.start()
        blocker = asyncio.ensure_future(batcher.submit(x(1)))
        await wait_entered(backend)
        doomed = asyncio.ensure_future(batcher.submit(x(99), deadline=time.monotonic() + 0.05))
        ok = asyncio.ensure_future(batcher.submit(x(2)))
        await asyncio.sleep(0.1)  # the deadline passes while the only instance is busy
        backend.gate.set()
        with pytest.raises(DeadlineExceededError):
            await doomed
        await asyncio.gather(blocker, ok)
        await batcher.stop()
        assert 99 not in np.concatenate(backend.batches)[:, 0]
        assert backend.rows() == [1, 1]
        assert batcher.dropped == {"expired": 1, "cancelled": 0}

    run(main())


def test_already_expired_deadline_is_refused_at_submit() -> None:
    async def main() -> None:
        backend = RecordingBackend()
        batcher = DynamicBatcher(backend)
        batcher.start()
        with pytest.raises(DeadlineExceededError):
            await batcher.submit(x(1), deadline=time.monotonic() - 1)
        await batcher.stop()
        assert backend.batches == []

    run(main())


def test_cancelled_request_never_reaches_the_backend_and_its_future_is_untouched() -> None:
    async def main() -> None:
        backend = RecordingBackend(max_batch_size=8)
        backend.gate = threading.Event()
        batcher = DynamicBatcher(backend, max_queue_delay_us=0)
        batcher.start()
        blocker = asyncio.ensure_future(batcher.submit(x(1)))
        await wait_entered(backend)
        victim = asyncio.ensure_future(batcher.submit(x(77)))
        await asyncio.sleep(0.01)
        victim.cancel()
        ok = asyncio.ensure_future(batcher.submit(x(2)))
        await asyncio.sleep(0.01)
        backend.gate.set()
        await asyncio.gather(blocker, ok)
        await batcher.stop()
        assert victim.cancelled()  # set_result on a done future would have raised InvalidStateError
        assert 77 not in np.concatenate(backend.batches)[:, 0]
        assert batcher.dropped == {"expired": 0, "cancelled": 1}

    run(main())


def test_cancel_while_computing_does_not_break_the_batch() -> None:
    async def main() -> None:
        backend = RecordingBackend(max_batch_size=8)
        backend.gate = threading.Event()
        batcher = DynamicBatcher(backend, max_queue_delay_us=20_000)
        batcher.start()
        victim = asyncio.ensure_future(batcher.submit(x(1)))
        other = asyncio.ensure_future(batcher.submit(x(2)))
        await wait_entered(backend)
        victim.cancel()  # its future is done before the result arrives: must be skipped silently
        backend.gate.set()
        out = await other
        await batcher.stop()
        assert victim.cancelled()
        np.testing.assert_array_equal(out["y"][:, 0], [5])

    run(main())


def test_full_queue_is_refused_at_once() -> None:
    async def main() -> None:
        backend = RecordingBackend(max_batch_size=1)
        backend.gate = threading.Event()
        batcher = DynamicBatcher(backend, max_queue_size=2)
        batcher.start()
        running = asyncio.ensure_future(batcher.submit(x(0)))
        await wait_entered(backend)
        queued = [asyncio.ensure_future(batcher.submit(x(i))) for i in (1, 2)]
        await asyncio.sleep(0.01)
        assert batcher.queue_depth == 2 and batcher.inflight == 1
        with pytest.raises(QueueFullError, match="full"):
            await batcher.submit(x(3))
        backend.gate.set()
        await asyncio.gather(running, *queued)
        await batcher.stop()
        assert backend.rows() == [1, 1, 1]

    run(main())


def test_backend_exception_fails_only_its_batch_and_the_next_batch_works() -> None:
    async def main() -> None:
        backend = RecordingBackend(max_batch_size=4)
        backend.fail_if = lambda arr: bool((arr[:, 0] == 13).any())
        batcher = DynamicBatcher(backend, max_queue_delay_us=50_000)
        batcher.start()
        bad = await asyncio.gather(batcher.submit(x(13)), batcher.submit(x(1)), return_exceptions=True)
        good = await batcher.submit(x(2))
        await batcher.stop()
        assert all(isinstance(e, BackendError) for e in bad)
        assert bad[0] is bad[1]  # one exception fanned out
        assert "kaboom" in str(bad[0])
        np.testing.assert_array_equal(good["y"][:, 0], [5])

    run(main())


def test_output_batch_mismatch_is_a_backend_error() -> None:
    async def main() -> None:
        backend = RecordingBackend(max_batch_size=4)
        backend.bad_output_rows = True
        batcher = DynamicBatcher(backend)
        batcher.start()
        with pytest.raises(BackendError, match="expected 2 rows"):
            await batcher.submit(x(1, 2))
        await batcher.stop()

    run(main())


def test_invalid_requests_are_refused_before_queueing() -> None:
    async def main() -> None:
        backend = RecordingBackend(max_batch_size=4)
        batcher = DynamicBatcher(backend)
        batcher.start()
        with pytest.raises(InvalidInputError, match="exceeds the model's max_batch_size 4"):
            await batcher.submit(x(1, 2, 3, 4, 5))
        with pytest.raises(InvalidInputError, match="expected datatype FP32, got FP64"):
            await batcher.submit({"x": np.zeros((1, 2))})
        with pytest.raises(InvalidInputError, match="unknown input"):
            await batcher.submit({"z": np.zeros((1, 2), np.float32)})
        await batcher.stop()
        assert backend.batches == []

    run(main())


def test_stop_with_drain_finishes_queued_work() -> None:
    async def main() -> None:
        backend = RecordingBackend(max_batch_size=2)
        backend.gate = threading.Event()
        batcher = DynamicBatcher(backend, max_queue_delay_us=1_000_000)
        batcher.start()
        pending = [asyncio.ensure_future(batcher.submit(x(i))) for i in range(5)]
        await wait_entered(backend)
        stopping = asyncio.ensure_future(batcher.stop(drain=True))
        await asyncio.sleep(0.01)
        with pytest.raises(ModelUnavailableError):
            await batcher.submit(x(9))
        backend.gate.set()
        await stopping
        results = await asyncio.gather(*pending)
        assert [r["y"][0, 0] for r in results] == [1, 3, 5, 7, 9]
        assert sum(backend.rows()) == 5

    run(main())


def test_stop_without_drain_fails_queued_waiters() -> None:
    async def main() -> None:
        backend = RecordingBackend(max_batch_size=1)
        backend.gate = threading.Event()
        batcher = DynamicBatcher(backend)
        batcher.start()
        running = asyncio.ensure_future(batcher.submit(x(0)))
        await wait_entered(backend)
        queued = [asyncio.ensure_future(batcher.submit(x(i))) for i in (1, 2)]
        await asyncio.sleep(0.01)
        stopping = asyncio.ensure_future(batcher.stop(drain=False))
        await asyncio.sleep(0.01)
        backend.gate.set()
        await stopping
        assert (await running)["y"][0, 0] == 1  # in flight: finished
        for fut in queued:
            with pytest.raises(ModelUnavailableError):
                await fut
        assert backend.rows() == [1]

    run(main())


def test_instances_run_batches_concurrently() -> None:
    async def main() -> None:
        backend = RecordingBackend(max_batch_size=1, instances=2)
        backend.gate = threading.Event()
        batcher = DynamicBatcher(backend)
        batcher.start()
        pending = [asyncio.ensure_future(batcher.submit(x(i))) for i in range(4)]
        await wait_entered(backend, 2)  # two batches inside infer at once
        assert batcher.inflight == 2
        backend.gate.set()
        await asyncio.gather(*pending)
        await batcher.stop()
        assert backend.max_concurrent == 2

    run(main())


def test_batching_off_mode_runs_each_request_alone() -> None:
    async def main() -> None:
        backend = RecordingBackend(max_batch_size=8)
        batcher = DynamicBatcher(backend, max_batch_size=1, max_queue_delay_us=0)
        batcher.start()
        results = await asyncio.gather(*(batcher.submit(x(i)) for i in range(5)))
        await batcher.stop()
        assert backend.rows() == [1] * 5
        assert [r["y"][0, 0] for r in results] == [1, 3, 5, 7, 9]

    run(main())


def test_observer_sees_batches_and_drops() -> None:
    class Observer:
        def __init__(self) -> None:
            self.batches: list[tuple[int, int, int, float]] = []
            self.drops: list[str] = []

        def on_batch(self, *, rows: int, requests: int, queue_seconds: Any, compute_seconds: float) -> None:
            self.batches.append((rows, requests, len(queue_seconds), compute_seconds))

        def on_dropped(self, reason: str, count: int = 1) -> None:
            self.drops.append(reason)

    async def main() -> Observer:
        observer = Observer()
        batcher = DynamicBatcher(RecordingBackend(), max_queue_delay_us=50_000, observer=observer)
        batcher.start()
        await asyncio.gather(batcher.submit(x(1, 2)), batcher.submit(x(3)))
        with pytest.raises(DeadlineExceededError):
            await batcher.submit(x(4), deadline=0.0)
        await batcher.stop()
        return observer

    observer = run(main())
    assert [b[:3] for b in observer.batches] == [(3, 2, 2)]
    assert observer.batches[0][3] >= 0
    assert observer.drops == ["expired"]


def test_bad_configuration_is_refused() -> None:
    with pytest.raises(ValueError, match="max_batch_size must be in"):
        DynamicBatcher(RecordingBackend(max_batch_size=4), max_batch_size=5)
    with pytest.raises(ValueError, match="preferred_batch_sizes"):
        DynamicBatcher(RecordingBackend(max_batch_size=4), preferred_batch_sizes=(8,))


def test_a_backlogged_client_cannot_push_another_client_behind_its_queue() -> None:
    """Round-robin across clients: the late client's request is in the very next batch."""

    async def main() -> None:
        backend = RecordingBackend(max_batch_size=4)
        backend.gate = threading.Event()
        batcher = DynamicBatcher(backend, max_queue_size=64)
        batcher.start()
        first = asyncio.ensure_future(batcher.submit(x(0), client="bulk"))
        await wait_entered(backend)  # the instance is busy: what follows queues
        bulk = [asyncio.ensure_future(batcher.submit(x(1, 1), client="bulk")) for _ in range(20)]
        await asyncio.sleep(0.01)
        late = asyncio.ensure_future(batcher.submit(x(7), client="interactive"))
        await asyncio.sleep(0.01)
        backend.gate.set()
        await asyncio.gather(first, late, *bulk)
        await batcher.stop()
        second_batch = backend.batches[1][:, 0].tolist()
        assert 7.0 in second_batch  # FIFO would have run it after 10 bulk batches

    run(main())


def test_one_client_cannot_take_every_queue_slot() -> None:
    async def main() -> None:
        backend = RecordingBackend(max_batch_size=1)
        backend.gate = threading.Event()
        batcher = DynamicBatcher(backend, max_queue_size=8, max_queue_per_client=3)
        batcher.start()
        first = asyncio.ensure_future(batcher.submit(x(0), client="a"))
        await wait_entered(backend)
        held = [asyncio.ensure_future(batcher.submit(x(1), client="a")) for _ in range(3)]
        await asyncio.sleep(0.01)
        with pytest.raises(QueueFullError, match="max_queue_per_client"):
            await batcher.submit(x(2), client="a")
        other = asyncio.ensure_future(batcher.submit(x(3), client="b"))  # b still gets a slot
        await asyncio.sleep(0.01)
        backend.gate.set()
        await asyncio.gather(first, other, *held)
        await batcher.stop()

    run(main())


def test_each_request_learns_the_timing_of_its_own_batch() -> None:
    async def main() -> None:
        gate = threading.Event()  # holds the first batch in the backend while the others queue
        backend = RecordingBackend(max_batch_size=4)
        backend.gate = gate
        batcher = DynamicBatcher(backend)
        batcher.start()
        first = asyncio.ensure_future(batcher.submit_timed(x(1)))
        await wait_entered(backend)  # the 1-row batch holds the instance: the next two queue
        await asyncio.sleep(0.05)  # ... and it computes for 50 ms more than theirs
        later = [asyncio.ensure_future(batcher.submit_timed(x(v, v))) for v in (2, 3)]
        await asyncio.sleep(0.01)
        gate.set()
        (out, alone), *together = await asyncio.gather(first, *later)
        await batcher.stop()
        assert backend.rows() == [1, 4]
        np.testing.assert_array_equal(out["y"], [[3, -1]])
        assert alone.rows == 1 and alone.compute_seconds >= 0.05
        (_, second), (_, third) = together
        assert second is third and second.rows == 4  # one batch, one timing object
        assert second.compute_seconds < alone.compute_seconds

    run(main())


async def _after_a_held_batch(backend: RecordingBackend, batcher: DynamicBatcher, queued: list[dict]) -> list:
    """One 1-row request computed (held >= 50 ms by the gate) while `queued` wait; then all answered."""
    backend.gate = threading.Event()
    batcher.start()
    first = asyncio.ensure_future(batcher.submit(x(0)))
    await wait_entered(backend)
    rest = [asyncio.ensure_future(batcher.submit(inputs)) for inputs in queued]
    await asyncio.sleep(0.05)  # the held batch's compute time: the next take comes well within it
    backend.gate.set()
    results = await asyncio.gather(first, *rest)
    await batcher.stop()
    return results


def test_pipelining_takes_half_the_outstanding_rows_under_sustained_load() -> None:
    async def main() -> None:
        backend = RecordingBackend(max_batch_size=16)
        batcher = DynamicBatcher(backend, pipeline=True)
        assert batcher.pipelining
        results = await _after_a_held_batch(backend, batcher, [x(i) for i in range(1, 12)])
        # 11 queued + the held request (answered or not yet): half of 12 (or of 11) is 6
        assert backend.rows()[:2] == [1, 6]
        assert sum(backend.rows()) == 12
        for i, out in enumerate(results):
            np.testing.assert_array_equal(out["y"], [[2 * i + 1, -2 * i + 1]])

    run(main())


def test_without_pipelining_the_worker_takes_everything_queued() -> None:
    async def main() -> None:
        backend = RecordingBackend(max_batch_size=16)
        batcher = DynamicBatcher(backend)
        assert not batcher.pipelining
        await _after_a_held_batch(backend, batcher, [x(i) for i in range(1, 12)])
        assert backend.rows() == [1, 11]

    run(main())


def test_pipelining_leaves_a_burst_on_idle_workers_whole() -> None:
    async def main() -> None:
        backend = RecordingBackend(max_batch_size=8)
        batcher = DynamicBatcher(backend, max_queue_delay_us=200_000, pipeline=True)
        batcher.start()
        await asyncio.gather(*(batcher.submit(x(i)) for i in range(8)))
        await batcher.stop()
        assert backend.rows() == [8]  # nothing computed before it: one batch, as without pipelining

    run(main())


def test_pipelining_still_takes_a_request_larger_than_half() -> None:
    async def main() -> None:
        backend = RecordingBackend(max_batch_size=16)
        batcher = DynamicBatcher(backend, pipeline=True)
        # outstanding: 1 held + 6 + 1 rows, half is 4: the 6-row request leads the next batch alone
        results = await _after_a_held_batch(backend, batcher, [x(*range(1, 7)), x(7)])
        assert backend.rows() == [1, 6, 1]
        np.testing.assert_array_equal(results[1]["y"][:, 0], [2 * v + 1 for v in range(1, 7)])

    run(main())
