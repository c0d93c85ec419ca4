"""Drift: how far what a served version predicts has moved from what its export saw.

The export's parity gate records, in kiln.json (ParityReport.distribution), the FP32 artefact's
top-1 class shares and top-1 probability histogram on the held-out split. Each served version
keeps the same two summaries of its last `drift_window` rows in a ring (bounded memory: two int
arrays of the window's length, whatever the traffic), and kiln_prediction_drift
{model,version,distribution="class"|"confidence"} is the population stability index (PSI) of
each against the reference, sum((live - ref) * ln(live / ref)) over the bins. The usual reading:
under 0.1 stable, 0.1 to 0.2 a moderate shift, over 0.2 a shift worth a look (the alert's
threshold). The gauge appears once the window holds MIN_ROWS rows (the PSI of a handful of rows
is noise) and never for a version without a reference (exports made before it): absent, not 0.
The binning and the PSI are serving/runtime/distribution.py's, which `kiln score` uses too, so
a scoring job's `_predictions.json` scores its rows exactly as this gauge would.
"""

from __future__ import annotations

import weakref

import numpy as np

from serving.contract.manifest_types import PredictionDistribution
from serving.grpc.metrics import DRIFT_DISTRIBUTIONS as DRIFT
from serving.grpc.metrics import KilnMetrics
from serving.grpc.model_version import LoadedVersion
from serving.runtime.distribution import class_psi, confidence_bins, confidence_psi, reference_for

MIN_ROWS = 100  # fewer rows in the window (or the whole window if smaller): no score yet


class DriftWindow:
    """The top-1 class and confidence bin of the last `size` rows, as running counts over a ring."""

    def __init__(self, reference: PredictionDistribution, size: int) -> None:
        self.reference = reference
        self._edges = reference.confidence_edges
        self._ring = np.zeros((2, size), np.int64)  # [class, bin] of each row kept
        self._counts = (
            np.zeros(len(reference.class_frequencies), np.int64),
            np.zeros(len(self._edges), np.int64),
        )
        self._next = self.rows = 0
        self.min_rows = min(size, MIN_ROWS)
        self.published = False  # its gauges read it (DriftMetrics)

    def add(self, best: np.ndarray, confidence: np.ndarray) -> None:
        """Rows' top-1 class indices and top-1 probabilities; the oldest rows leave the window."""
        size = self._ring.shape[1]
        new = np.stack([best[-size:], confidence_bins(confidence[-size:], self._edges)])
        slots = (self._next + np.arange(new.shape[1])) % size
        old = self._ring[:, slots[slots < self.rows]]  # the slots still holding a row leave
        for counts, kind in zip(self._counts, range(2), strict=True):
            counts -= np.bincount(old[kind], minlength=len(counts))
            counts += np.bincount(new[kind], minlength=len(counts))
        self._ring[:, slots] = new
        self.rows = min(size, self.rows + new.shape[1])
        self._next = (self._next + new.shape[1]) % size

    def class_psi(self) -> float:
        """PSI of the window's top-1 class shares against the reference's (the same function
        `kiln score` scores a job's rows with)."""
        return class_psi(self.reference, self._counts[0])

    def confidence_psi(self) -> float:
        """PSI of the window's top-1 probability histogram against the reference's."""
        return confidence_psi(self.reference, self._counts[1])


class DriftMetrics:
    """kiln_prediction_drift of every served version that has a reference (versions held weakly;
    one per server, shared by the ModelInfer and Classify handlers so both feed one window)."""

    def __init__(self, metrics: KilnMetrics, window: int) -> None:
        self._metrics, self._window = metrics, window
        self._versions: weakref.WeakKeyDictionary[LoadedVersion, DriftWindow | None] = (
            weakref.WeakKeyDictionary()
        )

    def observe(self, loaded: LoadedVersion, scores: np.ndarray) -> None:
        """Rows of [N, C] class scores a version served."""
        if loaded not in self._versions:
            reference = reference_for(loaded.manifest, scores.shape[1])
            usable = reference is not None and self._window > 0
            self._versions[loaded] = DriftWindow(reference, self._window) if usable else None
        window = self._versions[loaded]
        if window is None:
            return
        best = scores.argmax(axis=1)
        window.add(best, scores[np.arange(len(best)), best])
        if window.rows >= window.min_rows:
            self._publish(loaded, window)

    def _publish(self, loaded: LoadedVersion, window: DriftWindow) -> None:
        children = [
            self._metrics.prediction_drift.labels(loaded.model, str(loaded.version), d) for d in DRIFT
        ]
        scores = (window.class_psi, window.confidence_psi)
        if self._metrics.multiprocess:  # a function in a worker cannot be read by the supervisor
            for child, score in zip(children, scores, strict=True):
                child.set(score())
        elif not window.published:  # computed at scrape time, not on every request
            for child, score in zip(children, scores, strict=True):
                child.set_function(score)
            window.published = True
