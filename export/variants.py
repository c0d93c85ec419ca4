"""Build every requested artefact file from the core FP32 ONNX graph into a work folder.

The core graph (float NCHW or NCL "input" → "logits") is converted first (FP16, INT8), and only
then wrapped with the in-graph preprocessing (optional for images, always for signals) and the
optional softmax output, so the quantizer never sees the uint8 input, the raw-signal
normalisation or the softmax, and every variant has the same interface.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx

from export.fp16 import Fp16Report, convert_fp16
from export.fp16_range import ActivationRanges
from export.inputs import Preprocess
from export.int8 import int8_settings, quantize_int8
from export.onnx_export import (
    OnnxExportError,
    add_normalisation,
    add_softmax,
    check_onnx,
    count_ops,
    ort_optimize,
    save_onnx,
)
from serving.contract.manifest import TensorRTInfo

__all__ = [
    "ONNX_FILENAMES",
    "PLAN_FILENAMES",
    "PRECISIONS",
    "Candidate",
    "GraphOptions",
    "build_onnx_variants",
    "build_plan_variants",
    "finish_graph",
]

PRECISIONS = ("fp32", "fp16", "int8")
ONNX_FILENAMES = {"fp32": "model.onnx", "fp16": "model.fp16.onnx", "int8": "model.int8.onnx"}
PLAN_FILENAMES = {"fp32": "model.plan", "fp16": "model.fp16.plan", "int8": "model.int8.plan"}
ORT_OPTIMIZED_FILENAME = "model.ort.onnx"


@dataclass(frozen=True, kw_only=True)
class GraphOptions:
    """Interface options applied to every variant."""

    # In-graph preprocessing: HostPreprocess → the model takes uint8 NHWC pixels;
    # SignalPreprocess → it takes raw float32 [N, C, L] signals and normalises them itself.
    preprocess: Preprocess | None = None
    probabilities: bool = False


@dataclass(frozen=True, kw_only=True)
class Candidate:
    """One artefact file waiting for its parity verdict."""

    path: Path  # in the work folder
    filename: str  # its name in the version folder
    format: Literal["onnx", "tensorrt_plan"]
    precision: str
    details: dict[str, Any] = field(default_factory=dict)
    tensorrt: TensorRTInfo | None = None  # plans: what export.tensorrt_build built them for
    fp16: Fp16Report | None = None  # FP16 artefacts: what was kept in FP32 and the range proof


def finish_graph(core: onnx.ModelProto, options: GraphOptions) -> onnx.ModelProto:
    """Wrap a core graph with the interface options, then check it (full checker, strict
    shape inference, and no BatchNormalization node left: folding must have removed them)."""
    model = core
    pre = options.preprocess
    if pre is not None:
        model = add_normalisation(model, pre.input_spec(in_graph=True))  # kiln.json's record
    if options.probabilities:
        model = add_softmax(model)
    check_onnx(model)
    remaining = count_ops(model, "BatchNormalization")
    if remaining:
        raise OnnxExportError(f"{remaining} BatchNormalization node(s) left after folding")
    return model


def _convert(
    core: onnx.ModelProto,
    precision: str,
    target: Literal["cpu", "tensorrt"],
    calibration: np.ndarray | None,
    calibration_samples: int,
    fp16_ranges: ActivationRanges | None = None,
) -> tuple[onnx.ModelProto, dict[str, Any], Fp16Report | None]:
    """The core graph in `precision` for `target`, what the conversion recorded, and for FP16
    its report (nodes kept in FP32 for out-of-range weights or `fp16_ranges` activations)."""
    if precision == "fp32":
        return core, {}, None
    if precision == "fp16":
        graph, report = convert_fp16(core, ranges=fp16_ranges)
        return graph, {"fp16": report.to_dict()}, report
    if precision != "int8":
        raise ValueError(f"unknown precision {precision!r}; expected one of {list(PRECISIONS)}")
    if calibration is None or len(calibration) == 0:
        raise ValueError("int8 needs calibration images")
    settings = int8_settings(target, calibration_samples=min(calibration_samples, len(calibration)))
    return quantize_int8(core, calibration, settings), {"int8": settings.to_dict()}, None


def build_onnx_variants(
    core: onnx.ModelProto,
    precisions: tuple[str, ...],
    work_dir: Path,
    *,
    options: GraphOptions,
    calibration: np.ndarray | None = None,
    calibration_samples: int = 256,
    ort_optimized: bool = False,
    fp16_ranges: ActivationRanges | None = None,
) -> list[Candidate]:
    """ONNX files for each precision (+ an ORT-optimised FP32 copy when asked).

    `calibration` (float32 preprocessed train samples: the core graph's input) is required for int8;
    `fp16_ranges` (the core graph's measured activation ranges) is FP16's range proof.
    """
    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown:
        raise ValueError(f"unknown precision(s) {unknown}; expected some of {list(PRECISIONS)}")
    out: list[Candidate] = []
    for precision in precisions:
        graph, details, fp16 = _convert(core, precision, "cpu", calibration, calibration_samples, fp16_ranges)
        path = save_onnx(finish_graph(graph, options), work_dir / ONNX_FILENAMES[precision])
        out.append(
            Candidate(
                path=path, filename=path.name, format="onnx", precision=precision, details=details, fp16=fp16
            )
        )
        if precision == "fp32" and ort_optimized:
            opt = ort_optimize(path, work_dir / ORT_OPTIMIZED_FILENAME)
            out.append(
                Candidate(
                    path=opt,
                    filename=opt.name,
                    format="onnx",
                    precision="fp32",
                    details={"ort_optimized": "ORT_ENABLE_EXTENDED (ONNX Runtime only)"},
                )
            )
    return out


def build_plan_variants(
    core: onnx.ModelProto,
    precisions: tuple[str, ...],
    work_dir: Path,
    *,
    options: GraphOptions,
    max_batch: int,
    calibration: np.ndarray | None = None,
    calibration_samples: int = 256,
    timing_cache: Path | None = None,
    fp16_ranges: ActivationRanges | None = None,
) -> list[Candidate]:
    """TensorRT plans per precision, each from its own ONNX graph (strongly typed networks):
    FP32 as is, FP16 from the FP16 graph, INT8 from a symmetric-activation QDQ graph."""
    from export.tensorrt_build import build_engine

    out: list[Candidate] = []
    for precision in precisions:
        graph, details, fp16 = _convert(
            core, precision, "tensorrt", calibration, calibration_samples, fp16_ranges
        )
        source = save_onnx(finish_graph(graph, options), work_dir / f"trt-source.{precision}.onnx")
        plan = work_dir / PLAN_FILENAMES[precision]
        info = build_engine(source, plan, max_batch=max_batch, timing_cache=timing_cache)
        out.append(
            Candidate(
                path=plan,
                filename=plan.name,
                format="tensorrt_plan",
                precision=precision,
                details=details,
                tensorrt=info,
                fp16=fp16,
            )
        )
    return out
