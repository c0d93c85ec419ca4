"""FP16 variant of an FP32 ONNX graph, with a guard for weights FP16 cannot hold.

Folding BN into a conv multiplies its weights by γ/√(σ²+ε); a channel with a tiny running
variance can push a weight past FP16's largest finite value (65504). ONNX Runtime's converter
would silently clamp it. Here such weights are found first: the nodes that use them are kept in
FP32 (``policy="keep_fp32"``, reported) or the conversion is refused (``policy="refuse"``).
Inputs/outputs stay FP32 unless asked (``keep_io_types``), so clients need not change.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import onnx
from onnx import numpy_helper

from export.onnx_export import sort_nodes

__all__ = ["FP16_MAX", "Fp16Error", "Fp16Report", "convert_fp16", "find_fp16_overflows"]

FP16_MAX = float(np.finfo(np.float16).max)  # 65504


class Fp16Error(ValueError):
    """FP16 conversion refused: weights would overflow."""


@dataclass(frozen=True, kw_only=True)
class Fp16Report:
    """What the conversion did about values FP16 cannot hold."""

    overflowing: tuple[str, ...]  # initializer names with |w| > 65504
    kept_fp32_nodes: tuple[str, ...]  # nodes left in FP32 because of them
    keep_io_types: bool

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {
            "overflowing_initializers": list(self.overflowing),
            "kept_fp32_nodes": list(self.kept_fp32_nodes),
            "keep_io_types": self.keep_io_types,
        }


def _float_tensors(model: onnx.ModelProto) -> Iterable[tuple[str, np.ndarray]]:
    """(name, array) of float32 initializers and Constant-node values of the main graph."""
    for init in model.graph.initializer:
        if init.data_type == onnx.TensorProto.FLOAT:
            yield init.name, numpy_helper.to_array(init)
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value" and attr.t.data_type == onnx.TensorProto.FLOAT:
                    yield node.output[0], numpy_helper.to_array(attr.t)


def find_fp16_overflows(model: onnx.ModelProto) -> tuple[str, ...]:
    """Names of float32 weights/constants whose magnitude exceeds FP16's max finite value."""
    return tuple(
        name for name, array in _float_tensors(model) if array.size and float(np.abs(array).max()) > FP16_MAX
    )


def _name_nodes(model: onnx.ModelProto) -> None:
    """Give every unnamed node a unique name (the converter's block list works by name)."""
    taken = {node.name for node in model.graph.node if node.name}
    for i, node in enumerate(model.graph.node):
        if not node.name:
            name = f"kiln_{node.op_type}_{i}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)


def convert_fp16(
    model: onnx.ModelProto,
    *,
    keep_io_types: bool = True,
    policy: Literal["keep_fp32", "refuse"] = "keep_fp32",
) -> tuple[onnx.ModelProto, Fp16Report]:
    """FP16 copy of `model` (ONNX Runtime's float16 converter) and a report.

    Nodes consuming a weight with |w| > 65504 stay FP32 (`policy="keep_fp32"`), or Fp16Error is
    raised naming the weights (`policy="refuse"`). Values below FP16's smallest subnormal are
    rounded to it by the converter (sign kept), not flushed to zero.
    """
    from onnxruntime.transformers.float16 import convert_float_to_float16

    if policy not in ("keep_fp32", "refuse"):
        raise ValueError(f"policy must be 'keep_fp32' or 'refuse', got {policy!r}")
    source = onnx.ModelProto()
    source.CopyFrom(model)
    _name_nodes(source)
    # The exporter records value_info for initializers too; the converter would retype those to
    # FP16 even when it keeps the initializer FP32 (blocked nodes), breaking the graph's types.
    del source.graph.value_info[:]
    overflowing = find_fp16_overflows(source)
    if overflowing and policy == "refuse":
        raise Fp16Error(f"weights overflow FP16 (|w| > {FP16_MAX:g}): {', '.join(overflowing)}")
    blocked = sorted({node.name for node in source.graph.node if set(node.input) & set(overflowing)})
    converted = convert_float_to_float16(
        source, keep_io_types=keep_io_types, node_block_list=blocked or None, disable_shape_infer=False
    )
    sort_nodes(converted)  # the converter appends its input casts after their consumers
    report = Fp16Report(overflowing=overflowing, kept_fp32_nodes=tuple(blocked), keep_io_types=keep_io_types)
    return converted, report
