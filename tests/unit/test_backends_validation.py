"""Pure backend pieces: input validation, options, datatype mapping, TensorRT plan compatibility."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from serving.contract.manifest import TensorRTInfo
from serving.errors import InvalidInputError, ModelLoadError
from serving.runtime.backends import (
    BackendOptions,
    TensorSpec,
    datatype_of,
    numpy_dtype,
    parse_device,
    validate_inputs,
)
from serving.runtime.backends.tensorrt_backend import (
    RuntimeTarget,
    check_plan_compatible,
    plan_incompatibility,
)

SPECS = (TensorSpec("image", "FP32", (-1, 3, 4, 4)), TensorSpec("mask", "UINT8", (-1, 4)))


def feeds(rows: int = 2, **overrides: np.ndarray) -> dict[str, np.ndarray]:
    base = {"image": np.zeros((rows, 3, 4, 4), np.float32), "mask": np.zeros((rows, 4), np.uint8)}
    return base | overrides


def test_valid_inputs_return_the_batch_size() -> None:
    assert validate_inputs(SPECS, feeds(3), max_batch_size=8) == 3


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        (feeds(extra=np.zeros(1)), r"unknown input\(s\) \['extra'\]"),
        ({"image": np.zeros((1, 3, 4, 4), np.float32)}, r"missing input\(s\) \['mask'\]"),
        (feeds(image=np.zeros((2, 3, 4, 4), np.float16)), "'image': expected datatype FP32, got FP16"),
        (feeds(mask=np.zeros((2, 4), np.int64)), "'mask': expected datatype UINT8, got INT64"),
        (
            feeds(image=np.zeros((2, 3, 4), np.float32)),
            r"'image': expected rank 4 shape \[-1, 3, 4, 4\], got \[2, 3, 4\]",
        ),
        (
            feeds(image=np.zeros((2, 3, 4, 5), np.float32)),
            r"expected shape \[-1, 3, 4, 4\], got \[2, 3, 4, 5\]",
        ),
        (feeds(mask=np.zeros((3, 4), np.uint8)), "batch size 3 != 2"),
        (feeds(0), "batch size must be >= 1, got 0"),
        (feeds(9), "batch size 9 exceeds the model's max_batch_size 8"),
        (feeds(image=[[0.0]]), "expected a numpy array, got list"),
    ],
)
def test_invalid_inputs_name_the_problem(inputs: dict[str, np.ndarray], message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        validate_inputs(SPECS, inputs, max_batch_size=8)


def test_dynamic_non_batch_dims_accept_any_size() -> None:
    specs = (TensorSpec("x", "FP32", (-1, -1)),)
    assert validate_inputs(specs, {"x": np.zeros((2, 7), np.float32)}, 4) == 2


def test_datatype_mapping_round_trips() -> None:
    for name in ("FP32", "FP16", "UINT8", "INT64", "BOOL"):
        assert datatype_of(numpy_dtype(name)) == name
    with pytest.raises(ValueError, match="BYTES"):
        numpy_dtype("BYTES")
    with pytest.raises(ValueError, match="complex64"):
        datatype_of(np.dtype(np.complex64))


def test_backend_options_validate_and_split_threads() -> None:
    assert parse_device("cpu") is None and parse_device("cuda") == 0 and parse_device("cuda:3") == 3
    assert BackendOptions(device="cuda:1").device_id == 1
    assert BackendOptions(intra_op_threads=3, instances=2).threads_per_instance == 3
    assert BackendOptions(instances=64).threads_per_instance >= 1
    with pytest.raises(ValueError, match="device must be 'cpu', 'cuda' or 'cuda:N', got 'gpu0'"):
        BackendOptions(device="gpu0")
    with pytest.raises(ValueError, match="instances must be an integer >= 1, got 0"):
        BackendOptions(instances=0)
    with pytest.raises(ValueError, match="onnx_provider must be one of"):
        BackendOptions(onnx_provider="openvino")
    with pytest.raises(ValueError, match="onnx_provider must be one of"):
        BackendOptions(onnx_provider="cpu")  # the CPU EP follows from device "cpu"
    with pytest.raises(ValueError, match="cuda_graphs: needs iobinding and pad_to_buckets"):
        BackendOptions(device="cuda", cuda_graphs=True, pad_to_buckets=False)


RECORDED = TensorRTInfo(version="10.7.0", gpu_name="NVIDIA H100 80GB HBM3", compute_capability="9.0")


def test_plan_compatible_on_the_machine_it_was_built_for() -> None:
    here = RuntimeTarget(trt_version="10.7.0.23", gpu_name="NVIDIA H100 80GB HBM3", compute_capability="9.0")
    assert plan_incompatibility(RECORDED, here) is None
    check_plan_compatible("model.plan", RECORDED, here)  # does not raise


def test_plan_incompatibility_names_every_mismatch() -> None:
    there = RuntimeTarget(trt_version="10.3.0", gpu_name="NVIDIA A10", compute_capability="8.6")
    reason = plan_incompatibility(RECORDED, there)
    assert reason is not None
    assert "TensorRT 10.7.0, this server has TensorRT 10.3.0" in reason
    assert "compute capability 9.0, this GPU has 8.6" in reason
    assert "'NVIDIA A10'" in reason
    with pytest.raises(ModelLoadError, match=r"model\.plan cannot run here: .*rebuild it"):
        check_plan_compatible("model.plan", RECORDED, there)


def test_other_gpu_of_same_capability_allowed_only_on_request() -> None:
    sibling = RuntimeTarget(trt_version="10.7.0", gpu_name="NVIDIA H100 PCIe", compute_capability="9.0")
    assert "NVIDIA H100 PCIe" in (plan_incompatibility(RECORDED, sibling) or "")
    assert plan_incompatibility(RECORDED, sibling, allow_other_gpu=True) is None


def test_serving_components_import_without_torch() -> None:
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'training', 'export', 'tensorrt'):\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import serving.errors, serving.runtime.backends, serving.runtime.batcher\n"
        "import serving.runtime.preprocess, serving.grpc.metrics, serving.grpc.gpu_stats\n"
        "import serving.runtime.backends.onnxruntime_backend, serving.runtime.backends.tensorrt_backend\n"
        "import serving.runtime.backends.cuda_rt\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
