"""The reference distribution kiln.json records for the server's drift gauge: what the FP32
artefact predicts on the held-out split, as top-1 class shares and a histogram of the top-1
probability. The server compares the same two summaries of its live traffic with it
(serving/grpc/predictions.py); a shift shows as a rising population stability index."""

from __future__ import annotations

import numpy as np

from serving.contract.manifest_types import PredictionDistribution
from serving.runtime.topk import class_scores

# the upper bounds of kiln_prediction_confidence's buckets, so the dashboard and the score agree
CONFIDENCE_EDGES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)


def prediction_distribution(logits: np.ndarray) -> PredictionDistribution:
    """Top-1 class shares and top-1 probability histogram of logits [N, C]."""
    scores = class_scores(np.asarray(logits), "logits")
    best = scores.argmax(axis=1)
    confidence = scores[np.arange(len(best)), best]
    bins = np.searchsorted(CONFIDENCE_EDGES, confidence, side="left").clip(max=len(CONFIDENCE_EDGES) - 1)
    return PredictionDistribution(
        samples=len(best),
        class_frequencies=tuple((np.bincount(best, minlength=scores.shape[1]) / len(best)).tolist()),
        confidence_edges=CONFIDENCE_EDGES,
        confidence_frequencies=tuple(
            (np.bincount(bins, minlength=len(CONFIDENCE_EDGES)) / len(best)).tolist()
        ),
    )
