"""FP16 range proof: the largest |activation| of every tensor of the FP32 graph on real data.

ONNX Runtime's CPU provider runs an FP16 graph through FP32 (it inserts casts and drops the
FP32→FP16→FP32 round trips), so a CPU parity check cannot see an activation past FP16's largest
finite value (65504) that a GPU computing in FP16 turns into inf/NaN. So the FP32 graph is run on
the calibration and held-out inputs with ONNX Runtime's own MinMax calibrator (it adds
ReduceMin/ReduceMax per tensor, so memory stays bounded by one batch's activations), and every
tensor whose range exceeds 65504 / margin is handed to the FP16 conversion to keep in FP32.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from export.onnx_export import INPUT_NAME, save_onnx

__all__ = [
    "DEFAULT_FP16_RANGE_MARGIN",
    "FP16_MAX",
    "ActivationRanges",
    "measure_activation_ranges",
]

FP16_MAX = float(np.finfo(np.float16).max)  # 65504
# 4x headroom: data the calibration/held-out sets did not show may run larger.
DEFAULT_FP16_RANGE_MARGIN = 4.0


@dataclass(frozen=True, kw_only=True)
class ActivationRanges:
    """Largest |value| per float tensor of an FP32 graph over `samples` inputs, judged with `margin`."""

    max_abs: Mapping[str, float]  # tensor name -> largest |value| seen (nan/inf kept as measured)
    samples: int
    margin: float = DEFAULT_FP16_RANGE_MARGIN

    def __post_init__(self) -> None:
        if not self.margin >= 1.0 or math.isinf(self.margin):
            raise ValueError(f"FP16 range margin must be a finite number >= 1, got {self.margin}")

    @property
    def limit(self) -> float:
        """Largest |activation| allowed to run in FP16: 65504 / margin."""
        return FP16_MAX / self.margin

    def over_limit(self) -> dict[str, float]:
        """Tensors past the limit, largest first (a non-finite range counts as past it)."""
        hot = {name: value for name, value in self.max_abs.items() if not value <= self.limit}
        return dict(sorted(hot.items(), key=lambda kv: -kv[1] if math.isfinite(kv[1]) else -math.inf))

    def largest(self) -> tuple[str, float]:
        """(tensor, value) of the largest |activation| seen ("", 0.0) when nothing was measured."""
        if not self.max_abs:
            return "", 0.0
        values = self.max_abs
        name = max(values, key=lambda k: values[k] if math.isfinite(values[k]) else math.inf)
        return name, float(self.max_abs[name])


def _batches(inputs: Sequence[np.ndarray], batch_size: int) -> Iterator[np.ndarray]:
    for array in inputs:
        for start in range(0, len(array), batch_size):
            yield np.ascontiguousarray(array[start : start + batch_size], dtype=np.float32)


def _reader(batches: Iterator[np.ndarray], input_name: str, limit: int) -> Any:
    """A CalibrationDataReader yielding at most `limit` batches of `batches`."""
    from onnxruntime.quantization import CalibrationDataReader

    class ChunkReader(CalibrationDataReader):
        def __init__(self) -> None:
            self.left, self.exhausted = limit, False

        def get_next(self) -> dict[str, np.ndarray] | None:
            if self.left <= 0:
                return None
            batch = next(batches, None)
            self.left -= 1
            self.exhausted = batch is None
            return None if batch is None else {input_name: batch}

    return ChunkReader()


def measure_activation_ranges(
    model: onnx.ModelProto,
    inputs: Sequence[np.ndarray],
    *,
    margin: float = DEFAULT_FP16_RANGE_MARGIN,
    input_name: str = INPUT_NAME,
    batch_size: int = 32,
    chunk_batches: int = 8,
) -> ActivationRanges:
    """Largest |value| of every float tensor (node inputs and outputs) of the FP32 `model` over
    all rows of `inputs` (each an array of model inputs [N, ...]), on ORT's CPU provider.

    Batches go through the calibrator `chunk_batches` at a time; after each chunk it reduces its
    per-batch minima/maxima to one range per tensor, so nothing grows with the number of samples.
    """
    from onnxruntime.quantization.calibrate import MinMaxCalibrater

    if batch_size < 1 or chunk_batches < 1:
        raise ValueError(f"batch_size and chunk_batches must be >= 1, got {batch_size}, {chunk_batches}")
    samples = sum(len(a) for a in inputs)
    if samples == 0:
        raise ValueError("the FP16 range proof needs at least one input sample")
    with tempfile.TemporaryDirectory(prefix="kiln-fp16-range-") as tmp:
        source = save_onnx(model, Path(tmp) / "fp32.onnx")
        calibrator = MinMaxCalibrater(source, augmented_model_path=str(Path(tmp) / "augmented.onnx"))
        calibrator.augment_graph()
        calibrator.create_inference_session()
        batches = _batches(inputs, batch_size)
        reader = None
        while reader is None or not reader.exhausted:
            reader = _reader(batches, input_name, chunk_batches)
            calibrator.collect_data(reader)  # computes and merges this chunk's ranges, then clears
        ranges = calibrator.compute_data()
    max_abs = {
        name: float(np.nanmax(np.abs(np.asarray(data.range_value, dtype=np.float64))))
        for name, data in ranges.items()
    }
    return ActivationRanges(max_abs=max_abs, samples=samples, margin=margin)
