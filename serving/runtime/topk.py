"""Class scores and top-k: the one implementation shared by Classify (online) and `kiln score`.

Both paths must give the same numbers for the same image, so the maths lives here once, and both
reach it through the model handle's ClassificationHead: the classification output is the first
output whose kind is not "other"; scores are a row-wise softmax in float64 over logits (max
subtracted, so large logits cannot overflow), or the model's own values when its output kind is
"probabilities"; top-k is highest score first, ties broken by the lower class index (a stable
sort), so the order is deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from serving.contract.manifest import Manifest, OutputSpec
from serving.errors import InvalidInputError

__all__ = ["ClassificationHead", "class_scores", "classification_output", "softmax", "top_k"]


def classification_output(manifest: Manifest) -> OutputSpec:
    """The output that holds class scores (the first whose kind is not "other").

    InvalidInputError (INVALID_ARGUMENT for Classify) when the model has none: such a model can
    still serve raw tensors (ModelInfer), just not class labels.
    """
    spec = next((o for o in manifest.outputs if o.kind != "other"), None)
    if spec is None:
        names = [o.name for o in manifest.outputs]
        raise InvalidInputError(f"model {manifest.name!r} has no classification output (outputs {names})")
    return spec


@dataclass(frozen=True, slots=True)
class ClassificationHead:
    """A model's classification output and labels: raw outputs in, class scores and top-k out."""

    output: str  # name of the classification output
    kind: str  # "logits" | "probabilities"
    labels: tuple[str, ...]

    @classmethod
    def of(cls, manifest: Manifest) -> ClassificationHead:
        """The head kiln.json describes (InvalidInputError if the model has no classification output)."""
        spec = classification_output(manifest)
        return cls(output=spec.name, kind=spec.kind, labels=manifest.labels)

    def scores(self, outputs: np.ndarray) -> np.ndarray:
        """[N, C] float64 class scores of the classification output's values for N rows."""
        return class_scores(outputs, self.kind)

    def top1(self, outputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each row's top-1 class index and its score (see `top1`)."""
        return top1(outputs, self.kind)

    def top_k(self, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k best classes per row (k clamped to the label count); see `top_k`."""
        return top_k(scores, min(k, len(self.labels)))


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of [N, C] in float64 (stable: the row max is subtracted first).

    A row with inf/NaN logits (a model fed garbage, an FP16 overflow) gives NaN scores, quietly:
    the caller decides what a non-finite row means; numpy's warning would only flood the log.
    """
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
        exp = np.exp(shifted)
        return exp / exp.sum(axis=1, keepdims=True)


def class_scores(values: np.ndarray, kind: str) -> np.ndarray:
    """[N, C] float64 scores: softmax of logits, or the values as given for "probabilities"."""
    if values.ndim != 2:
        values = values.reshape(len(values), -1)
    if kind == "logits":
        return softmax(values)
    if kind == "probabilities":
        return values.astype(np.float64)
    raise ValueError(f"output kind {kind!r} carries no class scores")


def top1(values: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Each row's top-1 class index and its score, float64, without the whole softmax.

    For logits the top-1 probability is 1 / sum(exp(logits - max)): the same float64 operations
    `softmax` does for the largest element (whose exp is exactly 1), so the value is bit-for-bit
    softmax's. Prediction metrics run this on the rows they count. A row with a non-finite
    maximum (inf/NaN logits) scores NaN, as in `softmax`.
    """
    values = values.reshape(len(values), -1)
    best = values.argmax(axis=1)
    top = values[np.arange(len(best)), best].astype(np.float64)
    if kind == "probabilities":
        return best, top
    if kind != "logits":
        raise ValueError(f"output kind {kind!r} carries no class scores")
    if not np.isfinite(top).all():  # inf - inf below: NaN, quietly (see softmax)
        return best, softmax(values)[np.arange(len(best)), best]
    return best, 1.0 / np.exp(values.astype(np.float64) - top[:, None]).sum(axis=1)


def top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best classes per row: (indices int64 [N, k], scores [N, k]), highest first.

    `k` larger than the class count is clamped to it. Ties go to the lower class index.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    k = min(k, scores.shape[1])
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(scores, order, axis=1)
