"""FP16 variant of an FP32 ONNX graph, with guards for weights and activations FP16 cannot hold.

Folding BN into a conv multiplies its weights by γ/√(σ²+ε); a channel with a tiny running
variance can push a weight past FP16's largest finite value (65504). ONNX Runtime's converter
would silently clamp it. Here such weights are found first: the nodes that use them are kept in
FP32 (``policy="keep_fp32"``, reported) or the conversion is refused (``policy="refuse"``).

Activations get the same treatment from measured ranges (:mod:`export.fp16_range`): every node
that produces or consumes a tensor past 65504 / margin is kept in FP32. ONNX Runtime's converter
casts each kept node's outputs to FP16 and back (FP32 islands), which would still overflow, so
those FP32→FP16→FP32 round trips are removed afterwards, and the result is checked: no
out-of-range tensor may reach an FP16 value or a node left in FP16, else Fp16Error.
Inputs/outputs stay FP32 unless asked (``keep_io_types``), so clients need not change.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import onnx
from onnx import numpy_helper

from export.fp16_range import FP16_MAX, ActivationRanges
from export.onnx_export import sort_nodes

__all__ = ["FP16_MAX", "Fp16Error", "Fp16Report", "convert_fp16", "find_fp16_overflows"]


class Fp16Error(ValueError):
    """FP16 conversion refused: weights or activations would overflow."""


@dataclass(frozen=True, kw_only=True)
class Fp16Report:
    """What the conversion did about values FP16 cannot hold."""

    overflowing: tuple[str, ...]  # initializer names with |w| > 65504
    kept_fp32_nodes: tuple[str, ...]  # nodes left in FP32 (for weights or activations)
    keep_io_types: bool
    ranges: ActivationRanges | None = None  # the range proof, when measured
    hot_tensors: dict[str, float] = field(default_factory=dict)  # |activation| past the limit

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        out: dict[str, Any] = {
            "overflowing_initializers": list(self.overflowing),
            "kept_fp32_nodes": list(self.kept_fp32_nodes),
            "keep_io_types": self.keep_io_types,
        }
        if self.ranges is not None:
            tensor, largest = self.ranges.largest()
            out["range"] = {
                "margin": self.ranges.margin,
                "limit": self.ranges.limit,
                "samples": self.ranges.samples,
                "max_abs_activation": largest,
                "max_activation_tensor": tensor,
                "tensors_over_limit": dict(self.hot_tensors),
            }
        return out


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


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every typed tensor (inputs, outputs, initializers, inferred values)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*graph.value_info, *graph.input, *graph.output)}
    types.update({t.name: t.data_type for t in graph.initializer})
    return types


def _cast_to(node: onnx.NodeProto) -> int | None:
    if node.op_type != "Cast":
        return None
    return next((a.i for a in node.attribute if a.name == "to"), None)


def _drop_round_trips(model: onnx.ModelProto) -> int:
    """Turn each Cast(FP32→FP16)→Cast(→FP32) pair into Identity of the FP32 value, and drop the
    FP16 casts nobody reads any more. Returns how many pairs were removed."""
    types = _elem_types(model)
    producers = {out: node for node in model.graph.node for out in node.output}
    removed = 0
    for node in model.graph.node:
        first = producers.get(node.input[0]) if _cast_to(node) == onnx.TensorProto.FLOAT else None
        if first is None or _cast_to(first) != onnx.TensorProto.FLOAT16:
            continue
        if types.get(first.input[0]) != onnx.TensorProto.FLOAT:
            continue
        node.op_type, node.input[0] = "Identity", first.input[0]
        del node.attribute[:]
        removed += 1
    read = {name for node in model.graph.node for name in node.input} | {o.name for o in model.graph.output}
    fp16_casts = [n for n in model.graph.node if _cast_to(n) == onnx.TensorProto.FLOAT16]
    dead = [n for n in fp16_casts if n.output[0] not in read]
    for node in dead:
        model.graph.node.remove(node)
    gone = {n.output[0] for n in dead}
    kept_info = [v for v in model.graph.value_info if v.name not in gone]
    del model.graph.value_info[:]
    model.graph.value_info.extend(kept_info)
    return removed


def _hot_sources(source: onnx.ModelProto, hot: Iterable[str]) -> dict[str, tuple[str, int]]:
    """Where each hot tensor comes from: (producing node name, output index), or ("", 0) for a
    graph input. Node names survive the conversion; the converter may rename their outputs."""
    where = {out: (node.name, i) for node in source.graph.node for i, out in enumerate(node.output)}
    return {name: where.get(name, ("", 0)) for name in hot}


def _unproven(
    model: onnx.ModelProto, sources: dict[str, tuple[str, int]], blocked: set[str]
) -> dict[str, str]:
    """Hot tensors that still reach FP16 in the converted `model`, with where: each must stay an
    FP32 value through Identity/Cast(→FP32) only, into nodes kept in FP32 or FP32 graph outputs."""
    types = _elem_types(model)
    by_name = {node.name: node for node in model.graph.node}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    bad: dict[str, str] = {}
    for tensor, (producer, index) in sources.items():
        start = by_name[producer].output[index] if producer in by_name else tensor
        frontier, seen = [start], set()
        while frontier and tensor not in bad:
            value = frontier.pop()
            seen.add(value)
            if types.get(value, onnx.TensorProto.FLOAT) != onnx.TensorProto.FLOAT:
                bad[tensor] = f"{value} is {onnx.TensorProto.DataType.Name(types[value])}"
            for node in consumers.get(value, []):
                if node.op_type == "Identity" or _cast_to(node) == onnx.TensorProto.FLOAT:
                    frontier += [o for o in node.output if o not in seen]
                elif _cast_to(node) == onnx.TensorProto.FLOAT16:
                    bad[tensor] = f"cast to FP16 by {node.name!r}"
                elif node.name not in blocked:
                    bad[tensor] = f"read by {node.op_type} node {node.name!r} in FP16"
    return bad


def _range_blocked(source: onnx.ModelProto, hot: Iterable[str]) -> set[str]:
    """Names of the nodes that produce or read a hot tensor: all of them must compute in FP32."""
    hot = set(hot)
    return {node.name for node in source.graph.node if hot & {*node.input, *node.output}}


def _check_ranges(ranges: ActivationRanges | None, policy: str) -> dict[str, float]:
    """The hot tensors, or Fp16Error when they cannot or may not be kept in FP32."""
    hot = ranges.over_limit() if ranges is not None else {}
    if not hot:
        return hot
    nonfinite = [name for name, value in hot.items() if not np.isfinite(value)]
    if nonfinite:
        raise Fp16Error(f"FP16 refused: the FP32 graph itself produced inf/NaN in {', '.join(nonfinite[:5])}")
    if policy == "refuse":
        listed = ", ".join(f"{k} ({v:.3g})" for k, v in list(hot.items())[:5])
        raise Fp16Error(
            f"FP16 refused: {len(hot)} activation(s) exceed FP16 max {FP16_MAX:g} / margin "
            f"{ranges.margin:g} = {ranges.limit:g}: {listed}"  # type: ignore[union-attr]
        )
    return hot


def convert_fp16(
    model: onnx.ModelProto,
    *,
    keep_io_types: bool = True,
    policy: Literal["keep_fp32", "refuse"] = "keep_fp32",
    ranges: ActivationRanges | None = None,
) -> tuple[onnx.ModelProto, Fp16Report]:
    """FP16 copy of `model` (ONNX Runtime's float16 converter) and a report.

    Nodes consuming a weight with |w| > 65504, and (given measured `ranges` of this FP32 graph)
    nodes producing or reading an activation past 65504 / margin, stay FP32
    (`policy="keep_fp32"`), or Fp16Error is raised naming them (`policy="refuse"`). Fp16Error is
    also raised when an out-of-range activation could not be kept out of FP16. Values below FP16's
    smallest subnormal are rounded to it by the converter (sign kept), not flushed to zero.
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
    hot = _check_ranges(ranges, policy)
    blocked = {node.name for node in source.graph.node if set(node.input) & set(overflowing)}
    blocked |= _range_blocked(source, hot)
    converted = convert_float_to_float16(
        source,
        keep_io_types=keep_io_types,
        node_block_list=sorted(blocked) or None,
        disable_shape_infer=False,
    )
    _drop_round_trips(converted)
    sort_nodes(converted)  # the converter appends its input casts after their consumers
    unproven = _unproven(converted, _hot_sources(source, hot), blocked)
    if unproven:
        where = "; ".join(f"{k}: {v}" for k, v in list(unproven.items())[:5])
        raise Fp16Error(f"FP16 refused: out-of-range activations could not be kept in FP32 ({where})")
    report = Fp16Report(
        overflowing=overflowing,
        kept_fp32_nodes=tuple(sorted(blocked)),
        keep_io_types=keep_io_types,
        ranges=ranges,
        hot_tensors=hot,
    )
    return converted, report
