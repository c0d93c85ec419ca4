"""Backends run a model artefact: ONNX Runtime (CPU/CUDA/TensorRT EP) and native TensorRT.

Only light modules are imported here; onnxruntime, tensorrt and cuda-python load on first use.
"""

from serving.backends.base import (
    Backend,
    BackendOptions,
    TensorSpec,
    check_outputs,
    datatype_of,
    numpy_dtype,
    parse_device,
    validate_inputs,
)
from serving.backends.loader import expected_specs, load_backend, spec_mismatches

__all__ = [
    "Backend",
    "BackendOptions",
    "TensorSpec",
    "check_outputs",
    "datatype_of",
    "expected_specs",
    "load_backend",
    "numpy_dtype",
    "parse_device",
    "spec_mismatches",
    "validate_inputs",
]
