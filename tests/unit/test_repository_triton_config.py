"""config.pbtxt: Triton's ModelConfig proto in protobuf text format, which Triton's own proto reads."""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf import text_format

from protos.inference import model_config_pb2 as mc
from serving.contract.manifest import Artefact, InputSpec, Manifest, OutputSpec, Preprocessing, TensorRTInfo
from serving.contract.triton_config import (
    ServingSettings,
    TritonConfigError,
    model_config,
    render_config,
    render_labels,
)
from serving.contract.version_policy import VersionPolicy
from tests.unit.test_manifest_schema import make_manifest


def _parse(text: str) -> mc.ModelConfig:
    return text_format.Parse(text, mc.ModelConfig())


def _in_graph_manifest(tmp_path: Path) -> Manifest:
    """uint8 NHWC input (in-graph preprocessing) plus a probabilities output."""
    base = make_manifest(tmp_path)
    pre = Preprocessing(
        resize=8, crop=8, mean=(0.5,) * 3, std=(0.25,) * 3, channel_order="RGB", in_graph=True
    )
    outputs = (
        OutputSpec(name="logits", datatype="FP32", shape=(-1, 10)),
        OutputSpec(name="probabilities", datatype="FP32", shape=(-1, 10), kind="probabilities"),
        OutputSpec(name="features", datatype="FP32", shape=(-1, 64), kind="other"),
    )
    spec = InputSpec(name="pixels", datatype="UINT8", layout="NHWC", shape=(-1, 8, 8, 3), preprocessing=pre)
    return Manifest(**{**base.__dict__, "input": spec, "outputs": outputs})


def test_fields(tmp_path: Path) -> None:
    settings = ServingSettings(
        instances=2,
        device="cuda:1",
        preferred_batch_sizes=(16, 4, 64),  # 64 is above the model's limit: left out, as the server does
        max_queue_delay_us=250,
        max_queue_size=64,
        version_policy=VersionPolicy.latest(2),
    )
    cfg = _parse(render_config(make_manifest(tmp_path), settings=settings))
    assert cfg.name == "digits"
    assert cfg.platform == "onnxruntime_onnx" and cfg.backend == "onnxruntime"
    assert cfg.max_batch_size == 32 and cfg.default_model_filename == "model.onnx"
    (inp,) = cfg.input
    assert (inp.name, inp.data_type, list(inp.dims)) == ("input", mc.TYPE_FP32, [1, 8, 8])  # no batch dim
    assert inp.format == mc.ModelInput.FORMAT_NCHW
    assert [(o.name, o.data_type, list(o.dims), o.label_filename) for o in cfg.output] == [
        ("logits", mc.TYPE_FP32, [10], "labels.txt")
    ]
    batching = cfg.dynamic_batching
    assert list(batching.preferred_batch_size) == [4, 16] and batching.max_queue_delay_microseconds == 250
    assert batching.default_queue_policy.max_queue_size == 64
    (group,) = cfg.instance_group
    assert (group.name, group.count, group.kind) == ("digits_0", 2, mc.ModelInstanceGroup.KIND_GPU)
    assert cfg.version_policy.latest.num_versions == 2
    assert cfg.HasField("model_transaction_policy") and cfg.HasField("response_cache")
    assert cfg.parameters["kiln_artefact_sha256"].string_value == make_manifest(tmp_path).artefacts[0].sha256
    assert cfg.parameters["kiln_artefact_precision"].string_value == "fp32"


def test_the_file_is_the_proto_in_text_format(tmp_path: Path) -> None:
    manifest = make_manifest(tmp_path)
    built = model_config(manifest, manifest.artefacts[0], ServingSettings())
    assert _parse(render_config(manifest)) == built


@pytest.mark.parametrize(
    ("policy", "field", "expected"),
    [
        (VersionPolicy.latest(3), "latest", "num_versions: 3"),
        (VersionPolicy.specific(3, 1), "specific", "versions: 1\nversions: 3"),
        (VersionPolicy.all(), "all", ""),
    ],
)
def test_version_policies(tmp_path: Path, policy: VersionPolicy, field: str, expected: str) -> None:
    cfg = _parse(render_config(make_manifest(tmp_path), settings=ServingSettings(version_policy=policy)))
    assert cfg.version_policy.WhichOneof("policy_choice") == field
    assert text_format.MessageToString(getattr(cfg.version_policy, field)).strip() == expected


