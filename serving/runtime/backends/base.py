"""What every backend shares: tensor specs, the Backend protocol, options, input validation.

Validation happens here, once, Polygraphy-runner style: a backend's `infer` calls
`validate_inputs` and then its own implementation, and the batcher calls the same function per
request before queueing (so one bad request can never fail a whole batch).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from serving.contract.manifest_types import NUMPY_DTYPES
from serving.errors import InvalidInputError

__all__ = [
    "Backend",
    "BackendOptions",
    "TensorSpec",
    "check_outputs",
    "datatype_of",
    "numpy_dtype",
    "parse_device",
    "validate_inputs",
]

_DEVICE_RE = re.compile(r"^(cpu|cuda(:\d+)?)$")
_OPT_LEVELS = ("disable", "basic", "extended", "all")
_ORT_PROVIDERS = ("auto", "cpu", "cuda", "tensorrt")
_DTYPE_TO_DATATYPE = {np.dtype(v): k for k, v in NUMPY_DTYPES.items() if k != "BYTES"}


def numpy_dtype(datatype: str) -> np.dtype:
    """numpy dtype of a KServe datatype name ("FP32" -> float32); ValueError if it has none."""
    if datatype not in NUMPY_DTYPES or datatype == "BYTES":
        raise ValueError(f"datatype {datatype!r} has no numeric numpy dtype")
    return np.dtype(NUMPY_DTYPES[datatype])


def datatype_of(dtype: np.dtype) -> str:
    """KServe datatype name of a numpy dtype (float32 -> "FP32"); ValueError if unsupported."""
    try:
        return _DTYPE_TO_DATATYPE[np.dtype(dtype)]
    except KeyError:
        raise ValueError(f"numpy dtype {np.dtype(dtype)} has no KServe datatype") from None


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One model input or output: KServe datatype name and shape (-1 = dynamic, batch first)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    @property
    def dtype(self) -> np.dtype:
        """The numpy dtype of `datatype`."""
        return numpy_dtype(self.datatype)


@runtime_checkable
class Backend(Protocol):
    """A loaded model artefact. `infer` is blocking and thread-safe (never call it on the loop)."""

    @property
    def inputs(self) -> tuple[TensorSpec, ...]: ...

    @property
    def outputs(self) -> tuple[TensorSpec, ...]: ...

    @property
    def max_batch_size(self) -> int: ...

    @property
    def instances(self) -> int:
        """How many `infer` calls may usefully run at once (one per session/context)."""
        ...

    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...


@dataclass(frozen=True, kw_only=True)
class BackendOptions:
    """How to run an artefact. Validated on construction; errors name the bad value."""

    device: str = "cpu"  # "cpu" | "cuda" | "cuda:N"
    instances: int = 1  # sessions / execution contexts; on GPU each gets its own stream
    intra_op_threads: int = 0  # per instance; 0 = the CPU count split evenly between instances
    inter_op_threads: int = 1
    # Spinning workers burn the cores the gRPC threads need when client and server share a box.
    allow_spinning: bool = False
    graph_optimization: str = "all"  # "disable" | "basic" | "extended" | "all"
    onnx_provider: str = "auto"  # "auto" (cpu or cuda by device) | "cpu" | "cuda" | "tensorrt"
    use_iobinding: bool = True  # CUDA: bind inputs/outputs explicitly (pinned host buffers if possible)
    pinned_memory: bool = True  # CUDA: stage host copies through page-locked buffers (needs cuda-python)
    cuda_graphs: bool = False  # ORT CUDA EP: capture one graph per batch bucket (inputs padded up)
    pad_to_buckets: bool = True  # CUDA EP with IOBinding: pad batches up to powers of two (see ort_runners)
    # cuDNN benchmarks every conv once per new input shape under EXHAUSTIVE; dynamic batching
    # makes many shapes, and on an H200 each new batch size stalled the model ~1 s (served
    # ResNet-20 fell to 14 req/s at concurrency 16, benchmarks/gpu/RESULTS.md). HEURISTIC asks
    # cuDNN's heuristics instead: no stall, kernels within a few % at fixed shapes.
    cudnn_conv_algo_search: str = "HEURISTIC"  # "EXHAUSTIVE" | "HEURISTIC" | "DEFAULT"
    cuda_tf32: bool = True  # CUDA EP: TF32 tensor cores for FP32 convs/matmuls (10-bit mantissa)
    cuda_prefer_nhwc: bool = False  # CUDA EP: NHWC conv kernels (tensor-core friendly for FP16)
    trt_fp16: bool = False  # TensorRT EP: allow fp16 kernels
    trt_int8: bool = False
    trt_engine_cache_dir: str | None = None  # TensorRT EP: reuse built engines across restarts
    trt_workspace_bytes: int = 1 << 30
    trt_allow_other_gpu: bool = False  # native TRT: load a plan built on another GPU model (same CC)

    def __post_init__(self) -> None:
        if not isinstance(self.device, str) or not _DEVICE_RE.match(self.device):
            raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        for name, minimum in (("instances", 1), ("intra_op_threads", 0), ("inter_op_threads", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
        if self.graph_optimization not in _OPT_LEVELS:
            raise ValueError(
                f"graph_optimization must be one of {_OPT_LEVELS}, got {self.graph_optimization!r}"
            )
        if self.onnx_provider not in _ORT_PROVIDERS:
            raise ValueError(f"onnx_provider must be one of {_ORT_PROVIDERS}, got {self.onnx_provider!r}")
        if self.cudnn_conv_algo_search not in ("EXHAUSTIVE", "HEURISTIC", "DEFAULT"):
            raise ValueError(f"cudnn_conv_algo_search: unknown value {self.cudnn_conv_algo_search!r}")
        if self.trt_workspace_bytes < 1:
            raise ValueError(f"trt_workspace_bytes must be >= 1, got {self.trt_workspace_bytes!r}")

    @property
    def device_id(self) -> int | None:
        """CUDA device index, or None on CPU."""
        return parse_device(self.device)

    @property
    def threads_per_instance(self) -> int:
        """Intra-op threads for each instance (explicit, or the CPUs split between instances)."""
        if self.intra_op_threads:
            return self.intra_op_threads
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return max(1, cpus // self.instances)


def parse_device(device: str) -> int | None:
    """ "cpu" -> None, "cuda" -> 0, "cuda:N" -> N (ValueError on anything else)."""
    if not isinstance(device, str) or not _DEVICE_RE.match(device):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if device == "cpu":
        return None
    return int(device.partition(":")[2] or 0)


def validate_inputs(
    specs: Sequence[TensorSpec], inputs: Mapping[str, np.ndarray], max_batch_size: int
) -> int:
    """Check names, datatype, rank, non-batch dims and batch size; return the batch size (rows).

    Every failure is an InvalidInputError naming the tensor, what was expected and what came.
    """
    expected = {s.name for s in specs}
    unknown = sorted(set(inputs) - expected)
    if unknown:
        raise InvalidInputError(f"unknown input(s) {unknown}; the model takes {sorted(expected)}")
    missing = sorted(expected - set(inputs))
    if missing:
        raise InvalidInputError(f"missing input(s) {missing}")
    rows: int | None = None
    for spec in specs:
        array = inputs[spec.name]
        if not isinstance(array, np.ndarray):
            raise InvalidInputError(
                f"input {spec.name!r}: expected a numpy array, got {type(array).__name__}"
            )
        if array.dtype != spec.dtype:
            got = _datatype_name(array.dtype)
            raise InvalidInputError(f"input {spec.name!r}: expected datatype {spec.datatype}, got {got}")
        _check_shape(spec, array.shape)
        if rows is not None and array.shape[0] != rows:
            raise InvalidInputError(
                f"input {spec.name!r}: batch size {array.shape[0]} != {rows} of the others"
            )
        rows = array.shape[0]
    if rows is None or rows < 1:
        raise InvalidInputError(f"batch size must be >= 1, got {rows}")
    if rows > max_batch_size:
        raise InvalidInputError(f"batch size {rows} exceeds the model's max_batch_size {max_batch_size}")
    return rows


def _check_shape(spec: TensorSpec, shape: tuple[int, ...]) -> None:
    if len(shape) != len(spec.shape):
        raise InvalidInputError(
            f"input {spec.name!r}: expected rank {len(spec.shape)} shape {list(spec.shape)}, "
            f"got {list(shape)}"
        )
    for want, got in zip(spec.shape[1:], shape[1:], strict=True):
        if want != -1 and want != got:
            raise InvalidInputError(
                f"input {spec.name!r}: expected shape {list(spec.shape)}, got {list(shape)}"
            )


def _datatype_name(dtype: np.dtype) -> str:
    """The KServe name of what a client sent: a BYTES tensor decodes to a numpy object array."""
    if dtype.kind in "OS":
        return "BYTES"
    try:
        return datatype_of(dtype)
    except ValueError:
        return f"numpy {dtype}"


def check_outputs(outputs: Mapping[str, np.ndarray], specs: Sequence[TensorSpec], rows: int) -> None:
    """Raise ValueError if an output is missing or its batch dimension is not `rows`."""
    for spec in specs:
        array = outputs.get(spec.name)
        if array is None:
            raise ValueError(f"backend returned no output {spec.name!r}")
        if array.ndim == 0 or array.shape[0] != rows:
            raise ValueError(f"output {spec.name!r} has shape {list(array.shape)}, expected batch {rows}")
