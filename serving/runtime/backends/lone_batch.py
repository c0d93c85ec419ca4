"""1-row batches on a second, spinning ONNX Runtime session (CPU, `lone_batch_spinning`).

With intra-op spinning off, each op of a batch wakes the pool's sleeping threads: a lone
ResNet-20 row took 0.84 ms on 2 threads, ~0.3 ms of it wake-ups, and 0.54 ms with spinning on.
Spinning through every batch, though, takes the cores that gRPC's event loop needs under load
(served c16 x0.98, c64 x0.94; benchmarks/RESULTS-serving.md). A 1-row batch is what a server
without load computes, so only those run on a spinning session (its spinning stopped when the
Run returns), at the price of the model's memory twice. For a large model the wake-ups are a
small share of a batch (ResNet-50: 25 ms either way), so "auto" keeps the second session only
where it measured faster at load.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping

import numpy as np

from serving.runtime.backends.ort_runners import SessionRunner

__all__ = ["LoneBatchRunner", "spinning_pays"]

# "auto" does not try a spinning session for a model whose lone row takes longer than this:
# wake-ups (~10-20 us per op) are then a few per cent at most
MAX_PLAIN_MS = 10.0
MIN_GAIN = 0.9  # kept if its median lone-row time is at most this share of the plain session's
_WARM_RUNS, _TIMED_RUNS = 3, 15


class LoneBatchRunner:
    """Runs 1-row batches on `lone` (spinning), every other batch on `batched`."""

    def __init__(self, batched: SessionRunner, lone: SessionRunner) -> None:
        self.batched, self.lone = batched, lone
        self.lone_batches = 0  # run on `lone` (one thread at a time uses a runner: the pool's rule)

    def run(self, inputs: Mapping[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
        if rows != 1:
            return self.batched.run(inputs, rows)
        self.lone_batches += 1
        return self.lone.run(inputs, rows)

    def close(self) -> None:
        self.batched.close()
        self.lone.close()


def lone_row_ms(runner: SessionRunner, row: Mapping[str, np.ndarray], runs: int) -> float:
    """Median milliseconds of `runs` lone-row runs."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        runner.run(row, 1)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def spinning_pays(
    plain: SessionRunner, make_spinning: Callable[[], SessionRunner], row: Mapping[str, np.ndarray]
) -> tuple[SessionRunner | None, float, float | None]:
    """Measure a lone row on `plain`, then (if short enough to gain) on a spinning session.

    Returns (the spinning runner if it is faster by MIN_GAIN else None, plain ms, spinning ms or
    None when not tried). The two are timed in alternating rounds so drift hits both alike.
    """
    lone_row_ms(plain, row, _WARM_RUNS)
    plain_ms = lone_row_ms(plain, row, _WARM_RUNS)
    if plain_ms > MAX_PLAIN_MS:
        return None, plain_ms, None
    spinning = make_spinning()
    lone_row_ms(spinning, row, _WARM_RUNS)
    plain_times, spin_times = [], []
    for _ in range(_TIMED_RUNS):
        plain_times.append(lone_row_ms(plain, row, 1))
        spin_times.append(lone_row_ms(spinning, row, 1))
    plain_ms, spin_ms = statistics.median(plain_times), statistics.median(spin_times)
    if spin_ms <= MIN_GAIN * plain_ms:
        return spinning, plain_ms, spin_ms
    spinning.close()
    return None, plain_ms, spin_ms
