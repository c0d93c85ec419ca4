"""What each served model predicts: its top-1 class per row and the confidence of it.

`kiln_predictions_total{model,version,class}` counts served rows by top-1 class and
`kiln_prediction_confidence` is a histogram of the top-1 probability, so a shift in the class
mix or a fall in confidence shows on the dashboard before anyone reports wrong answers. Label
cardinality is bounded: classes at output index `prediction_classes` or beyond count as
"other" (a 1000-class model would otherwise add 1000 series per version); 0 turns both off.

The batch worker only hands each computed batch's class output over (`PredictionTap`, one of the
batcher's batch taps: a list append); the rows are counted later, many batches at once, from each
row's top-1 class and probability (runtime/topk.py `top1`: softmax's value without the whole
softmax): before every scrape and every series removal (KilnMetrics.before_read), every flush
interval on a thread of their own (with `workers` > 1 the supervisor's scrape cannot reach a
worker: its counts lag by at most that), and in the worker itself once the pending rows or bytes
of scores pass their bound (settings `prediction_flush_interval_s`, `prediction_pending_max_rows`,
`prediction_pending_max_bytes`; defaults below). Why not per batch: counting a batch in the worker
right after ONNX Runtime ran took ~100 us (the same code takes ~20 us on warm caches), on the path
of every answer (a lone ResNet-20 request served 12 % faster without it,
benchmarks/RESULTS-serving.md); and not per request on the event loop, where it cost ~17 % at
concurrency 16. A model without a classification output is not counted; rows with non-finite
scores predict nothing. The same rows feed the drift gauge (serving/grpc/drift.py); one recorder
per server, so one window per version.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
import weakref

import numpy as np
from prometheus_client import Counter, Histogram

from serving.errors import KilnError
from serving.grpc.drift import DriftMetrics, Rows
from serving.grpc.metrics import KilnMetrics
from serving.grpc.model_version import LoadedVersion
from serving.runtime.batcher import ComputedBatch
from serving.runtime.distribution import OTHER, confidence_bins, named_classes
from serving.runtime.topk import ClassificationHead

__all__ = ["OTHER", "PredictionMetrics", "PredictionTap", "prediction_metrics"]

log = logging.getLogger(__name__)

# defaults of the settings prediction_flush_interval_s, prediction_pending_max_rows and _bytes
FLUSH_INTERVAL_S = 1.0  # the longest a computed batch waits to be counted (without a scrape)
MAX_PENDING_ROWS = 16_384  # rows waiting beyond this are counted by the batch worker at once
MAX_PENDING_BYTES = 8 << 20  # and class scores beyond this (a 1000-class model: ~2,000 rows)


class _VersionPredictions:
    """The series of one model version (label lookups done once per class)."""

    def __init__(
        self, metrics: KilnMetrics, loaded: LoadedVersion, head: ClassificationHead, most: int
    ) -> None:
        model, version = loaded.model, str(loaded.version)
        self.head = head
        children: dict[str, Counter] = {}
        self._classes = [
            children.setdefault(n, metrics.predictions.labels(model, version, n))
            for n in named_classes(head.labels, most)
        ]
        self._confidence: Histogram = metrics.prediction_confidence.labels(model, version)

    def observe(self, best: list[int], top: np.ndarray, bins: list[int]) -> None:
        """Count rows by their top-1 class index and top-1 probability (and its CONFIDENCE_EDGES bin)."""
        # plain ints, not np.unique and numpy scalars: one Counter over the rows of every batch
        # counted together
        for index, count in collections.Counter(best).items():
            self._classes[index].inc(count)
        _observe_all(self._confidence, top, bins)


def _observe_all(histogram: Histogram, values: np.ndarray, bins: list[int]) -> None:
    """`histogram.observe` of every value, one increment per non-empty bucket: prometheus_client
    observes one value per call (~1.5 us each: ~100 us for a batch of 64 rows). Its buckets are
    CONFIDENCE_EDGES, binned as `kiln score` bins them (a rounding past 1.0 counts in the last)."""
    buckets, total = getattr(histogram, "_buckets", None), getattr(histogram, "_sum", None)
    if buckets is None or total is None:  # a prometheus_client without them: one at a time
        for value in values.tolist():
            histogram.observe(value)
        return
    total.inc(float(values.sum()))
    for index, count in collections.Counter(bins).items():
        buckets[index].inc(count)


class PredictionMetrics:
    """Counts predictions of every served version (one per server; versions held weakly)."""

    def __init__(
        self,
        metrics: KilnMetrics,
        most_classes: int,
        drift_window: int,
        *,
        flush_interval_s: float = FLUSH_INTERVAL_S,
        max_pending_rows: int = MAX_PENDING_ROWS,
        max_pending_bytes: int = MAX_PENDING_BYTES,
    ) -> None:
        self._metrics, self._most = metrics, most_classes
        self._drift = DriftMetrics(metrics, drift_window)
        self._versions: weakref.WeakKeyDictionary[LoadedVersion, _VersionPredictions | None] = (
            weakref.WeakKeyDictionary()
        )
        self._lock = threading.Lock()  # one count at a time, in the order the batches came
        # batches handed over and not counted yet: (version, its class output), in order
        self._pending: list[tuple[LoadedVersion, np.ndarray]] = []
        self._pending_rows, self._max_pending = 0, max_pending_rows
        self._pending_bytes, self._max_pending_bytes = 0, max_pending_bytes
        self._pending_lock = threading.Lock()  # held for an append or a swap only
        metrics.before_read(self.flush)
        threading.Thread(
            target=_flush_every,
            args=(weakref.ref(self), flush_interval_s),
            name="kiln-predictions",
            daemon=True,
        ).start()

    @property
    def pending_rows(self) -> int:
        """Rows handed over and not counted yet."""
        return self._pending_rows

    def _of(self, loaded: LoadedVersion) -> _VersionPredictions | None:
        """The version's series (made on first use); None without a classification output.
        Called with _lock held."""
        if loaded not in self._versions:
            try:
                head = loaded.handle.head
            except KilnError:  # no classification output: nothing to count
                head = None
            self._versions[loaded] = head and _VersionPredictions(self._metrics, loaded, head, self._most)
        return self._versions[loaded]

    def output_of(self, loaded: LoadedVersion) -> str | None:
        """The output whose rows are counted for `loaded`, None if it has no classification output."""
        with self._lock:
            version = self._of(loaded)
        return None if version is None else version.head.output

    def defer(self, loaded: LoadedVersion, values: np.ndarray) -> None:
        """Hand a computed batch's class output over, to be counted soon (in the batch worker:
        an append; it counts only past MAX_PENDING_ROWS rows or MAX_PENDING_BYTES waiting)."""
        with self._pending_lock:
            self._pending.append((loaded, values))
            self._pending_rows += len(values)
            self._pending_bytes += values.nbytes
            full = self._pending_rows > self._max_pending or self._pending_bytes > self._max_pending_bytes
        if full:
            self.flush()

    def flush(self) -> None:
        """Count every batch handed over so far."""
        with self._lock:
            with self._pending_lock:
                pending, self._pending, self._pending_rows, self._pending_bytes = self._pending, [], 0, 0
            by_version: dict[LoadedVersion, list[np.ndarray]] = {}
            for loaded, values in pending:
                by_version.setdefault(loaded, []).append(values)
            for loaded, batches in by_version.items():
                try:
                    self._count(loaded, batches[0] if len(batches) == 1 else np.concatenate(batches))
                except Exception:  # the server's fault, not a client's: logged once, version off
                    log.error(
                        "prediction metrics of %s v%s failed; its rows are not counted from now on",
                        loaded.model, loaded.version, exc_info=True,
                    )  # fmt: skip
                    self._versions[loaded] = None

    def _count(self, loaded: LoadedVersion, values: np.ndarray) -> None:
        """Rows of the classification output, by their top-1 class and probability; rows whose
        scores are not finite (garbage in, an overflow) predict nothing. Called with _lock held."""
        version = self._of(loaded)
        if version is None or not len(values):
            return
        best, top = version.head.top1(values)
        finite = np.isfinite(top)
        if not finite.all():
            best, top = best[finite], top[finite]
        if len(top):
            rows = Rows(best.tolist(), top, confidence_bins(top).tolist())
            version.observe(rows.best, rows.top, rows.bins)
            self._drift.observe(loaded, rows, classes=values.size // len(values))


def _flush_every(recorder: weakref.ref[PredictionMetrics], interval_s: float) -> None:
    """Count pending batches every `interval_s` until the recorder is gone (its server with it)."""
    while True:
        time.sleep(interval_s)
        alive = recorder()
        if alive is None:
            return
        alive.flush()
        del alive  # no strong reference while asleep


def prediction_metrics(
    metrics: KilnMetrics | None,
    most_classes: int,
    drift_window: int = 0,
    *,
    flush_interval_s: float = FLUSH_INTERVAL_S,
    max_pending_rows: int = MAX_PENDING_ROWS,
    max_pending_bytes: int = MAX_PENDING_BYTES,
) -> PredictionMetrics | None:
    """The server's recorder (the same for each servicer of `metrics`), or None without metrics
    or with prediction_classes 0; `drift_window` 0: no drift gauge; the rest: PredictionMetrics."""
    if metrics is None or most_classes <= 0:
        return None
    # kept on the metrics object, not in a module-level map: the recorder refers to its metrics,
    # so a map keyed by them would keep both (and the recorder's thread) alive for good
    recorder = metrics.extensions.get("predictions")
    if recorder is None:
        recorder = metrics.extensions["predictions"] = PredictionMetrics(
            metrics,
            most_classes,
            drift_window,
            flush_interval_s=flush_interval_s,
            max_pending_rows=max_pending_rows,
            max_pending_bytes=max_pending_bytes,
        )
    return recorder


class PredictionTap:
    """A version's batch tap: hands every computed batch's class output to the recorder (counted
    later), once its LoadedVersion exists (the batcher is built first)."""

    def __init__(self, recorder: PredictionMetrics) -> None:
        self.recorder, self.loaded = recorder, None  # type: LoadedVersion | None
        self._output: str | None = None  # the counted output, looked up on the first batch
        self._looked_up = False

    def __call__(self, batch: ComputedBatch) -> None:
        if self.loaded is None:
            return
        if not self._looked_up:
            self._output, self._looked_up = self.recorder.output_of(self.loaded), True
        if self._output is not None and self._output in batch.outputs:
            self.recorder.defer(self.loaded, batch.outputs[self._output])
