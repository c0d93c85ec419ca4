"""Which ONNX Runtime session runs a batch of a given size (CPU, one instance with 2+ threads).

Two settings add sessions of the same file beside the instance's usual one (N intra-op threads,
spinning off):

- `lone_batch_spinning`: 1-row batches on a session whose pool spins within the batch (stopped
  when the Run returns). With spinning off, every op wakes the pool's sleeping threads: a lone
  ResNet-20 row took 0.84 ms on 2 threads, ~0.3 ms of it wake-ups, 0.54 ms spinning. Spinning
  through every batch, though, takes the cores that gRPC's event loop needs under load (served
  c16 x0.98, c64 x0.94); a 1-row batch is what a server without load computes.
- `single_thread_small_batches`: batches too small to use N threads well run on a one-thread
  session. ResNet-20 on 2 threads is 1.20 / 1.30 / 1.49 / 1.65 / 1.75x one thread at 2 / 4 / 8 /
  16 / 64 rows: below ~75 % parallel efficiency the second core does more for the server as the
  event loop's core than as the batch's (served c16 +6-8 %, benchmarks/RESULTS-serving.md).

Each costs the model's memory once more, and "auto" keeps one only where it measured worth it at
load, and tries neither for a model whose lone row takes over MAX_PLAIN_MS (ResNet-50: 25 ms, the
same either way, and 1.8-2.0x on 2 threads from 2 rows up).
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from serving.runtime.backends.base import LOOP_HAS_WORK, TensorSpec, zero_inputs
from serving.runtime.backends.ort_runners import SessionRunner

__all__ = ["SizedRunner", "run_ms", "single_thread_rows", "sized_runners", "spinning_pays"]

log = logging.getLogger(__name__)

# "auto" tries no extra session for a model whose lone row takes longer than this: its ops are
# large enough that wake-ups are a few per cent and every batch uses the threads well
MAX_PLAIN_MS = 10.0
MIN_GAIN = 0.9  # the spinning twin is kept if a lone row takes at most this share of the plain time
EFFICIENCY = 0.75  # N threads serve a batch size only where they run it >= EFFICIENCY x N times faster
_WARM_RUNS, _TIMED_RUNS, _SIZE_RUNS = 3, 15, 7


class SizedRunner:
    """Runs a batch on the instance's session for its size: 1 row on `lone` (spinning) if set, up
    to `single_rows` rows on `single` (one thread) if set while the event loop has other requests
    to handle (LOOP_HAS_WORK; with none, the spare cores would only idle), anything else on
    `batched`."""

    def __init__(
        self,
        batched: SessionRunner,
        *,
        lone: SessionRunner | None = None,
        single: SessionRunner | None = None,
        single_rows: int = 0,
    ) -> None:
        self.batched, self.lone, self.single, self.single_rows = batched, lone, single, single_rows
        # batches each session ran (one thread at a time uses a runner: the pool's rule)
        self.counts = {"lone": 0, "single": 0, "batched": 0}

    def run(self, inputs: Mapping[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
        if rows == 1 and self.lone is not None:
            self.counts["lone"] += 1
            return self.lone.run(inputs, rows)
        if rows <= self.single_rows and self.single is not None and LOOP_HAS_WORK.get():
            self.counts["single"] += 1
            return self.single.run(inputs, rows)
        self.counts["batched"] += 1
        return self.batched.run(inputs, rows)

    def close(self) -> None:
        for runner in (self.batched, self.lone, self.single):
            if runner is not None:
                runner.close()


def run_ms(runner: SessionRunner, feed: Mapping[str, np.ndarray], runs: int) -> float:
    """Median milliseconds of `runs` runs of the batch `feed`."""
    times = []
    rows = len(next(iter(feed.values())))
    for _ in range(runs):
        start = time.perf_counter()
        runner.run(feed, rows)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def spinning_pays(
    plain: SessionRunner, make_spinning: Callable[[], SessionRunner], row: Mapping[str, np.ndarray]
) -> tuple[SessionRunner | None, float, float]:
    """Time a lone row on `plain` and on a spinning session, in alternating rounds so drift hits
    both alike. Returns (the spinning runner if faster by MIN_GAIN else None, plain ms, spinning ms)."""
    spinning = make_spinning()
    run_ms(spinning, row, _WARM_RUNS)
    plain_times, spin_times = [], []
    for _ in range(_TIMED_RUNS):
        plain_times.append(run_ms(plain, row, 1))
        spin_times.append(run_ms(spinning, row, 1))
    plain_ms, spin_ms = statistics.median(plain_times), statistics.median(spin_times)
    if spin_ms <= MIN_GAIN * plain_ms:
        return spinning, plain_ms, spin_ms
    spinning.close()
    return None, plain_ms, spin_ms


def single_thread_rows(
    single: SessionRunner, plain: SessionRunner, specs: Sequence[TensorSpec], threads: int, max_batch: int
) -> tuple[int, list[tuple[int, float]]]:
    """The largest batch size (2, 4, 8, ... up to max_batch) below which `plain`'s `threads` threads
    run a batch less than EFFICIENCY x threads times faster than `single`; 0 if 2 rows already
    reach it. Returns it and the speedups measured (rows, plain speedup over one thread)."""
    limit, speedups, rows = 0, [], 2
    while rows <= max_batch:
        feed = zero_inputs(specs, rows)
        run_ms(single, feed, 1)
        run_ms(plain, feed, 1)
        one, many = [], []
        for _ in range(_SIZE_RUNS):  # alternating rounds, as above
            one.append(run_ms(single, feed, 1))
            many.append(run_ms(plain, feed, 1))
        speedup = min(one) / min(many)  # the least disturbed run of each: steadier than a median here
        speedups.append((rows, speedup))
        if speedup >= EFFICIENCY * threads:
            break
        limit, rows = rows, rows * 2
    return limit, speedups


def sized_runners(
    plain: list[SessionRunner],
    make: Callable[[bool, int, int], SessionRunner],
    specs: Sequence[TensorSpec],
    *,
    lone: str,
    single: str,
    spinning: bool,
    threads: int,
    max_batch: int,
    name: str,
) -> list[SessionRunner] | list[SizedRunner]:
    """The instances' runners with the extra sessions the settings ask for ("auto": measured on the
    first instance, then made for every instance). `make(spinning, threads, instance)` opens a
    session of the same file for that instance (its cores, where pinned: cpu_pinning.py);
    `spinning`/`threads`: the usual session's. Where the timing runs fail (a row of zeros the
    model cannot run), "auto" adds nothing and warns; warm-up then judges the model."""
    lone = "off" if spinning else lone  # every batch spins already
    if threads < 2 or (lone == "off" and single == "off"):
        return plain  # one thread: no pool to wake, nothing narrower to run on
    twin = single_session = None
    single_rows = 0
    if "auto" in (lone, single):
        try:
            twin, single_session, single_rows = _measure(
                plain[0], make, specs, lone == "auto", single == "auto", threads, max_batch, name
            )
        except Exception as exc:
            log.warning("%s: no timing runs (%s): no extra session chosen by measurement", name, exc)
    if lone == "on":
        twin = make(True, threads, 0)
    if twin is None and not single_rows:
        return plain
    return [
        SizedRunner(
            batched,
            lone=None if twin is None else twin if index == 0 else make(True, threads, index),
            single=None if not single_rows else single_session if index == 0 else make(False, 1, index),
            single_rows=single_rows,
        )
        for index, batched in enumerate(plain)
    ]


def _measure(
    plain: SessionRunner,
    make: Callable[[bool, int, int], SessionRunner],
    specs: Sequence[TensorSpec],
    lone: bool,
    single: bool,
    threads: int,
    max_batch: int,
    name: str,
) -> tuple[SessionRunner | None, SessionRunner | None, int]:
    """(the spinning twin or None, the one-thread session or None, the largest batch for it or 0),
    for the extra sessions asked for on "auto" that measured worth it."""
    row = zero_inputs(specs, 1)
    run_ms(plain, row, _WARM_RUNS)
    plain_ms = run_ms(plain, row, _WARM_RUNS)
    if plain_ms > MAX_PLAIN_MS:
        log.info("%s: a lone row takes %.2f ms: no extra session tried", name, plain_ms)
        return None, None, 0
    twin = None
    if lone:
        twin, plain_ms, spin_ms = spinning_pays(plain, lambda: make(True, threads, 0), row)
        log.info(
            "%s: a lone row takes %.2f ms, %.2f ms spinning: 1-row batches on %s",
            name, plain_ms, spin_ms, "a second, spinning session" if twin else "the one session",
        )  # fmt: skip
    if not single or max_batch < 2:
        return twin, None, 0
    one = make(False, 1, 0)
    single_rows, speedups = single_thread_rows(one, plain, specs, threads, max_batch)
    log.info(
        "%s: %d threads over one at %s rows: x%s; batches of up to %d rows on one thread",
        name, threads, "/".join(str(r) for r, _ in speedups),
        "/".join(f"{s:.2f}" for _, s in speedups), single_rows,
    )  # fmt: skip
    if not single_rows:
        one.close()
        return twin, None, 0
    return twin, one, single_rows
