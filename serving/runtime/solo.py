"""Is a request alone in the server? Then its batcher may compute it on the event loop itself.

A request with no company gains nothing from the batcher's worker thread and pays for it: the
worker's wake-up and the result's way back to the loop (`call_soon_threadsafe`, the loop's
self-pipe) cost ~0.15 ms of a ResNet-20 request's ~1.4 ms round trip on 2 cores
(benchmarks/serve_breakdown.py). Computing it on the loop blocks the loop for that long, though,
so it is done only where nobody can be held up:

- the request is the only one in flight in this process (every model's batcher shares one gate,
  streams included: each of a stream's requests counts), AND the event loop slept since the
  previous request left (at least `MIN_IDLE_S` of the gap between them spent off the CPU). The
  second test is what matters under load: while a request is computed on the loop, the requests
  that arrive meanwhile wait inside gRPC, and the loop then takes them one at a time, each
  finding the batcher empty; but the loop never slept between them. Either test failing closes
  the gate for `CROWD_MEMORY_S`, so a server under load batches as usual (without that memory,
  requests that arrived during an inline compute each found the server idle in turn and
  batching collapsed: c16 x0.67, benchmarks/RESULTS-serving.md);
- the batch is predicted (from the model's own recent lone batches) to take at most
  `lone_request_inline_max_ms`; a model not yet seen alone goes through the worker.

What the second test cannot see: time the loop spent waiting for the GIL (another thread of the
process running Python: a metrics scrape, the prediction counter's timer) counts as sleep. The
harm is bounded: one request computed inline while others waited, after which the next request
finds that the loop did not sleep and the gate closes for `CROWD_MEMORY_S`.

Written on the event loop only (no locks); the batcher's workers read `in_flight` to tell the
backend whether the loop has other requests during a batch (backends.base.LOOP_HAS_WORK).
"""

from __future__ import annotations

import time

__all__ = ["CROWD_MEMORY_S", "MIN_IDLE_S", "SoloGate"]

CROWD_MEMORY_S = 0.1  # after a sign of company, no inline compute for this long
MIN_IDLE_S = 50e-6  # the loop must have slept this long between two requests for the second to be alone


class SoloGate:
    """Counts the batcher requests in flight in this process; see the module docstring."""

    def __init__(self, max_compute_s: float, *, memory_s: float = CROWD_MEMORY_S) -> None:
        if max_compute_s <= 0 or memory_s < 0:
            raise ValueError(f"need max_compute_s > 0 and memory_s >= 0, got {max_compute_s}, {memory_s}")
        self.max_compute_s, self._memory = max_compute_s, memory_s
        self.in_flight = 0
        self._crowded_until = 0.0  # time.monotonic() before which nothing is computed inline
        self._left = self._left_cpu = 0.0  # when the last request left: wall clock, the loop's CPU
        self._company = False  # the request that entered last saw signs of company

    def enter(self) -> None:
        """A request begins (before it is queued)."""
        self.in_flight += 1
        now = time.monotonic()
        if self.in_flight > 1:  # under load: no clock of the loop's CPU needed (a system call)
            self._company = True
        else:  # of the gap since the last request left, the part the loop spent off the CPU
            slept = (now - self._left) - (time.thread_time() - self._left_cpu)
            self._company = slept < MIN_IDLE_S
        if self._company:
            self._crowded_until = now + self._memory

    def leave(self) -> None:
        """A request has its answer, its error or was cancelled."""
        self.in_flight -= 1
        if not self.in_flight:  # the next request, alone in flight, measures its gap from here
            self._left, self._left_cpu = time.monotonic(), time.thread_time()

    def alone(self, now: float) -> bool:
        """True if the request that entered last is the only one, and has been for a while."""
        return self.in_flight == 1 and not self._company and now >= self._crowded_until
