"""ONNX export with a dynamic batch, plus graph edits done on the ONNX proto itself.

- :func:`export_onnx` runs the torch.export-based exporter (the default and only maintained
  one in torch 2.13; the TorchScript exporter is deprecated) at opset 18, the opset the
  exporter's ONNX-script library is written in, so no version conversion step is involved.
  The sample batch is 2: a batch of 1 lets tracing specialise the batch dim to a constant.
- :func:`add_normalisation` (the one emitter of in-graph preprocessing, driven by kiln.json's
  input record) / :func:`add_softmax` edit the finished graph rather than the torch model, so
  the same edits apply unchanged to the FP32, FP16 and INT8 variants (the quantizer then never
  sees the uint8 input, the raw signal normalisation or the softmax).
- :func:`check_onnx` runs the full checker and strict shape inference; :func:`save_onnx` writes
  one self-contained file (no external-data side file).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from serving.contract.manifest import InputSpec

__all__ = [
    "INPUT_NAME",
    "LOGITS_NAME",
    "OPSET",
    "PROBABILITIES_NAME",
    "OnnxExportError",
    "add_normalisation",
    "add_softmax",
    "check_onnx",
    "count_ops",
    "export_onnx",
    "load_onnx",
    "ort_optimize",
    "save_onnx",
    "sort_nodes",
]

OPSET = 18
INPUT_NAME = "input"
LOGITS_NAME = "logits"
PROBABILITIES_NAME = "probabilities"
_MAX_PROTO_BYTES = 2**31 - 1  # protobuf's hard limit for one self-contained file


class OnnxExportError(RuntimeError):
    """Export produced a graph that is unusable (failed check, baked-in batch, too large)."""


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's progress prints, torchvision notices and internal FutureWarnings.

    Scoped to the export call: the project runs with warnings as errors, and these warnings come
    from torch internals we cannot act on.
    """
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        logger.setLevel(level)


def export_onnx(
    model: object,
    input_shape: Sequence[int],
    *,
    opset: int = OPSET,
    sample_batch: int = 2,
    optimize: bool = True,
) -> onnx.ModelProto:
    """Export an eval-mode torch model to ONNX: input "input" [batch, *input_shape] float32,
    output "logits" [batch, classes], batch dynamic.

    `optimize` runs the exporter's ONNX optimizer (constant folding, dead code removal);
    ``optimize=False`` leaves the graph as traced (used for the "unfused" benchmark).
    """
    import torch

    if sample_batch < 2:
        raise ValueError(f"sample_batch must be >= 2 so the batch dim stays dynamic, got {sample_batch}")
    if opset < 17:
        raise ValueError(f"opset must be >= 17, got {opset}")
    sample = torch.randn((sample_batch, *input_shape), generator=torch.Generator().manual_seed(0))
    batch = torch.export.Dim("batch", min=1)
    with _quiet_exporter(), torch.no_grad():
        program = torch.onnx.export(
            model,
            (sample,),
            None,
            input_names=[INPUT_NAME],
            output_names=[LOGITS_NAME],
            opset_version=opset,
            dynamic_shapes=({0: batch},),
            external_data=False,
            optimize=optimize,
            verbose=False,
            dynamo=True,
        )
    proto = program.model_proto
    _require_dynamic_batch(proto)
    return proto


def _require_dynamic_batch(model: onnx.ModelProto) -> None:
    for value in (*model.graph.input, *model.graph.output):
        dim0 = value.type.tensor_type.shape.dim[0]
        if dim0.HasField("dim_value"):
            raise OnnxExportError(f"batch dim of '{value.name}' was baked in as {dim0.dim_value}")


def _value(model: onnx.ModelProto, name: str, *, output: bool) -> onnx.ValueInfoProto:
    values = model.graph.output if output else model.graph.input
    for value in values:
        if value.name == name:
            return value
    kind = "output" if output else "input"
    raise OnnxExportError(f"graph has no {kind} named {name!r}; has {[v.name for v in values]}")


