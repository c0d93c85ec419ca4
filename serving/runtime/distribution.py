"""What a model predicts, summarised one way for the server and for `kiln score`.

The server's prediction metrics (serving/grpc/predictions.py), its drift gauge
(serving/grpc/drift.py) and a scoring job's `_predictions.json` (serving/scoring/distribution.py)
all reduce predictions to the same two summaries, so an offline job and a live server can be
compared number for number:

- the top-1 class of each row, counted per class; where a summary names classes (a metric
  label, a JSON key), classes at output index `prediction_classes` or beyond count as "other",
  so a 1000-class model does not add 1000 series;
- the top-1 probability of each row, counted in the bins whose upper bounds are
  CONFIDENCE_EDGES (the buckets of kiln_prediction_confidence, and the bins export records).

Drift is the population stability index (PSI) of each summary against the reference kiln.json
carries (ParityReport.distribution, measured by export on the held-out split):
sum((live - ref) * ln(live / ref)) over the bins. Under 0.1 stable, 0.1 to 0.2 a moderate shift,
over 0.2 a shift worth a look. A version without a reference (exported before it existed), or
one whose reference has another class count, has no drift score: absent, not 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from serving.contract.manifest import Manifest
from serving.contract.manifest_types import PredictionDistribution

__all__ = [
    "CONFIDENCE_EDGES",
    "DEFAULT_PREDICTION_CLASSES",
    "OTHER",
    "class_psi",
    "confidence_bins",
    "confidence_psi",
    "named_classes",
    "psi",
    "reference_for",
    "reference_of",
]

# upper bounds of the top-1 probability bins: kiln_prediction_confidence's buckets and the bins
# of the reference export records (export/distribution.py), so dashboard, job and score agree
CONFIDENCE_EDGES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
DEFAULT_PREDICTION_CLASSES = 20  # classes named before "other" (kiln serve and kiln score)
OTHER = "other"
PSI_FLOOR = 1e-4  # a share of 0 on either side would make the PSI infinite


def psi(reference: np.ndarray | Sequence[float], live: np.ndarray | Sequence[float]) -> float:
    """Population stability index of the `live` shares against the `reference` shares."""
    ref, now = np.maximum(reference, PSI_FLOOR), np.maximum(live, PSI_FLOOR)
    return float(np.sum((now - ref) * np.log(now / ref)))


def _shares(counts: np.ndarray) -> np.ndarray:
    return counts / max(int(counts.sum()), 1)


def class_psi(reference: PredictionDistribution, class_counts: np.ndarray) -> float:
    """PSI of rows' top-1 class counts (one per class, in label order) against the reference."""
    return psi(reference.class_frequencies, _shares(class_counts))


def confidence_psi(reference: PredictionDistribution, bin_counts: np.ndarray) -> float:
    """PSI of rows' top-1 probability bin counts (one per CONFIDENCE_EDGES bin) against the reference."""
    return psi(reference.confidence_frequencies, _shares(bin_counts))


def confidence_bins(confidence: np.ndarray, edges: Sequence[float] = CONFIDENCE_EDGES) -> np.ndarray:
    """The bin of each top-1 probability: the first upper bound it does not exceed (Prometheus's
    `le`); a value past the last bound (rounding) goes to the last bin."""
    # np.minimum, not .clip(max=): clip's dtype-limit checks cost more than the search on a few rows
    return np.minimum(np.searchsorted(edges, confidence, side="left"), len(edges) - 1)


def reference_of(manifest: Manifest) -> PredictionDistribution | None:
    """The reference export recorded (on the FP32 ONNX artefact), None for older exports."""
    reports = (a.parity for a in manifest.artefacts if a.parity is not None)
    return next((r.distribution for r in reports if r.distribution is not None), None)


def reference_for(manifest: Manifest, classes: int) -> PredictionDistribution | None:
    """The reference a drift score of `classes`-wide outputs compares with, None when there is
    none or it counts another number of classes (no score rather than a wrong one)."""
    reference = reference_of(manifest)
    if reference is None or len(reference.class_frequencies) != classes:
        return None
    return reference


def named_classes(labels: Sequence[str], most: int) -> list[str]:
    """The name each class is counted under: its label for the first `most`, else OTHER."""
    return [label if i < most else OTHER for i, label in enumerate(labels)]
