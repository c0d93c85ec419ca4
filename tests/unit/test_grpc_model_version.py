"""Artefact choice per device/backend/precision, warm-up inputs, and transport options."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from serving.contract.manifest import Artefact, InputSpec, Manifest, OutputSpec, Provenance, TensorRTInfo
from serving.errors import ModelUnavailableError
from serving.grpc.config import ServeConfig
from serving.grpc.model_version import choose_artefact, warmup_inputs
from serving.grpc.server import grpc_options
from serving.runtime.backends import TensorSpec


def _artefact(path: str, fmt: str, precision: str) -> Artefact:
    trt = (
        TensorRTInfo(version="10.0", gpu_name="GPU", compute_capability="9.0")
        if fmt == "tensorrt_plan"
        else None
    )
    return Artefact(path=path, format=fmt, precision=precision, sha256="0" * 64, size_bytes=1, tensorrt=trt)


MANIFEST = Manifest(
    name="m",
    version=1,
    architecture={},
    labels=("a", "b"),
    input=InputSpec(name="input", datatype="FP32", layout="NCHW", shape=(-1, 1, 4, 4)),
    outputs=(OutputSpec(name="logits", datatype="FP32", shape=(-1, 2)),),
    artefacts=(
        _artefact("model.onnx", "onnx", "fp32"),
        _artefact("model.fp16.onnx", "onnx", "fp16"),
        _artefact("model.plan", "tensorrt_plan", "fp16"),
    ),
    max_batch_size=8,
    provenance=Provenance(
        run_id="r", dataset_fingerprint="f", git_commit=None, created_at="t", kiln_version="0"
    ),
)


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({}, "model.onnx"),
        ({"precision": "fp16"}, "model.fp16.onnx"),
        ({"device": "cuda"}, "model.plan"),
        ({"device": "cuda", "backend": "onnxruntime"}, "model.onnx"),
        ({"device": "cuda:1", "backend": "onnxruntime", "precision": "fp16"}, "model.fp16.onnx"),
    ],
)
def test_choose_artefact(tmp_path: Path, settings: dict, expected: str) -> None:
    assert choose_artefact(MANIFEST, ServeConfig(repo=tmp_path, **settings)).path == expected


def test_no_matching_artefact_is_unavailable_with_the_choices(tmp_path: Path) -> None:
    with pytest.raises(
        ModelUnavailableError, match=r"no artefact for device=cpu backend=auto precision=int8; have"
    ):
        choose_artefact(MANIFEST, ServeConfig(repo=tmp_path, precision="int8"))


def test_warmup_inputs_follow_the_backend_specs() -> None:
    class Specs:
        inputs = (TensorSpec("x", "UINT8", (-1, 3, -1, 5)),)

    arrays = warmup_inputs(Specs(), 4)  # type: ignore[arg-type]
    assert arrays["x"].shape == (4, 3, 1, 5) and arrays["x"].dtype == np.uint8 and not arrays["x"].any()


def test_grpc_options_carry_limits_and_connection_age(tmp_path: Path) -> None:
    options = dict(
        grpc_options(ServeConfig(repo=tmp_path, max_receive_message_bytes=4096, max_connection_age_s=30))
    )
    assert options["grpc.max_receive_message_length"] == 4096
    assert options["grpc.max_connection_age_ms"] == 30_000
    assert "grpc.max_connection_age_ms" not in dict(grpc_options(ServeConfig(repo=tmp_path)))
