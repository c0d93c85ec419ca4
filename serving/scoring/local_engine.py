"""The local engine: decode threads -> one batched backend holder -> the shard writer.

    producer ──tasks──► decode threads (W) ──decoded──► backend thread ──scored──► writer (caller)

Every queue is bounded, so memory stays flat whatever the input size: at most `workers + prefetch
+ 1` decoded batches exist at once, and results wait only until their shard is whole. A task is
one backend batch of one shard (never across shards), so batches and shards stay deterministic.

Threads, not processes, for decoding: Pillow releases the GIL while decoding and resizing, and
numpy while normalising, so threads overlap with each other and with ONNX Runtime (which runs
without the GIL); a process pool would add a pickle/copy of every decoded batch for nothing on a
box where the backend already owns the cores (measurements in benchmarks/score_throughput.py).

A failure of the backend (not of an input: those are error rows) stops the pipeline and is
raised to the caller; shards committed until then stay committed, so a rerun resumes.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from serving.scoring.inputs import InputList
from serving.scoring.ledger import ShardPlan
from serving.scoring.model import ScoringModel
from serving.scoring.writer import results_table

__all__ = ["LocalEngine", "LocalOptions"]

_POLL_S = 0.1  # how often a blocked stage re-checks the stop flag
_DONE = object()


@dataclass(frozen=True, kw_only=True)
class LocalOptions:
    """Knobs of the local pipeline."""

    workers: int = 2  # decode threads
    batch_size: int = 32  # rows per backend call (<= the model's max_batch_size)
    prefetch: int = 2  # decoded batches waiting for the backend

    def __post_init__(self) -> None:
        for name in ("workers", "batch_size", "prefetch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


@dataclass(frozen=True, slots=True)
class _Task:
    start: int
    stop: int


@dataclass(frozen=True, slots=True)
class _Decoded:
    task: _Task
    rows: np.ndarray
    errors: list[str | None]


class LocalEngine:
    """Runs the pending shards of a job through the pipeline (see module docstring)."""

    def __init__(
        self, model: ScoringModel, inputs: InputList, options: LocalOptions, *, logits: bool
    ) -> None:
        if options.batch_size > model.max_batch_size:
            raise ValueError(
                f"batch size {options.batch_size} exceeds the model's max_batch_size {model.max_batch_size}"
            )
        self._model, self._inputs, self._options, self._logits = model, inputs, options, logits
        self._stop = threading.Event()
        self._failure: BaseException | None = None
        self._tasks: queue.Queue[Any] = queue.Queue(maxsize=2 * options.workers)
        self._decoded: queue.Queue[Any] = queue.Queue(maxsize=options.prefetch)
        self._scored: queue.Queue[Any] = queue.Queue(maxsize=2 * options.prefetch + options.workers)

    def run(self, plan: ShardPlan, shards: Sequence[int], deliver: Callable[[Any], None]) -> None:
        """Score the rows of `shards`; `deliver(table)` is called in this thread per batch."""
        threads = [threading.Thread(target=self._guard(self._produce, plan, shards), name="kiln-score-tasks")]
        threads += [
            threading.Thread(target=self._guard(self._decode), name=f"kiln-score-decode-{i}")
            for i in range(self._options.workers)
        ]
        threads.append(threading.Thread(target=self._guard(self._infer), name="kiln-score-backend"))
        for thread in threads:
            thread.daemon = True  # a Ctrl-C'd job must not hang on a blocked stage
            thread.start()
        try:
            while True:
                item = self._get(self._scored)
                if item is None or item is _DONE:  # None: a stage failed and stopped the pipeline
                    break
                deliver(item)
        except BaseException as exc:
            self._fail(exc)
        finally:
            self._stop.set()
            for thread in threads:
                thread.join()
        if self._failure is not None:
            raise self._failure

    # -- stages ---------------------------------------------------------------------------------

    def _produce(self, plan: ShardPlan, shards: Sequence[int]) -> None:
        step = self._options.batch_size
        for shard in shards:
            start, stop = plan.bounds(shard)
            for first in range(start, stop, step):
                if not self._put(self._tasks, _Task(first, min(first + step, stop))):
                    return
        for _ in range(self._options.workers):
            self._put(self._tasks, _DONE)

    def _decode(self) -> None:
        model, paths = self._model, self._inputs.paths
        while (task := self._get(self._tasks)) is not _DONE and task is not None:
            rows = np.empty((task.stop - task.start, *model.sample_shape), model.dtype)
            errors = [model.load_row(paths[i], rows[i - task.start]) for i in range(task.start, task.stop)]
            if not self._put(self._decoded, _Decoded(task, rows, errors)):
                return
        self._put(self._decoded, _DONE)

    def _infer(self) -> None:
        finished = 0
        while finished < self._options.workers:
            item = self._get(self._decoded)
            if item is None:
                return
            if item is _DONE:
                finished += 1
                continue
            if not self._put(self._scored, self._score(item)):
                return
        self._put(self._scored, _DONE)

    def _score(self, item: _Decoded) -> Any:
        ok = [i for i, e in enumerate(item.errors) if e is None]
        scored = None
        if ok:
            rows = item.rows if len(ok) == len(item.rows) else item.rows[ok]
            scored = self._model.score(rows)
        task, inputs = item.task, self._inputs
        return results_table(
            rows=np.arange(task.start, task.stop),
            ids=inputs.ids[task.start : task.stop],
            paths=inputs.paths[task.start : task.stop],
            errors=item.errors,
            scored=scored,
            identity=self._model.identity,
            labels=self._model.labels,
            with_logits=self._logits,
        )

    # -- plumbing -------------------------------------------------------------------------------

    def _guard(self, target: Callable[..., None], *args: Any) -> Callable[[], None]:
        def run() -> None:
            try:
                target(*args)
            except BaseException as exc:
                self._fail(exc)

        return run

    def _fail(self, exc: BaseException) -> None:
        if self._failure is None:
            self._failure = exc
        self._stop.set()

    def _put(self, q: queue.Queue[Any], item: Any) -> bool:
        """Blocking put that gives up (False) once the pipeline is stopping."""
        while not self._stop.is_set():
            try:
                q.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _get(self, q: queue.Queue[Any]) -> Any:
        """Blocking get that gives up (None) once the pipeline is stopping."""
        while not self._stop.is_set():
            try:
                return q.get(timeout=_POLL_S)
            except queue.Empty:
                continue
        return None