def _normalisation_nodes(
    source: str,
    output_name: str,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    scale: float | None,
    spatial_dims: int,
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """The one in-graph normalisation: (·scale) → −mean → ÷std per channel of a float [N, C, ...]
    tensor, in the order and float32 arithmetic of the host's (serving/contract/normalisation.py).
    `scale` None leaves the Mul out (scale 1: the same values, one node fewer)."""
    make = helper.make_node
    per_channel = (1, len(mean), *([1] * spatial_dims))
    constants = [
        numpy_helper.from_array(np.array(mean, dtype=np.float32).reshape(per_channel), "kiln_pre_mean"),
        numpy_helper.from_array(np.array(std, dtype=np.float32).reshape(per_channel), "kiln_pre_std"),
    ]
    nodes = []
    if scale is not None:
        constants.insert(0, numpy_helper.from_array(np.array(scale, dtype=np.float32), "kiln_pre_scale"))
        nodes.append(make("Mul", [source, "kiln_pre_scale"], ["kiln_pre_scaled"], name="kiln_pre_mul"))
        source = "kiln_pre_scaled"
    nodes += [
        make("Sub", [source, "kiln_pre_mean"], ["kiln_pre_centred"], name="kiln_pre_sub"),
        make("Div", ["kiln_pre_centred", "kiln_pre_std"], [output_name], name="kiln_pre_div"),
    ]
    return nodes, constants


def _with_front(
    model: onnx.ModelProto, input_name: str, build: Callable[[str], tuple[list, list]]
) -> onnx.ModelProto:
    """A copy of `model` whose input first runs through the nodes `build(inner_name)` returns."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inner = "kiln_normalised_input"
    for node in out.graph.node:
        node.input[:] = [inner if name == input_name else name for name in node.input]
    nodes, constants = build(inner)
    out.graph.initializer.extend(constants)
    existing = list(out.graph.node)
    del out.graph.node[:]
    out.graph.node.extend(nodes + existing)
    return out


def _static_input(model: onnx.ModelProto, input_name: str, dims: Sequence[int], what: str) -> None:
    """The float input must be static and have `dims` (batch excluded); OnnxExportError naming
    `what` else."""
    old = _value(model, input_name, output=False)
    static = [d.dim_value for d in old.type.tensor_type.shape.dim[1:]]
    if static != list(dims) or old.type.tensor_type.elem_type != TensorProto.FLOAT:
        raise OnnxExportError(
            f"{what} needs a static float [N, {', '.join(map(str, dims))}] input, got {old.type}"
        )


def _uint8_nhwc_front(name: str) -> list[onnx.NodeProto]:
    """uint8 NHWC `name` → float NCHW "kiln_pre_float"; the Transpose runs on uint8, 4x less data
    to move than after the Cast."""
    make = helper.make_node
    return [
        make("Transpose", [name], ["kiln_pre_nchw"], perm=[0, 3, 1, 2], name="kiln_pre_transpose"),
        make("Cast", ["kiln_pre_nchw"], ["kiln_pre_float"], to=TensorProto.FLOAT, name="kiln_pre_cast"),
    ]


def add_normalisation(model: onnx.ModelProto, spec: InputSpec) -> onnx.ModelProto:
    """A copy of `model` that runs kiln.json's input record `spec` (its normalisation, in_graph)
    at its front, in the host's float32 order: ·scale (left out at 1) → −mean → ÷std per channel.

    - image (uint8 NHWC `spec`): the float NCHW input becomes uint8 [batch, H, W, C]:
      Transpose → Cast → normalisation.
    - signal (float32 NCL `spec`): the input stays raw float32 [batch, C, L]. Not folded into
      the first convolution: with zero padding that would change the border outputs.
    """
    record = spec.normalisation
    if record is None or not record.in_graph:
        raise ValueError(f"input {spec.name!r} is not normalised in the graph: {record}")
    image = spec.kind == "image"
    if image and (spec.layout, spec.datatype) != ("NHWC", "UINT8"):
        raise ValueError(f"in-graph image preprocessing takes uint8 NHWC, got {spec.datatype} {spec.layout}")
    dims = (spec.channels, spec.height, spec.width) if image else spec.shape[1:]
    _static_input(model, spec.name, dims, "in-graph preprocessing" if image else "signal normalisation")
    front = _uint8_nhwc_front(spec.name) if image else []
    source = "kiln_pre_float" if image else spec.name
    scale = None if record.scale == 1.0 else record.scale  # x·1 is x: one node fewer

    def build(inner: str) -> tuple[list, list]:
        nodes, constants = _normalisation_nodes(
            source, inner, mean=record.mean, std=record.std, scale=scale, spatial_dims=len(dims) - 1
        )
        return front + nodes, constants

    out = _with_front(model, spec.name, build)
    if image:
        old = _value(out, spec.name, output=False)
        batch = old.type.tensor_type.shape.dim[0].dim_param or "batch"
        old.CopyFrom(helper.make_tensor_value_info(spec.name, TensorProto.UINT8, [batch, *spec.shape[1:]]))
    return out


def add_softmax(model: onnx.ModelProto, *, logits_name: str = LOGITS_NAME) -> onnx.ModelProto:
    """A copy of `model` with a second output "probabilities" = Softmax(logits, axis=-1)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    logits = _value(out, logits_name, output=True)
    out.graph.node.append(
        helper.make_node("Softmax", [logits_name], [PROBABILITIES_NAME], axis=-1, name="kiln_softmax")
    )
    probs = onnx.ValueInfoProto()
    probs.CopyFrom(logits)
    probs.name = PROBABILITIES_NAME
    del probs.metadata_props[:]
    out.graph.output.append(probs)
    return out


def check_onnx(model: onnx.ModelProto) -> onnx.ModelProto:
    """Full ONNX checker + strict shape inference (type checks, data propagation).

    Returns the shape-inferred model; raises OnnxExportError with the checker's message.
    """
    try:
        onnx.checker.check_model(model, full_check=True)
        return onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise OnnxExportError(f"ONNX check failed: {exc}") from exc


def sort_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Topologically sort the main graph in place (some converters append nodes out of order).

    Stable: nodes keep their relative order where dependencies allow. Raises OnnxExportError
    naming an input that no node, initializer or graph input produces.
    """
    graph = model.graph
    ready = {"", *(v.name for v in graph.input), *(i.name for i in graph.initializer)}
    pending = list(graph.node)
    ordered: list[onnx.NodeProto] = []
    while pending:
        progress = [n for n in pending if all(name in ready for name in n.input)]
        if not progress:
            missing = sorted({x for n in pending for x in n.input if x not in ready})
            raise OnnxExportError(f"graph has inputs nothing produces (or a cycle): {missing[:5]}")
        for node in progress:
            ready.update(node.output)
        ordered.extend(progress)
        taken = {id(n) for n in progress}
        pending = [n for n in pending if id(n) not in taken]
    del graph.node[:]
    graph.node.extend(ordered)
    return model


def count_ops(model: onnx.ModelProto, op_type: str) -> int:
    """How many nodes of `op_type` the main graph has (e.g. 'BatchNormalization')."""
    return sum(1 for node in model.graph.node if node.op_type == op_type)


def save_onnx(model: onnx.ModelProto, path: str | Path) -> Path:
    """Write `model` as ONE self-contained file (weights inline, no external-data side file)."""
    size = model.ByteSize()
    if size > _MAX_PROTO_BYTES:
        raise OnnxExportError(f"model is {size} bytes, over the 2 GiB limit of a self-contained ONNX file")
    target = Path(path)
    onnx.save_model(model, str(target), save_as_external_data=False)
    return target


def load_onnx(path: str | Path) -> onnx.ModelProto:
    """Load an ONNX file, weights included."""
    return onnx.load_model(str(path), load_external_data=True)


def ort_optimize(source: str | Path, target: str | Path) -> Path:
    """Save ONNX Runtime's offline-optimised copy (ORT_ENABLE_EXTENDED) of `source` to `target`.

    EXTENDED, not ALL: level ALL adds layout transforms tied to this CPU's instruction set. The
    copy may contain ORT-only fused ops (com.microsoft domain): it is for ORT, not for TensorRT.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(target)
    ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
    return Path(target)
