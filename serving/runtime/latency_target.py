"""A latency target instead of a fixed queue delay (`latency_target_ms`).

A fixed `max_queue_delay_us` is right for one load only: long enough to fill batches under heavy
load, it makes every lone request wait for company that never comes; short, it gives up
throughput when many clients send. With a target, the batcher lets the oldest waiting request
wait only as long as it can still be computed within the target, and not at all while batches
hold one request anyway (a lone client, or clients that send one at a time and wait for the
answer: no other request can arrive in time, so waiting would only add latency):

    wait = target * (1 - margin) - compute(max rows)     (never below 0)
    wait = 0 while recent batches averaged under 1.5 requests

Compute time per batch is learnt from the batches the batcher runs, as a + b * rows by
exponentially weighted least squares (recent batches count most: the machine's load changes),
so no offline profile is needed. Requests per batch is an exponentially weighted mean too; it
rises by itself when load does, because requests that arrive while the instances compute share
the next batch.
Not thread-safe: the batcher calls it with its lock held.
"""

from __future__ import annotations

__all__ = ["LatencyPolicy"]


class LatencyPolicy:
    """How long a batch may wait for more rows; see the module docstring."""

    def __init__(self, target_s: float, max_rows: int, *, margin: float = 0.1, decay: float = 0.95) -> None:
        if target_s <= 0 or not 0 <= margin < 1 or not 0 < decay < 1:
            raise ValueError(
                f"need target > 0, margin in [0, 1), decay in (0, 1): {target_s}, {margin}, {decay}"
            )
        self.target, self.max_rows, self._margin, self._decay = target_s, max_rows, margin, decay
        self._n = self._x = self._y = self._xx = self._xy = 0.0  # weighted sums of rows, seconds
        self._requests_per_batch = 1.0

    def computed(self, rows: int, seconds: float, requests: int) -> None:
        """Learn from one batch that ran."""
        self._requests_per_batch = 0.8 * self._requests_per_batch + 0.2 * requests
        d = self._decay
        self._n = d * self._n + 1.0
        self._x = d * self._x + rows
        self._y = d * self._y + seconds
        self._xx = d * self._xx + rows * rows
        self._xy = d * self._xy + rows * seconds

    def compute_seconds(self, rows: int) -> float:
        """Predicted compute time of a batch of `rows` (0 before any batch ran)."""
        if self._n == 0:
            return 0.0
        spread = self._n * self._xx - self._x * self._x
        if spread <= 1e-9 * max(self._n * self._xx, 1.0):  # one batch size seen so far: no slope
            return self._y / self._n * rows / max(self._x / self._n, 1.0)  # scale the mean per row
        slope = (self._n * self._xy - self._x * self._y) / spread
        intercept = (self._y - slope * self._x) / self._n
        return max(0.0, intercept + max(slope, 0.0) * rows)

    def wait(self) -> float:
        """Seconds the oldest waiting request may wait for company (0: the batch goes at once)."""
        if self._requests_per_batch < 1.5:
            return 0.0
        return max(0.0, self.target * (1 - self._margin) - self.compute_seconds(self.max_rows))
