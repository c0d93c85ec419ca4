"""The shadow verdict (serving/grpc/shadow.py): agreement, latency ratio with its slack, failures."""

from __future__ import annotations

import numpy as np

from serving.grpc.shadow import PROMOTE, REJECT, ShadowPolicy, ShadowTally

POLICY = ShadowPolicy(
    sample=1.0, min_requests=10, min_agreement=0.9, max_latency_ratio=2.0, timeout_s=60.0, queue_size=4
)
SAME, OTHER = np.array([0, 1]), np.array([0, 2])


def _tally(candidate_top1: np.ndarray, serving_s: float, candidate_s: float, n: int = 10) -> ShadowTally:
    tally = ShadowTally()
    for _ in range(n):
        tally.add(SAME, candidate_top1, serving_s, candidate_s)
    return tally


def test_no_verdict_before_min_requests() -> None:
    assert _tally(OTHER, 0.01, 0.01, n=9).verdict(POLICY) is None


def test_agreeing_and_fast_enough_is_promoted() -> None:
    verdict = _tally(SAME, 0.010, 0.019).verdict(POLICY)
    assert verdict is not None and verdict[0] == PROMOTE and "agreement 1.0000" in verdict[1]


def test_half_agreement_is_rejected() -> None:
    verdict = _tally(OTHER, 0.01, 0.01).verdict(POLICY)
    assert verdict == (REJECT, verdict[1]) and "agreement 0.5000 < 0.9" in verdict[1]


def test_a_slow_candidate_is_rejected_on_latency() -> None:
    verdict = _tally(SAME, 0.010, 0.025).verdict(POLICY)
    assert verdict is not None and verdict[0] == REJECT and "p99 compute time ratio > 2.0" in verdict[1]


def test_microsecond_jitter_is_not_a_latency_rejection() -> None:
    verdict = _tally(SAME, 0.00002, 0.0002).verdict(POLICY)  # 10x, but 0.18 ms apart
    assert verdict is not None and verdict[0] == PROMOTE


def test_as_many_failures_as_min_requests_reject() -> None:
    tally = ShadowTally()
    tally.failed, tally.last_error = 10, "input spec differs"
    verdict = tally.verdict(POLICY)
    assert verdict is not None and verdict[0] == REJECT and "input spec differs" in verdict[1]
