"""Drift's parts: the reference export records (export.distribution), its place in kiln.json
(ParityReport.distribution, optional so older files load), and the sliding window whose PSI
the server exports (serving.grpc.drift)."""

from __future__ import annotations

import numpy as np
import pytest

from export.distribution import CONFIDENCE_EDGES, prediction_distribution
from serving.contract.manifest import ManifestError
from serving.contract.manifest_types import ParityReport, PredictionDistribution
from serving.grpc.drift import DriftWindow
from serving.runtime.distribution import psi
from serving.runtime.topk import softmax

LOGITS = np.random.default_rng(3).normal(scale=3.0, size=(500, 5))


def _report(**extra: object) -> ParityReport:
    return ParityReport(
        reference="r", samples=1, max_abs_err=0.0, max_rel_err=0.0, top1_agreement=1.0, **extra
    )


def test_the_reference_holds_the_class_shares_and_the_confidence_histogram() -> None:
    reference = prediction_distribution(LOGITS)
    probabilities = softmax(LOGITS)
    shares = np.bincount(LOGITS.argmax(1), minlength=5) / len(LOGITS)
    top = probabilities.max(1)
    assert reference.samples == 500 and np.allclose(reference.class_frequencies, shares)
    assert reference.confidence_edges == CONFIDENCE_EDGES
    below_half = sum(
        f for e, f in zip(CONFIDENCE_EDGES, reference.confidence_frequencies, strict=True) if e <= 0.5
    )
    assert below_half == pytest.approx(np.mean(top <= 0.5))


def test_kiln_json_round_trips_the_reference_and_older_reports_still_load() -> None:
    report = _report(distribution=prediction_distribution(LOGITS))
    assert ParityReport.from_dict(report.to_dict()) == report
    older = _report().to_dict()
    del older["distribution"]
    assert ParityReport.from_dict(older).distribution is None


@pytest.mark.parametrize(
    ("field", "value"),
    [("class_frequencies", (0.5, 0.4)), ("confidence_edges", (0.5, 0.9)), ("confidence_frequencies", (1.0,))],
)
def test_an_inconsistent_reference_is_refused(field: str, value: tuple[float, ...]) -> None:
    good = {"samples": 2, "class_frequencies": (0.5, 0.5), "confidence_edges": (0.5, 1.0),
            "confidence_frequencies": (0.25, 0.75)}  # fmt: skip
    PredictionDistribution(**good)
    with pytest.raises(ManifestError):
        PredictionDistribution(**{**good, field: value})


def test_psi_is_zero_for_the_same_shares_and_finite_for_an_empty_bin() -> None:
    same = np.array([0.2, 0.3, 0.5])
    assert psi(same, same) == 0.0
    shifted = psi(same, np.array([0.0, 0.0, 1.0]))
    assert 0.2 < shifted < np.inf


def test_the_window_counts_exactly_the_last_rows() -> None:
    reference = prediction_distribution(LOGITS)
    window = DriftWindow(reference, size=64)
    probabilities = softmax(np.random.default_rng(4).normal(scale=3.0, size=(300, 5)))
    best, top = probabilities.argmax(1), probabilities.max(1)
    start = 0
    for size in (7, 50, 1, 64, 90, 13, 75):  # partial fills, exact fills, batches past the size
        window.add(best[start : start + size], top[start : start + size])
        start += size
    kept = slice(start - 64, start)
    exact = DriftWindow(reference, size=64)
    exact.add(best[kept], top[kept])
    assert window.rows == exact.rows == 64
    assert window.class_psi() == exact.class_psi() and window.confidence_psi() == exact.confidence_psi()
    expected = psi(np.asarray(reference.class_frequencies), np.bincount(best[kept], minlength=5) / 64)
    assert window.class_psi() == pytest.approx(expected)


def test_bins_follow_prometheus_le_and_classes_past_the_bound_are_other() -> None:
    from serving.runtime.distribution import confidence_bins, named_classes

    # a value on a bound belongs to that bound's bin (le), past 1.0 (rounding) to the last
    assert confidence_bins(np.array([0.05, 0.1, 0.1000001, 0.99, 1.0, 1.0000001])).tolist() == [
        0,
        0,
        1,
        10,
        11,
        11,
    ]
    assert named_classes(["a", "b", "c", "d"], 2) == ["a", "b", "other", "other"]
