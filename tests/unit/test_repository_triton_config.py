"""config.pbtxt: the fields Triton needs, our parser's round trip, and Triton's own proto parses it."""

from __future__ import annotations

from pathlib import Path

import pytest

from serving.contract.manifest import Artefact, InputSpec, Manifest, OutputSpec, Preprocessing, TensorRTInfo
from serving.contract.triton_config import TritonConfigError, parse_config, render_config, render_labels
from serving.contract.version_policy import VersionPolicy
from tests.unit.test_manifest_schema import make_manifest


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
    text = render_config(
        make_manifest(tmp_path),
        instance_count=2,
        instance_kind="KIND_GPU",
        preferred_batch_sizes=(16, 4),
        max_queue_delay_us=250,
        version_policy=VersionPolicy.latest(2),
    )
    cfg = parse_config(text)
    assert cfg["name"] == "digits"
    assert cfg["platform"] == "onnxruntime_onnx" and cfg["backend"] == "onnxruntime"
    assert cfg["max_batch_size"] == 32 and cfg["default_model_filename"] == "model.onnx"
    assert cfg["input"] == [{"name": "input", "data_type": "TYPE_FP32", "dims": [1, 8, 8]}]  # no batch dim
    assert cfg["output"] == [
        {"name": "logits", "data_type": "TYPE_FP32", "dims": [10], "label_filename": "labels.txt"}
    ]
    assert cfg["dynamic_batching"] == {"preferred_batch_size": [4, 16], "max_queue_delay_microseconds": 250}
    assert cfg["instance_group"] == [{"count": 2, "kind": "KIND_GPU"}]
    assert cfg["version_policy"] == {"latest": {"num_versions": 2}}


def test_in_graph_uint8_and_several_outputs(tmp_path: Path) -> None:
    cfg = parse_config(render_config(_in_graph_manifest(tmp_path)))
    assert cfg["input"] == [{"name": "pixels", "data_type": "TYPE_UINT8", "dims": [8, 8, 3]}]
    assert [o["name"] for o in cfg["output"]] == ["logits", "probabilities", "features"]
    assert [("label_filename" in o) for o in cfg["output"]] == [True, True, False]
    assert "preferred_batch_size" not in cfg["dynamic_batching"]


def test_fp16_io_override_follows_the_artefact(tmp_path: Path) -> None:
    base = make_manifest(tmp_path)
    (tmp_path / "model.fp16.onnx").write_bytes(b"half")
    fp16 = Artefact.from_file(
        tmp_path, "model.fp16.onnx", format="onnx", precision="fp16", io_datatypes={"input": "FP16"}
    )
    manifest = Manifest(**{**base.__dict__, "artefacts": (*base.artefacts, fp16)})
    assert parse_config(render_config(manifest))["input"][0]["data_type"] == "TYPE_FP32"  # default: FP32 file
    cfg = parse_config(render_config(manifest, artefact=fp16))
    assert cfg["input"][0]["data_type"] == "TYPE_FP16" and cfg["default_model_filename"] == "model.fp16.onnx"


def test_triton_proto_accepts_it(tmp_path: Path) -> None:
    model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
    text_format = pytest.importorskip("google.protobuf.text_format")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for manifest in (make_manifest(tmp_path / "a"), _in_graph_manifest(tmp_path / "b")):
        text = render_config(
            manifest, preferred_batch_sizes=(8,), version_policy=VersionPolicy.specific(1, 3)
        )
        proto = text_format.Parse(text, model_config_pb2.ModelConfig())
        assert proto.name == manifest.name and proto.max_batch_size == manifest.max_batch_size
        assert list(proto.input[0].dims) == list(manifest.input.shape[1:])
        assert list(proto.version_policy.specific.versions) == [1, 3]
        # and our parser agrees with the proto on the repeated fields
        ours = parse_config(text)
        assert [o["name"] for o in ours["output"]] == [o.name for o in proto.output]


def test_refusals(tmp_path: Path) -> None:
    manifest = make_manifest(tmp_path)
    with pytest.raises(TritonConfigError, match="instance_kind"):
        render_config(manifest, instance_kind="GPU")
    with pytest.raises(TritonConfigError, match=r"preferred batch sizes \[64\] outside 1..32"):
        render_config(manifest, preferred_batch_sizes=(64,))
    (tmp_path / "model.plan").write_bytes(b"p")
    plan = Artefact.from_file(
        tmp_path, "model.plan", format="tensorrt_plan", precision="fp32",
        tensorrt=TensorRTInfo(version="10.7", gpu_name="g", compute_capability="9.0"),
    )  # fmt: skip
    with pytest.raises(TritonConfigError, match="needs an ONNX artefact"):
        render_config(Manifest(**{**manifest.__dict__, "artefacts": (plan,)}))


def test_labels_text(tmp_path: Path) -> None:
    manifest = make_manifest(tmp_path)
    assert render_labels(manifest).splitlines() == list(manifest.labels)
    broken = Manifest(**{**manifest.__dict__, "labels": ("a\nb", *manifest.labels[1:])})
    with pytest.raises(TritonConfigError, match="line breaks"):
        render_labels(broken)


def test_parser_handles_text_format_variants() -> None:
    text = """
    # comment
    name: 'it\\'s'
    max_batch_size: 8;
    input { name: "x" dims: 3 dims: 4 data_type: TYPE_FP32 }
    parameters: { key: "a" value: { string_value: "b" } }
    optimization < cuda { graphs: true } >
    """
    cfg = parse_config(text)
    assert cfg["name"] == "it's" and cfg["max_batch_size"] == 8
    assert cfg["input"] == [{"name": "x", "dims": [3, 4], "data_type": "TYPE_FP32"}]
    assert cfg["parameters"] == {"key": "a", "value": {"string_value": "b"}}
    assert cfg["optimization"] == {"cuda": {"graphs": True}}
    with pytest.raises(TritonConfigError, match="expected"):
        parse_config("input { name: 'x' ")
    with pytest.raises(TritonConfigError, match="unexpected character"):
        parse_config("name: @")
