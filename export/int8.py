"""INT8 variant by static QDQ quantization (ONNX Runtime's quantizer), calibrated on train images.

Two targets, because they want different graphs:

- ``cpu`` (ONNX Runtime): U8 activations (asymmetric), S8 per-channel symmetric weights, the
  format ORT's CPU kernels are fastest with. On x86 CPUs without VNNI, ORT's U8S8 kernels use
  VPMADDUBSW, which can saturate; ORT's documentation recommends ``reduce_range`` (7-bit
  weights) there and says it is not needed with VNNI. VNNI is detected from /proc/cpuinfo and
  the choice is recorded, so an artefact states what it was built for.
- ``tensorrt``: TensorRT's explicit quantization takes INT8 QDQ with symmetric (zero-point 0)
  activations and weights; a U8 asymmetric graph is not accepted.

`quant_pre_process` (symbolic shape inference + ORT's basic graph optimizations) runs first,
as ORT recommends; its optimisations are hardware-independent.
"""

from __future__ import annotations

import platform
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx

from export.onnx_export import INPUT_NAME, load_onnx, save_onnx

__all__ = ["VNNI_FLAGS", "Int8Settings", "cpu_has_vnni", "int8_settings", "quantize_int8"]

VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
Target = Literal["cpu", "tensorrt"]


def cpu_has_vnni(cpuinfo: str | Path = "/proc/cpuinfo") -> bool | None:
    """True/False from the CPU flags in /proc/cpuinfo; None when it cannot be read (non-Linux)."""
    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return any(flag in flags for flag in VNNI_FLAGS)


@dataclass(frozen=True, kw_only=True)
class Int8Settings:
    """The quantization recipe, recorded in kiln.json beside the artefact."""

    target: Target
    activation_type: Literal["QUInt8", "QInt8"]
    weight_type: Literal["QInt8"] = "QInt8"
    per_channel: bool = True
    reduce_range: bool = False
    symmetric_activations: bool = False
    calibration_method: Literal["MinMax", "Percentile", "Entropy"] = "MinMax"
    calibration_samples: int = 256
    vnni: bool | None = None  # as detected on the machine that quantized
    machine: str = ""

    def __post_init__(self) -> None:
        if self.target not in ("cpu", "tensorrt"):
            raise ValueError(f"target must be 'cpu' or 'tensorrt', got {self.target!r}")
        if self.calibration_samples < 1:
            raise ValueError(f"calibration_samples must be >= 1, got {self.calibration_samples}")
        if self.target == "tensorrt" and (self.activation_type != "QInt8" or not self.symmetric_activations):
            raise ValueError("TensorRT needs symmetric QInt8 activations")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


def int8_settings(
    target: Target = "cpu", *, calibration_samples: int = 256, vnni: bool | None = None
) -> Int8Settings:
    """The recommended settings for `target` on this machine (VNNI detected unless given)."""
    vnni = cpu_has_vnni() if vnni is None else vnni
    machine = platform.machine()
    if target == "tensorrt":
        return Int8Settings(
            target="tensorrt",
            activation_type="QInt8",
            symmetric_activations=True,
            calibration_samples=calibration_samples,
            vnni=vnni,
            machine=machine,
        )
    x86 = machine.lower() in ("x86_64", "amd64", "i686", "x86")
    return Int8Settings(
        target="cpu",
        activation_type="QUInt8",
        reduce_range=x86 and vnni is False,
        calibration_samples=calibration_samples,
        vnni=vnni,
        machine=machine,
    )


def _reader(images: np.ndarray, input_name: str, batch_size: int) -> Any:
    """A CalibrationDataReader over `images` in batches (built lazily: ORT import is heavy)."""
    from onnxruntime.quantization import CalibrationDataReader

    class ArrayReader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches: Iterator[np.ndarray] = iter(
                np.ascontiguousarray(images[i : i + batch_size]) for i in range(0, len(images), batch_size)
            )

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self._batches, None)
            return None if batch is None else {input_name: batch}

    return ArrayReader()


def quantize_int8(
    model: onnx.ModelProto,
    calibration: np.ndarray,
    settings: Int8Settings,
    *,
    input_name: str = INPUT_NAME,
    batch_size: int = 32,
) -> onnx.ModelProto:
    """Static QDQ INT8 copy of an FP32 `model`, calibrated on `calibration` (model inputs).

    `calibration` is a float32 array of already-preprocessed inputs [N, ...]; at most
    `settings.calibration_samples` rows are used.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if len(calibration) == 0:
        raise ValueError("INT8 calibration needs at least one image, got 0")
    images = np.asarray(calibration[: settings.calibration_samples], dtype=np.float32)
    with tempfile.TemporaryDirectory(prefix="kiln-int8-") as tmp:
        source, prepared, quantized = (Path(tmp) / n for n in ("fp32.onnx", "prep.onnx", "int8.onnx"))
        save_onnx(model, source)
        quant_pre_process(str(source), str(prepared))
        quantize_static(
            str(prepared),
            str(quantized),
            _reader(images, input_name, batch_size),
            quant_format=QuantFormat.QDQ,
            per_channel=settings.per_channel,
            reduce_range=settings.reduce_range,
            activation_type=getattr(QuantType, settings.activation_type),
            weight_type=getattr(QuantType, settings.weight_type),
            calibrate_method=getattr(CalibrationMethod, settings.calibration_method),
            extra_options={
                "ActivationSymmetric": settings.symmetric_activations,
                "WeightSymmetric": True,
            },
        )
        return load_onnx(quantized)
