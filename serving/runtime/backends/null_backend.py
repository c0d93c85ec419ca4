"""The timing backend (`backend: null`): the server's own overhead, measured on the user's hardware.

It stands in for an accelerator: every batch holds one instance for `base_us + per_row_us * rows`
microseconds (rows padded up to the batch buckets, as the CUDA path pads them) in `time.sleep`,
which releases the GIL as a CUDA stream wait does, then answers zeros of the output spec. Inputs,
outputs and max_batch_size come from kiln.json exactly as the ONNX Runtime backend must report
them, so validation, metadata and clients behave the same; the artefact is still verified (sha256)
before loading, only the compute is replaced. Triton ships an identity backend for the same reason.

Busy seconds, device calls and rows per instance are counted by the shared InstancePool around
each call: `instance_stats()` and `device_calls`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from serving.runtime.backends.base import BackendOptions, TensorSpec
from serving.runtime.backends.pool import PooledBackend

__all__ = ["MAX_BASE_US", "MAX_PER_ROW_US", "NullBackend", "NullTiming", "null_timing"]

MAX_BASE_US = 10_000_000  # 10 s per batch: beyond any real model, and below gRPC deadlines in tests
MAX_PER_ROW_US = 1_000_000


@dataclass(frozen=True, slots=True)
class NullTiming:
    """Device time per batch: `base_us + per_row_us * rows` microseconds."""

    base_us: int = 0
    per_row_us: int = 0

    def __post_init__(self) -> None:
        for name, high in (("base_us", MAX_BASE_US), ("per_row_us", MAX_PER_ROW_US)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= high:
                raise ValueError(f"null timing {name} must be an integer in [0, {high}], got {value!r}")

    def seconds(self, rows: int) -> float:
        """How long a batch of `rows` (padded) rows holds its instance."""
        return (self.base_us + self.per_row_us * rows) / 1e6


def null_timing(config: Any) -> NullTiming | None:
    """The timing a ServeConfig asks for (`backend: null`), else None: pass it to load_backend."""
    if getattr(config, "backend", None) != "null":
        return None
    return NullTiming(config.null_base_us, config.null_per_row_us)


class _TimingRunner:
    """One pretend device instance: pads like the CUDA path, sleeps the device time, answers zeros."""

    def __init__(self, outputs: Sequence[TensorSpec], timing: NullTiming, buckets: Sequence[int]) -> None:
        self._timing, self._buckets = timing, tuple(buckets)
        # Dynamic non-batch output dims have no size to copy: answer 1, as warm-up inputs do.
        self._outputs = [(s.name, tuple(d if d > 0 else 1 for d in s.shape[1:]), s.dtype) for s in outputs]

    def run(self, inputs: Mapping[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        size = next((b for b in self._buckets if b >= rows), rows)  # one call per batch, padded
        outputs = {name: np.zeros((rows, *dims), dtype) for name, dims, dtype in self._outputs}
        remaining = start + self._timing.seconds(size) - time.perf_counter()
        if remaining > 0:
            time.sleep(remaining)  # releases the GIL, as waiting on a CUDA stream does
        return outputs

    def close(self) -> None:
        self._outputs = []


class NullBackend(PooledBackend):
    """Zeros after a fixed device time per batch; specs and max_batch_size from kiln.json (see the
    module docstring)."""

    def __init__(
        self,
        inputs: Sequence[TensorSpec],
        outputs: Sequence[TensorSpec],
        *,
        max_batch_size: int,
        timing: NullTiming,
        options: BackendOptions | None = None,
    ) -> None:
        from serving.runtime.backends.ort_runners import graph_buckets  # light: numpy only at import

        options = options or BackendOptions()
        self.inputs, self.outputs = tuple(inputs), tuple(outputs)
        self.max_batch_size, self.timing = max_batch_size, timing
        self.buckets = tuple(graph_buckets(max_batch_size)) if options.pad_to_buckets else ()
        runners = [_TimingRunner(self.outputs, timing, self.buckets) for _ in range(options.instances)]
        self._pool_runners(runners, engine="null")

    @property
    def provider(self) -> str:
        """Always "null"."""
        return "null"

    @property
    def device_calls(self) -> int:
        """Batches run since load, all instances (warm-up included)."""
        return sum(s.calls for s in self._pool.instance_stats())
