"""Per model-version counters behind the ModelStatistics RPC (Triton's statistics extension).

Semantics follow the public proto: `inference_count` counts rows (a request of batch 8 counts 8),
`execution_count` counts backend executions (one per formed batch), each StatisticDuration is a
count plus cumulative nanoseconds, and `batch_stats` holds one entry per executed batch size.
Batches are recorded from the batcher's worker threads, requests from the event loop, hence the lock.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from protos.inference import grpc_service_pb2 as pb


@dataclass
class _Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += max(0, ns)

    def to_proto(self) -> pb.StatisticDuration:
        return pb.StatisticDuration(count=self.count, ns=self.ns)


@dataclass
class _Batch:
    compute_input: _Duration = field(default_factory=_Duration)
    compute_infer: _Duration = field(default_factory=_Duration)
    compute_output: _Duration = field(default_factory=_Duration)


class ModelStats:
    """Counters of one model version; cheap enough to update on every request."""

    def __init__(self, model: str, version: str) -> None:
        self.model, self.version = model, version
        self._lock = threading.Lock()
        self._success = _Duration()
        self._fail = _Duration()
        self._queue = _Duration()
        self._compute_input = _Duration()
        self._compute_infer = _Duration()
        self._compute_output = _Duration()
        self._inference_count = 0
        self._execution_count = 0
        self._last_inference_ms = 0
        self._batches: dict[int, _Batch] = {}

    def record_request(self, *, rows: int, ok: bool, total_ns: int) -> None:
        """One finished request (success or failure) with its end-to-end server time."""
        with self._lock:
            if ok:
                self._success.add(total_ns)
                self._inference_count += rows
                self._last_inference_ms = time.time_ns() // 1_000_000
            else:
                self._fail.add(total_ns)

    def record_batch(self, *, rows: int, queue_seconds: Sequence[float], compute_seconds: float) -> None:
        """One backend execution of `rows` rows serving len(queue_seconds) requests.

        As Triton does, every request of the batch is charged the batch's compute time.
        """
        compute_ns = int(compute_seconds * 1e9)
        with self._lock:
            self._execution_count += 1
            batch = self._batches.setdefault(rows, _Batch())
            batch.compute_infer.add(compute_ns)
            # Input gathering and output scattering are inside compute_infer here; their counts
            # must still match it (perf_analyzer aborts when the three compute counts differ).
            batch.compute_input.add(0)
            batch.compute_output.add(0)
            for wait in queue_seconds:
                self._queue.add(int(wait * 1e9))
                self._compute_infer.add(compute_ns)
                self._compute_input.add(0)
                self._compute_output.add(0)

    def to_proto(self) -> pb.ModelStatistics:
        """A ModelStatistics message with the current values."""
        with self._lock:
            stats = pb.InferStatistics(
                success=self._success.to_proto(),
                fail=self._fail.to_proto(),
                queue=self._queue.to_proto(),
                compute_input=self._compute_input.to_proto(),
                compute_infer=self._compute_infer.to_proto(),
                compute_output=self._compute_output.to_proto(),
            )
            batches = [
                pb.InferBatchStatistics(
                    batch_size=size,
                    compute_input=b.compute_input.to_proto(),
                    compute_infer=b.compute_infer.to_proto(),
                    compute_output=b.compute_output.to_proto(),
                )
                for size, b in sorted(self._batches.items())
            ]
            return pb.ModelStatistics(
                name=self.model,
                version=self.version,
                last_inference=self._last_inference_ms,
                inference_count=self._inference_count,
                execution_count=self._execution_count,
                inference_stats=stats,
                batch_stats=batches,
            )
