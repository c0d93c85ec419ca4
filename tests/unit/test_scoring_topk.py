"""serving.runtime.topk: the class-score maths shared by Classify and `kiln score`."""

from __future__ import annotations

import numpy as np
import pytest

from serving.runtime.topk import class_scores, softmax, top_k


def test_softmax_rows_sum_to_one_and_survive_huge_logits() -> None:
    logits = np.array([[1000.0, 1000.0, -1000.0], [0.0, 1.0, 2.0]], np.float32)
    probs = softmax(logits)
    assert probs.dtype == np.float64
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)
    np.testing.assert_allclose(probs[0], [0.5, 0.5, 0.0])
    expected = np.exp([0.0, 1.0, 2.0]) / np.exp([0.0, 1.0, 2.0]).sum()
    np.testing.assert_allclose(probs[1], expected, rtol=1e-12)


def test_top_k_orders_best_first_and_breaks_ties_by_index() -> None:
    scores = np.array([[0.1, 0.3, 0.3, 0.2], [0.4, 0.1, 0.2, 0.3]])
    indices, values = top_k(scores, 3)
    assert indices.tolist() == [[1, 2, 3], [0, 3, 2]]
    np.testing.assert_array_equal(values, [[0.3, 0.3, 0.2], [0.4, 0.3, 0.2]])


def test_top_k_clamps_k_and_rejects_zero() -> None:
    indices, _ = top_k(np.array([[0.2, 0.8]]), 5)
    assert indices.tolist() == [[1, 0]]
    with pytest.raises(ValueError, match="k must be >= 1, got 0"):
        top_k(np.array([[0.2, 0.8]]), 0)


def test_class_scores_by_output_kind() -> None:
    values = np.array([[0.25, 0.75]], np.float32)
    np.testing.assert_array_equal(class_scores(values, "probabilities"), [[0.25, 0.75]])
    np.testing.assert_allclose(class_scores(values, "logits"), softmax(values))
    with pytest.raises(ValueError, match="'other' carries no class scores"):
        class_scores(values, "other")


def test_the_server_uses_the_same_numbers() -> None:
    """Classify (serving.grpc.classify) must agree with serving.runtime.topk on every score."""
    grpc_classify = pytest.importorskip("serving.grpc.classify")
    logits = np.random.default_rng(0).normal(scale=5, size=(16, 10)).astype(np.float32)
    ours = softmax(logits)
    np.testing.assert_array_equal(grpc_classify.softmax(logits), ours)
    indices, values = top_k(ours, 3)
    labels = tuple(f"c{i}" for i in range(10))
    for result, idx, vals in zip(grpc_classify.top_k(ours, 3, labels), indices, values, strict=True):
        assert [p.index for p in result.predictions] == idx.tolist()
        np.testing.assert_allclose([p.score for p in result.predictions], vals, rtol=1e-6)
