"""The one artefact rule (serving.runtime.model_handle) as `kiln serve` applies it per
device/backend/precision and as `kiln score` does, warm-up inputs, and transport options."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from serving.contract.manifest import Artefact, InputSpec, Manifest, OutputSpec, Provenance, TensorRTInfo
from serving.errors import ModelUnavailableError
from serving.grpc.config import WORKERS_CONNECTION_AGE_S, ConfigError, ServeConfig
from serving.grpc.model_version import artefact_choice
from serving.grpc.server import grpc_options
from serving.runtime.backends import TensorSpec
from serving.runtime.model_handle import ArtefactChoice, choose_artefact, warmup_inputs


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
    assert choose_artefact(MANIFEST, artefact_choice(ServeConfig(repo=tmp_path, **settings))).path == expected


def test_no_matching_artefact_is_unavailable_with_the_choices(tmp_path: Path) -> None:
    with pytest.raises(
        ModelUnavailableError, match=r"no artefact for device=cpu backend=auto precision=int8; have"
    ):
        choose_artefact(MANIFEST, artefact_choice(ServeConfig(repo=tmp_path, precision="int8")))


def test_scoring_gets_what_the_server_would_load() -> None:
    fp32, fp16, plan = MANIFEST.artefacts
    fp16_first = dataclasses.replace(MANIFEST, artefacts=(fp16, fp32, plan))
    assert choose_artefact(fp16_first, ArtefactChoice()).path == "model.onnx"  # FP32 on a CPU
    assert choose_artefact(fp16_first, ArtefactChoice(device="cuda")).path == "model.plan"
    onnx_on_gpu = ArtefactChoice(device="cuda", backend="onnxruntime")
    assert choose_artefact(fp16_first, onnx_on_gpu).path == "model.fp16.onnx"  # any precision, in order
    assert choose_artefact(fp16_first, ArtefactChoice(artefact="model.fp16.onnx")).path == "model.fp16.onnx"


def test_a_version_without_what_the_rule_wants_is_refused_with_what_it_has() -> None:
    only_fp16 = dataclasses.replace(MANIFEST, artefacts=MANIFEST.artefacts[1:2])
    with pytest.raises(
        ModelUnavailableError, match=r"device=cpu backend=auto precision=auto; have \[\('model.fp16"
    ):
        choose_artefact(only_fp16, ArtefactChoice())  # `kiln score` once took any ONNX: see docs/design.md
    with pytest.raises(ModelUnavailableError, match=r"'m' v1 has no artefact 'model.int8.onnx'; have"):
        choose_artefact(MANIFEST, ArtefactChoice(artefact="model.int8.onnx"))


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
    assert "grpc.max_connection_age_grace_ms" not in options  # calls in flight finish, streams too
    assert "grpc.max_connection_age_ms" not in dict(grpc_options(ServeConfig(repo=tmp_path, workers=1)))


def test_connection_age_defaults_to_rebalancing_only_with_workers(tmp_path: Path) -> None:
    """With workers > 1 each connection stays on the worker the kernel hashed it to: a default age
    makes clients re-roll; one worker has nothing to rebalance; 0 is never; the resolved value is
    what --print-config shows."""

    def age_ms(**settings: object) -> int | None:
        return dict(grpc_options(ServeConfig(repo=tmp_path, **settings))).get("grpc.max_connection_age_ms")

    assert age_ms(workers=2) == int(WORKERS_CONNECTION_AGE_S * 1000)
    assert age_ms(workers=1) is None
    assert age_ms(workers=2, max_connection_age_s=0) is None
    assert age_ms(workers=1, max_connection_age_s=5) == 5000
    assert ServeConfig(repo=tmp_path, workers=2).to_dict()["max_connection_age_s"] == WORKERS_CONNECTION_AGE_S
    assert ServeConfig(repo=tmp_path, workers=1).to_dict()["max_connection_age_s"] == 0
    with pytest.raises(ConfigError, match="max_connection_age_s"):
        ServeConfig(repo=tmp_path, max_connection_age_s=0.0001)