def test_in_graph_uint8_and_several_outputs(tmp_path: Path) -> None:
    cfg = _parse(render_config(_in_graph_manifest(tmp_path)))
    (inp,) = cfg.input
    assert (inp.name, inp.data_type, list(inp.dims)) == ("pixels", mc.TYPE_UINT8, [8, 8, 3])
    assert inp.format == mc.ModelInput.FORMAT_NHWC
    assert [o.name for o in cfg.output] == ["logits", "probabilities", "features"]
    assert [o.label_filename for o in cfg.output] == ["labels.txt", "labels.txt", ""]
    assert list(cfg.dynamic_batching.preferred_batch_size) == []


def test_fp16_io_override_follows_the_artefact(tmp_path: Path) -> None:
    base = make_manifest(tmp_path)
    (tmp_path / "model.fp16.onnx").write_bytes(b"half")
    fp16 = Artefact.from_file(
        tmp_path, "model.fp16.onnx", format="onnx", precision="fp16", io_datatypes={"input": "FP16"}
    )
    manifest = Manifest(**{**base.__dict__, "artefacts": (*base.artefacts, fp16)})
    assert _parse(render_config(manifest)).input[0].data_type == mc.TYPE_FP32  # default: the FP32 file
    cfg = _parse(render_config(manifest, artefact=fp16))
    assert cfg.input[0].data_type == mc.TYPE_FP16 and cfg.default_model_filename == "model.fp16.onnx"
    assert cfg.parameters["kiln_artefact_precision"].string_value == "fp16"


def test_triton_proto_accepts_it(tmp_path: Path) -> None:
    triton_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    settings = ServingSettings(preferred_batch_sizes=(8,), version_policy=VersionPolicy.specific(1, 3))
    for manifest in (make_manifest(tmp_path / "a"), _in_graph_manifest(tmp_path / "b")):
        text = render_config(manifest, settings=settings)
        proto = text_format.Parse(text, triton_pb2.ModelConfig())
        assert proto.name == manifest.name and proto.max_batch_size == manifest.max_batch_size
        assert list(proto.input[0].dims) == list(manifest.input.shape[1:])
        assert list(proto.version_policy.specific.versions) == [1, 3]
        assert [o.name for o in proto.output] == [o.name for o in manifest.outputs]


def test_refusals(tmp_path: Path) -> None:
    manifest = make_manifest(tmp_path)
    with pytest.raises(TritonConfigError, match="instances must be >= 1, got 0"):
        ServingSettings(instances=0)
    with pytest.raises(TritonConfigError, match=r"preferred batch sizes must be >= 1, got \[0\]"):
        ServingSettings(preferred_batch_sizes=(0,))
    with pytest.raises(TritonConfigError, match=r"max_batch_size must be in \[1, 32\], got 64"):
        render_config(manifest, settings=ServingSettings(max_batch_size=64))
    (tmp_path / "model.plan").write_bytes(b"p")
    plan = Artefact.from_file(
        tmp_path, "model.plan", format="tensorrt_plan", precision="fp32",
        tensorrt=TensorRTInfo(version="10.7", gpu_name="g", compute_capability="9.0"),
    )  # fmt: skip
    with pytest.raises(TritonConfigError, match="needs an ONNX artefact"):
        render_config(Manifest(**{**manifest.__dict__, "artefacts": (plan,)}))
    # the RPC describes a TensorRT plan the server runs, though the file is for ONNX only
    assert model_config(manifest, plan, ServingSettings()).platform == "tensorrt_plan"


def test_labels_text(tmp_path: Path) -> None:
    manifest = make_manifest(tmp_path)
    assert render_labels(manifest).splitlines() == list(manifest.labels)
    broken = Manifest(**{**manifest.__dict__, "labels": ("a\nb", *manifest.labels[1:])})
    with pytest.raises(TritonConfigError, match="line breaks"):
        render_labels(broken)
