"""The parity gate: each artefact against the PyTorch checkpoint on held-out data.

Measures max abs error, max relative error (per row, against the row's largest reference
logit: element-wise relative error explodes near zero), top-1 agreement with PyTorch, and
accuracy against the labels next to the reference accuracy. Tolerances per precision
(:data:`DEFAULT_TOLERANCES`); an artefact past them fails unless forced.

ONNX Runtime's CPU provider has no FP16 kernels for most ops: it inserts casts and computes in
FP32, so FP16 parity on CPU measures the rounding of weights/activations to FP16, not GPU FP16
arithmetic. The report says so (:data:`FP16_CPU_NOTE`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from serving.contract.manifest_types import PredictionDistribution

__all__ = [
    "DEFAULT_TOLERANCES",
    "FP16_CPU_NOTE",
    "ParityResult",
    "Tolerance",
    "compare_outputs",
    "onnx_runner",
    "run_batched",
    "torch_logits",
]

FP16_CPU_NOTE = (
    "ONNX Runtime's CPU provider computes FP16 graphs in FP32 around casts: this measures the FP16 "
    "rounding of weights and activations, not GPU FP16 arithmetic"
)


@dataclass(frozen=True, kw_only=True)
class Tolerance:
    """Pass criteria; None disables a criterion."""

    min_agreement: float | None = None  # top-1 agreement with PyTorch, fraction
    max_rel_err: float | None = None
    max_accuracy_drop: float | None = None  # reference accuracy − artefact accuracy, fraction

    def __post_init__(self) -> None:
        for name in ("min_agreement", "max_rel_err", "max_accuracy_drop"):
            value = getattr(self, name)
            if value is not None and not value >= 0:
                raise ValueError(f"tolerance {name} must be >= 0, got {value}")

    def to_dict(self) -> dict[str, float]:
        """The set criteria only (for the manifest)."""
        return {k: float(v) for k, v in vars(self).items() if v is not None}


DEFAULT_TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(min_agreement=1.0, max_rel_err=1e-4),
    "fp16": Tolerance(min_agreement=0.995),
    "int8": Tolerance(max_accuracy_drop=0.01),
}


@dataclass(frozen=True, kw_only=True)
class ParityResult:
    """One artefact's measured parity; `failures` lists each criterion missed, with the margin."""

    artefact: str
    precision: str
    samples: int
    max_abs_err: float
    max_rel_err: float
    top1_agreement: float
    accuracy: float
    reference_accuracy: float
    tolerance: Tolerance
    failures: tuple[str, ...] = ()
    runtime: str = ""
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    distribution: PredictionDistribution | None = None  # the FP32 ONNX artefact's (export.distribution)

    @property
    def passed(self) -> bool:
        """True when no criterion was missed."""
        return not self.failures


def _fraction(values: np.ndarray) -> float:
    return float(np.mean(values)) if values.size else 0.0


def compare_outputs(
    reference: np.ndarray,
    candidate: np.ndarray,
    labels: np.ndarray,
    tolerance: Tolerance,
    *,
    artefact: str,
    precision: str,
    runtime: str = "",
    note: str = "",
) -> ParityResult:
    """Compare candidate logits [N, K] with reference logits [N, K] (float64 math)."""
    ref = np.asarray(reference, dtype=np.float64)
    cand = np.asarray(candidate, dtype=np.float64)
    if ref.shape != cand.shape or ref.ndim != 2:
        raise ValueError(f"logits shapes differ or are not [N, K]: {ref.shape} vs {cand.shape}")
    if len(labels) != len(ref) or len(ref) == 0:
        raise ValueError(f"need one label per row and at least one row, got {len(labels)} for {len(ref)}")
    finite = bool(np.isfinite(cand).all())
    diff = np.abs(cand - ref) if finite else np.full_like(ref, np.inf)
    row_scale = np.maximum(np.abs(ref).max(axis=1), np.finfo(np.float64).tiny)
    max_abs = float(diff.max())
    max_rel = float((diff.max(axis=1) / row_scale).max())
    ref_top1, cand_top1 = ref.argmax(axis=1), cand.argmax(axis=1)
    agreement = _fraction(ref_top1 == cand_top1)
    accuracy, ref_accuracy = _fraction(cand_top1 == labels), _fraction(ref_top1 == labels)
    failures = [] if finite else ["outputs contain NaN/inf"]
    tol = tolerance
    if tol.min_agreement is not None and agreement < tol.min_agreement:
        failures.append(f"top-1 agreement {agreement:.2%} < {tol.min_agreement:.2%}")
    if tol.max_rel_err is not None and not max_rel <= tol.max_rel_err:
        failures.append(f"max rel err {max_rel:.3g} > {tol.max_rel_err:.3g}")
    drop = ref_accuracy - accuracy
    if tol.max_accuracy_drop is not None and drop > tol.max_accuracy_drop + 1e-12:
        failures.append(f"accuracy drop {drop * 100:.2f} pts > {tol.max_accuracy_drop * 100:.2f} pts")
    return ParityResult(
        artefact=artefact,
        precision=precision,
        samples=len(ref),
        max_abs_err=max_abs,
        max_rel_err=max_rel,
        top1_agreement=agreement,
        accuracy=accuracy,
        reference_accuracy=ref_accuracy,
        tolerance=tol,
        failures=tuple(failures),
        runtime=runtime,
        note=note,
    )


def run_batched(fn: Callable[[np.ndarray], np.ndarray], inputs: np.ndarray, batch_size: int) -> np.ndarray:
    """Apply `fn` to `inputs` in batches of at most `batch_size` and concatenate the results."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    outputs = [
        fn(np.ascontiguousarray(inputs[i : i + batch_size])) for i in range(0, len(inputs), batch_size)
    ]
    return np.concatenate(outputs, axis=0)


def onnx_runner(
    path: str | Path, *, output: str = "logits", threads: int = 0
) -> tuple[Callable[[np.ndarray], np.ndarray], str]:
    """(batch -> `output` function, runtime description) for an ONNX file on ORT's CPU provider."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3  # keep ORT's graph-optimizer notices out of the progress display
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name

    def run(batch: np.ndarray) -> np.ndarray:
        return np.asarray(session.run([output], {input_name: batch})[0])

    return run, f"onnxruntime {ort.__version__} CPUExecutionProvider"


def torch_logits(model: Any, inputs: np.ndarray, *, batch_size: int = 256) -> np.ndarray:
    """Float32 logits of an eval-mode torch model on CPU for float inputs [N, C, H, W]."""
    import torch

    def run(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(batch)).float().numpy()

    return run_batched(run, np.asarray(inputs, dtype=np.float32), batch_size)
