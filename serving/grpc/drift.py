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
from typing import Any, NamedTuple

import numpy as np

from serving.contract.manifest_types import PredictionDistribution
from serving.grpc.metrics import DRIFT_DISTRIBUTIONS as DRIFT
from serving.grpc.metrics import KilnMetrics
from serving.grpc.model_version import LoadedVersion
from serving.runtime.distribution import (
    CONFIDENCE_EDGES,
    class_psi,
    confidence_bins,
    confidence_psi,
    reference_for,
)

MIN_ROWS = 100  # fewer rows in the window (or the whole window if smaller): no score yet


class Rows(NamedTuple):
    """A computed batch's countable rows: top-1 class, top-1 probability, its CONFIDENCE_EDGES bin."""

    best: list[int]
    top: np.ndarray
    bins: list[int]


class DriftWindow:
    """The top-1 class and confidence bin of the last `size` rows, as running counts over a ring.

    Plain Python lists: a row costs well under a microsecond, paid on the prediction recorder's
    thread when it counts pending batches (serving/grpc/predictions.py), not on a request's path.
    """

    def __init__(self, reference: PredictionDistribution, size: int) -> None:
        self.reference = reference
        self.edges = reference.confidence_edges
        self._ring: list[tuple[int, int]] = []  # (class, bin) of each row kept; grows to `size`
        self._size = size
        self._class_counts = [0] * len(reference.class_frequencies)
        self._bin_counts = [0] * len(self.edges)
        self._next = 0  # the slot the next row takes once the ring is full
        self.min_rows = min(size, MIN_ROWS)
        self.children: list[Any] | None = None  # its gauges, once DriftMetrics published them

    @property
    def rows(self) -> int:
        """Rows in the window (at most its size)."""
        return len(self._ring)

    def add(self, best: np.ndarray, confidence: np.ndarray) -> None:
        """Rows' top-1 class indices and top-1 probabilities; the oldest rows leave the window."""
        size = self._size
        self.add_rows(best[-size:].tolist(), confidence_bins(confidence[-size:], self.edges).tolist())

    def add_rows(self, best: list[int], bins: list[int]) -> None:
        """Rows' top-1 class indices and confidence bins (of `edges`)."""
        size, ring = self._size, self._ring
        class_counts, bin_counts = self._class_counts, self._bin_counts
        for row in zip(best[-size:], bins[-size:], strict=True):
            class_counts[row[0]] += 1
            bin_counts[row[1]] += 1
            if len(ring) < size:
                ring.append(row)
                continue
            old = ring[self._next]  # the oldest row leaves
            class_counts[old[0]] -= 1
            bin_counts[old[1]] -= 1
            ring[self._next] = row
            self._next = (self._next + 1) % size

    def class_psi(self) -> float:
        """PSI of the window's top-1 class shares against the reference's (the same function
        `kiln score` scores a job's rows with)."""
        return class_psi(self.reference, np.array(self._class_counts))

    def confidence_psi(self) -> float:
        """PSI of the window's top-1 probability histogram against the reference's."""
        return confidence_psi(self.reference, np.array(self._bin_counts))


class DriftMetrics:
    """kiln_prediction_drift of every served version that has a reference (versions held weakly;
    one per server, shared by the ModelInfer and Classify handlers so both feed one window)."""

    def __init__(self, metrics: KilnMetrics, window: int) -> None:
        self._metrics, self._window = metrics, window
        self._versions: weakref.WeakKeyDictionary[LoadedVersion, DriftWindow | None] = (
            weakref.WeakKeyDictionary()
        )

    def observe(self, loaded: LoadedVersion, rows: Rows, *, classes: int) -> None:
        """Rows a version served (of `classes` classes)."""
        if loaded not in self._versions:
            reference = reference_for(loaded.manifest, classes)
            usable = reference is not None and self._window > 0
            self._versions[loaded] = DriftWindow(reference, self._window) if usable else None
        window = self._versions[loaded]
        if window is None:
            return
        if window.edges == CONFIDENCE_EDGES:  # the bins are the ones the rows come with
            window.add_rows(rows.best, rows.bins)
        else:  # a reference binned otherwise (its own edges)
            window.add(np.asarray(rows.best), rows.top)
        if window.rows >= window.min_rows:
            self._publish(loaded, window)

    def _publish(self, loaded: LoadedVersion, window: DriftWindow) -> None:
        scores = (window.class_psi, window.confidence_psi)
        if window.children is None:  # the first time: look the children up once
            window.children = [
                self._metrics.prediction_drift.labels(loaded.model, str(loaded.version), d) for d in DRIFT
            ]
            if not self._metrics.multiprocess:  # computed at scrape time, not on every batch
                for child, score in zip(window.children, scores, strict=True):
                    child.set_function(score)
        if self._metrics.multiprocess:  # a function in a worker cannot be read by the supervisor
            for child, score in zip(window.children, scores, strict=True):
                child.set(score())
