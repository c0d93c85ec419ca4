"""Backends run a model artefact: ONNX Runtime (CPU/CUDA/TensorRT EP) and native TensorRT; the
timing backend (`backend: null`) stands in for them to measure the server's own overhead.

Only light modules are imported here; onnxruntime, tensorrt and cuda-python load on first use.
"""

from serving.runtime.backends.base import (
    FULL_BATCHES,
    Backend,
    BackendOptions,
    TensorSpec,
    check_outputs,
    datatype_of,
    numpy_dtype,
    parse_device,
    validate_inputs,
    zero_inputs,
)
from serving.runtime.backends.loader import backend_device, expected_specs, load_backend, spec_mismatches
from serving.runtime.backends.null_backend import NullBackend, NullTiming, null_timing
from serving.runtime.backends.pool import InstanceBusy

__all__ = [
    "FULL_BATCHES",
    "Backend",
    "BackendOptions",
    "InstanceBusy",
    "NullBackend",
    "NullTiming",
    "TensorSpec",
    "backend_device",
    "check_outputs",
    "datatype_of",
    "expected_specs",
    "load_backend",
    "null_timing",
    "numpy_dtype",
    "parse_device",
    "spec_mismatches",
    "validate_inputs",
    "zero_inputs",
]
