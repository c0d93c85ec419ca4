"""What every backend shares: tensor specs, the Backend protocol, options, input validation.

Validation happens here, once, Polygraphy-runner style: a backend's `infer` calls
`validate_inputs` and then its own implementation, and the batcher calls the same function per
request before queueing (so one bad request can never fail a whole batch).
"""

from __future__ import annotations

import contextvars
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from serving.contract.manifest_types import NUMPY_DTYPES
from serving.errors import InvalidInputError

__all__ = [
    "CUDNN_ALGO_SEARCHES",
    "FULL_BATCHES",
    "LONE_BATCH_SPINNING",
    "LOOP_HAS_WORK",
    "ORT_PROVIDERS",
    "SINGLE_THREAD_SMALL_BATCHES",
    "Backend",
    "BackendOptions",
    "CheckedBatch",
    "TensorSpec",
    "check_outputs",
    "datatype_of",
    "numpy_dtype",
    "parse_device",
    "validate_inputs",
    "zero_inputs",
]

_DEVICE_RE = re.compile(r"^(cpu|cuda(:\d+)?)$")
ORT_PROVIDERS = ("auto", "cuda", "tensorrt")  # the CPU EP follows from device "cpu"
LONE_BATCH_SPINNING = ("off", "auto", "on")
SINGLE_THREAD_SMALL_BATCHES = ("off", "auto")
# BackendOptions for work whose batches are full (offline scoring, the precision measurement): one
# session per instance, none of batch_sessions.py's extra ones for small batches, and no batch on
# other workers' cores (a measured layout stays the layout measured)
FULL_BATCHES = {"lone_batch_spinning": "off", "single_thread_small_batches": "off", "share_cores": False}
# Set by the batcher for the batch its thread is about to run: False when no other request is in
# flight in the process (the event loop has nothing to do meanwhile, so a small batch may take
# every thread); True, the default, where unknown (batch_sessions.SizedRunner reads it)
LOOP_HAS_WORK: contextvars.ContextVar[bool] = contextvars.ContextVar("kiln_loop_has_work", default=True)
CUDNN_ALGO_SEARCHES = ("HEURISTIC", "EXHAUSTIVE", "DEFAULT")
_DTYPE_TO_DATATYPE = {np.dtype(v): k for k, v in NUMPY_DTYPES.items() if k != "BYTES"}
_NUMPY_DTYPES = {k: np.dtype(v) for k, v in NUMPY_DTYPES.items() if k != "BYTES"}


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
    """How to run an artefact. Validated on construction; errors name the bad field and value.

    `kiln serve` builds it from ServeConfig in one place (serving/grpc/model_version.py,
    `backend_options`); the GPU fields carry the same names there. docs/gpu.md says what each
    GPU field does to the CUDA path and why its default is what it is.
    """

    device: str = "cpu"  # "cpu" | "cuda" | "cuda:N"
    instances: int = 1  # sessions / execution contexts; on GPU each gets its own stream
    intra_op_threads: int = 0  # per instance; 0 = the CPU count split evenly between instances
    # Spinning workers burn the cores the gRPC threads need when client and server share a box.
    allow_spinning: bool = False
    # CPU, >1 thread, extra sessions per instance (serving/runtime/backends/batch_sessions.py):
    # 1-row batches on a spinning one ("auto": where measured faster at load), and batches too
    # small for the threads on a one-thread one ("auto": sizes measured at load)
    lone_batch_spinning: str = "auto"  # "off" | "auto" | "on"
    single_thread_small_batches: str = "auto"  # "off" | "auto"
    # CPU, in one worker of several (serving/runtime/backends/core_share.py): batches on every core
    # while the other workers idle; off where a measurement must see the layout it asked for
    share_cores: bool = True
    # CPU, sessions of 2+ threads: each pool thread pinned to a core of the session's block, the
    # Run's caller moved to the block's first core (serving/runtime/backends/cpu_pinning.py)
    pin_threads: bool = True
    # CPU: every CPU session of the process allocates from one arena rather than one each
    # (serving/runtime/backends/ort_arena.py)
    share_arena: bool = True
    onnx_provider: str = "auto"  # ONNX on a GPU: "auto"/"cuda" = CUDA EP, "tensorrt" = TensorRT EP
    iobinding: bool = True  # CUDA: bind inputs/outputs explicitly (else plain session.run)
    pinned_memory: bool = True  # CUDA + iobinding: stage host copies in page-locked buffers (cuda-python)
    pad_to_buckets: bool = True  # GPU and null backend: pad batches up to powers of two (see ort_runners)
    cuda_graphs: bool = False  # ORT CUDA EP: capture one graph per batch bucket (inputs padded up)
    # cuDNN benchmarks every conv once per new input shape under EXHAUSTIVE; dynamic batching
    # makes many shapes, and each new batch size stalled the model while served throughput
    # collapsed (benchmarks/gpu/RESULTS.md, run 1). HEURISTIC asks cuDNN's heuristics instead:
    # no stall, and kernels nearly as fast at fixed shapes.
    cudnn_conv_algo_search: str = "HEURISTIC"  # "EXHAUSTIVE" | "HEURISTIC" | "DEFAULT"
    cuda_tf32: bool = True  # CUDA EP: TF32 tensor cores for FP32 convs/matmuls (10-bit mantissa)
    cuda_prefer_nhwc: bool = False  # CUDA EP: NHWC conv kernels (tensor-core friendly for FP16)
    # TensorRT EP: engines take minutes to build; a cache folder reuses them across restarts.
    trt_engine_cache_dir: str | os.PathLike[str] | None = None
    trt_workspace_bytes: int = 1 << 30  # TensorRT EP: scratch memory its tactics may use
    trt_allow_other_gpu: bool = False  # native TRT: load a plan built on another GPU model (same CC)

    def __post_init__(self) -> None:
        if not isinstance(self.device, str) or not _DEVICE_RE.match(self.device):
            raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        for name, minimum in (("instances", 1), ("intra_op_threads", 0), ("trt_workspace_bytes", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
        for name, choices in (
            ("onnx_provider", ORT_PROVIDERS),
            ("lone_batch_spinning", LONE_BATCH_SPINNING),
            ("single_thread_small_batches", SINGLE_THREAD_SMALL_BATCHES),
            ("cudnn_conv_algo_search", CUDNN_ALGO_SEARCHES),
        ):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {list(choices)}, got {getattr(self, name)!r}")
        self._check_cuda_graphs()

    def _check_cuda_graphs(self) -> None:
        """CUDA graphs replay fixed device addresses: one graph per bucket, bound once, CUDA EP only."""
        if self.cuda_graphs and not (
            self.iobinding and self.pad_to_buckets and self.onnx_provider != "tensorrt"
        ):
            raise ValueError(
                "cuda_graphs: needs iobinding and pad_to_buckets on the CUDA EP, got "
                f"iobinding={self.iobinding}, pad_to_buckets={self.pad_to_buckets}, "
                f"onnx_provider={self.onnx_provider!r}"
            )

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


def zero_inputs(specs: Sequence[TensorSpec], rows: int) -> dict[str, np.ndarray]:
    """Zeros of `rows` rows for every input (dynamic non-batch dims become 1): warm-up and timing runs."""
    return {
        s.name: np.zeros((rows, *(d if d > 0 else 1 for d in s.shape[1:])), dtype=numpy_dtype(s.datatype))
        for s in specs
    }


class CheckedBatch(dict[str, np.ndarray]):
    """A batch made of requests that each passed `validate_inputs` against the backend's own specs
    and limit, concatenated (the dynamic batcher's): a pooled backend takes its `rows` instead of
    checking every tensor a second time on each batch's path."""

    __slots__ = ("rows",)

    def __init__(self, arrays: Mapping[str, np.ndarray], rows: int) -> None:
        super().__init__(arrays)
        self.rows = rows


def validate_inputs(
    specs: Sequence[TensorSpec], inputs: Mapping[str, np.ndarray], max_batch_size: int
) -> int:
    """Check names, datatype, rank, non-batch dims and batch size; return the batch size (rows).

    Every failure is an InvalidInputError naming the tensor, what was expected and what came.
    It runs on every request's path (the batcher's submit), so the passing case is plain
    comparisons; the messages are only built for a request that fails them.
    """
    if len(inputs) != len(specs) or any(s.name not in inputs for s in specs):
        _name_error(specs, inputs)
    rows: int | None = None
    for spec in specs:
        array = inputs[spec.name]
        if not isinstance(array, np.ndarray):
            raise InvalidInputError(
                f"input {spec.name!r}: expected a numpy array, got {type(array).__name__}"
            )
        want = _NUMPY_DTYPES.get(spec.datatype)
        if want is None:  # BYTES has no numeric dtype: spec.dtype raises as it always did
            want = spec.dtype
        if array.dtype != want:
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


def _name_error(specs: Sequence[TensorSpec], inputs: Mapping[str, np.ndarray]) -> None:
    """Raise the InvalidInputError for unknown or missing input names."""
    expected = {s.name for s in specs}
    unknown = sorted(set(inputs) - expected)
    if unknown:
        raise InvalidInputError(f"unknown input(s) {unknown}; the model takes {sorted(expected)}")
    raise InvalidInputError(f"missing input(s) {sorted(expected - set(inputs))}")


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
