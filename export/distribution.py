"""The reference distribution kiln.json records for the server's drift gauge: what the FP32
artefact predicts on the held-out split, as top-1 class shares and a histogram of the top-1
probability. The server compares the same two summaries of its live traffic with it
(serving/grpc/predictions.py); a shift shows as a rising population stability index."""

from __future__ import annotations

import numpy as np

from serving.contract.manifest_types import PredictionDistribution
from serving.runtime.distribution import CONFIDENCE_EDGES, confidence_bins
from serving.runtime.topk import class_scores


def prediction_distribution(logits: np.ndarray) -> PredictionDistribution:
    """Top-1 class shares and top-1 probability histogram of logits [N, C]."""
    scores = class_scores(np.asarray(logits), "logits")
    best = scores.argmax(axis=1)
    confidence = scores[np.arange(len(best)), best]
    bins = confidence_bins(confidence)  # the server's binning: its live histogram and this agree
    return PredictionDistribution(
        samples=len(best),
        class_frequencies=tuple((np.bincount(best, minlength=scores.shape[1]) / len(best)).tolist()),
        confidence_edges=CONFIDENCE_EDGES,
        confidence_frequencies=tuple(
            (np.bincount(bins, minlength=len(CONFIDENCE_EDGES)) / len(best)).tolist()
        ),
    )
