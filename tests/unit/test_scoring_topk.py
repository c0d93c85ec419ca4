"""serving.runtime.topk: the class-score maths and the ClassificationHead that Classify and
`kiln score` both use (there is no second copy to keep in agreement)."""

from __future__ import annotations

import numpy as np
import pytest

from serving.contract.manifest import Artefact, InputSpec, Manifest, OutputSpec, Provenance
from serving.errors import InvalidInputError
from serving.runtime.topk import ClassificationHead, class_scores, softmax, top_k


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


def _manifest(*outputs: OutputSpec) -> Manifest:
    return Manifest(
        name="m",
        version=1,
        architecture={},
        labels=("a", "b", "c"),
        input=InputSpec(name="input", datatype="FP32", layout="NCHW", shape=(-1, 1, 4, 4)),
        outputs=outputs,
        artefacts=(
            Artefact(path="model.onnx", format="onnx", precision="fp32", sha256="0" * 64, size_bytes=1),
        ),
        max_batch_size=8,
        provenance=Provenance(
            run_id="r", dataset_fingerprint="f", git_commit=None, created_at="t", kiln_version="0"
        ),
    )


def test_the_head_reads_the_first_classification_output_and_clamps_k_to_the_labels() -> None:
    head = ClassificationHead.of(
        _manifest(
            OutputSpec(name="features", datatype="FP32", shape=(-1, 5), kind="other"),
            OutputSpec(name="logits", datatype="FP32", shape=(-1, 3)),
            OutputSpec(name="probabilities", datatype="FP32", shape=(-1, 3), kind="probabilities"),
        )
    )
    assert (head.output, head.kind, head.labels) == ("logits", "logits", ("a", "b", "c"))
    logits = np.array([[[0.0, 3.0, 3.0]], [[2.0, 0.0, 1.0]]], np.float32)  # [N, 1, C]: flattened per row
    scores = head.scores(logits)
    np.testing.assert_allclose(scores, softmax(logits.reshape(2, 3)))
    indices, values = head.top_k(scores, 10)
    assert indices.tolist() == [[1, 2, 0], [0, 2, 1]]  # ties to the lower index; k clamped to 3 labels
    np.testing.assert_array_equal(values, np.take_along_axis(scores, indices, axis=1))


def test_a_model_without_a_classification_output_has_no_head() -> None:
    other = OutputSpec(name="embedding", datatype="FP32", shape=(-1, 8), kind="other")
    with pytest.raises(
        InvalidInputError, match=r"'m' has no classification output \(outputs \['embedding'\]\)"
    ):
        ClassificationHead.of(_manifest(other))


def test_non_finite_logits_give_nan_scores_without_a_warning() -> None:
    """Garbage in (perf_analyzer's random bytes decode to NaN/inf) must not raise or warn."""
    import numpy as np

    from serving.runtime.topk import softmax

    scores = softmax(np.array([[np.inf, np.inf, 0.0], [np.nan, 1.0, 2.0], [0.0, 1.0, 2.0]], np.float32))
    assert np.isnan(scores[:2]).any(axis=1).all() and np.isfinite(scores[2]).all()


def test_top1_is_softmax_of_the_best_class_to_the_bit() -> None:
    """Prediction metrics take top-1 without the whole softmax: the same values, NaN rows included."""
    from serving.runtime.topk import top1

    rng = np.random.default_rng(7)
    logits = rng.normal(scale=8.0, size=(257, 10)).astype(np.float32)
    logits[3, 4] = -np.inf  # a class that can never win: still a finite row
    best, top = top1(logits, "logits")
    scores = softmax(logits)
    assert np.array_equal(best, scores.argmax(axis=1))
    assert np.array_equal(top, scores[np.arange(len(best)), best])  # bit for bit, not approx
    logits[5, 0], logits[6, 1] = np.inf, np.nan
    _, top = top1(logits, "logits")
    assert np.isnan(top[5]) and np.isnan(top[6]) and np.isfinite(np.delete(top, [5, 6])).all()
    probabilities = scores.astype(np.float32)
    best, top = top1(probabilities, "probabilities")
    assert np.array_equal(top, probabilities.max(axis=1).astype(np.float64))
