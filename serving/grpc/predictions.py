"""What each served model predicts: its top-1 class per row and the confidence of it.

`kiln_predictions_total{model,version,class}` counts served rows by top-1 class and
`kiln_prediction_confidence` is a histogram of the top-1 probability, so a shift in the class
mix or a fall in confidence shows on the dashboard before anyone reports wrong answers. Label
cardinality is bounded: classes at output index `prediction_classes` or beyond count as
"other" (a 1000-class model would otherwise add 1000 series per version); 0 turns both off.
Rows are counted per computed batch, in the batch worker (`PredictionTap`, one of the batcher's
batch taps), from each row's top-1 class and probability (runtime/topk.py `top1`: softmax's value
without the whole softmax): off the event loop, where counting each request cost ~17 % of served
ResNet-20 at concurrency 16, and in plain Python where numpy's per-call overhead dominated small
batches. A model without a classification output is not counted; rows with non-finite scores
predict nothing. The same rows feed the drift gauge (serving/grpc/drift.py); one recorder per
server, so one window per version.
"""

from __future__ import annotations

import collections
import threading
import weakref
from collections.abc import Mapping

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
        # plain ints, not np.unique and numpy scalars: this runs on every computed batch, most of
        # them a few rows, where numpy's per-call overhead is what costs
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

    def __init__(self, metrics: KilnMetrics, most_classes: int, drift_window: int) -> None:
        self._metrics, self._most = metrics, most_classes
        self._drift = DriftMetrics(metrics, drift_window)
        self._versions: weakref.WeakKeyDictionary[LoadedVersion, _VersionPredictions | None] = (
            weakref.WeakKeyDictionary()
        )
        self._lock = threading.Lock()  # batches of every version and instance report from their threads

    def _of(self, loaded: LoadedVersion) -> _VersionPredictions | None:
        if loaded not in self._versions:
            try:
                head = loaded.handle.head
            except KilnError:  # no classification output: nothing to count
                head = None
            self._versions[loaded] = head and _VersionPredictions(self._metrics, loaded, head, self._most)
        return self._versions[loaded]

    def observe_outputs(self, loaded: LoadedVersion, outputs: Mapping[str, np.ndarray]) -> None:
        """A computed batch's rows, by the top-1 class and probability of the classification
        output; rows whose scores are not finite (garbage in, an overflow) predict nothing."""
        with self._lock:
            version = self._of(loaded)
            if version is None or version.head.output not in outputs:
                return
            values = outputs[version.head.output]
            best, top = version.head.top1(values)
            finite = np.isfinite(top)
            if not finite.all():
                best, top = best[finite], top[finite]
            if len(top):
                rows = Rows(best.tolist(), top, confidence_bins(top).tolist())
                version.observe(rows.best, rows.top, rows.bins)
                self._drift.observe(loaded, rows, classes=values.size // len(values))


_SHARED: weakref.WeakKeyDictionary[KilnMetrics, PredictionMetrics] = weakref.WeakKeyDictionary()


def prediction_metrics(
    metrics: KilnMetrics | None, most_classes: int, drift_window: int = 0
) -> PredictionMetrics | None:
    """The server's recorder (the same for each servicer of `metrics`), or None without metrics
    or with prediction_classes 0; `drift_window` 0: no drift gauge."""
    if metrics is None or most_classes <= 0:
        return None
    if metrics not in _SHARED:
        _SHARED[metrics] = PredictionMetrics(metrics, most_classes, drift_window)
    return _SHARED[metrics]


class PredictionTap:
    """A version's batch tap: every computed batch's rows, counted once its
    LoadedVersion exists (the batcher is built first)."""

    def __init__(self, recorder: PredictionMetrics) -> None:
        self.recorder, self.loaded = recorder, None  # type: LoadedVersion | None

    def __call__(self, batch: ComputedBatch) -> None:
        if self.loaded is not None:
            self.recorder.observe_outputs(self.loaded, batch.outputs)
