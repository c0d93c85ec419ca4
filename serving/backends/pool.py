"""The instance pool both engines share: N runners (ORT sessions, TensorRT contexts), each running
one batch at a time; `run` checks a free one out, blocking until one is free.

Errors keep their meaning across engines: a closed pool is UNAVAILABLE, an engine failure is a
BackendError naming the engine and the batch, outputs of the wrong shape are a BackendError.
"""

from __future__ import annotations

import logging
import queue
from collections.abc import Mapping, Sequence
from typing import Protocol

import numpy as np

from serving.backends.base import TensorSpec, check_outputs, validate_inputs
from serving.errors import BackendError, KilnError, ModelUnavailableError

__all__ = ["InstancePool", "Runner"]

log = logging.getLogger(__name__)

CLOSE_TIMEOUT_S = 30.0  # how long close() waits for a running batch


class Runner(Protocol):
    """One instance: runs a validated batch of `rows` rows; released by `close`."""

    def run(self, inputs: Mapping[str, np.ndarray], rows: int) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...


class InstancePool:
    """Free-list of runners; see the module docstring."""

    def __init__(
        self,
        runners: Sequence[Runner],
        *,
        engine: str,
        inputs: Sequence[TensorSpec],
        outputs: Sequence[TensorSpec],
        max_batch_size: int,
    ) -> None:
        self._engine, self._inputs, self._outputs = engine, tuple(inputs), tuple(outputs)
        self._max_batch_size, self._size = max_batch_size, len(runners)
        self._free: queue.SimpleQueue[Runner] = queue.SimpleQueue()
        for runner in runners:
            self._free.put(runner)
        self.closed = False

    def __len__(self) -> int:
        return self._size

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Validate, run on a free instance, check the outputs' batch and shapes."""
        if self.closed:
            raise ModelUnavailableError("backend is closed", reason="closed")
        rows = validate_inputs(self._inputs, inputs, self._max_batch_size)
        runner = self._free.get()
        try:
            outputs = runner.run(inputs, rows)
        except KilnError:
            raise
        except Exception as exc:
            raise BackendError(f"{self._engine} failed on a batch of {rows}: {exc}") from exc
        finally:
            self._free.put(runner)
        try:
            check_outputs(outputs, self._outputs, rows)
        except ValueError as exc:
            raise BackendError(str(exc)) from exc
        return outputs

    def close(self) -> bool:
        """Close every runner once it is free; False if one was still running after the timeout."""
        if self.closed:
            return True
        self.closed = True
        for _ in range(self._size):
            try:
                self._free.get(timeout=CLOSE_TIMEOUT_S).close()
            except queue.Empty:
                log.warning("%s backend closed while a call was still running", self._engine)
                return False
        return True
