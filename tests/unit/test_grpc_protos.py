"""The generated protobuf code is current, importable beside tritonclient, and wire-compatible
with the public KServe v2 / Triton definitions (tritonclient ships a compiled copy of them)."""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FileDescriptor

from protos import generate
from protos.inference import grpc_service_pb2 as ours
from protos.inference import model_config_pb2 as ours_config
from protos.kiln.classify.v1 import classify_pb2

triton_service = pytest.importorskip("tritonclient.grpc.service_pb2", reason="tritonclient not installed")
triton_config = pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="tritonclient not installed")


def test_committed_generated_code_is_current(tmp_path: Path) -> None:
    generate.generate(tmp_path)
    stale = [
        rel
        for rel in generate.generated_paths()
        if not (generate.REPO_ROOT / rel).is_file()
        or (generate.REPO_ROOT / rel).read_bytes() != (tmp_path / rel).read_bytes()
    ]
    assert not stale, f"generated code is stale, run `python -m protos.generate`: {stale}"


def _messages(fd: FileDescriptor) -> dict[str, Descriptor]:
    found: dict[str, Descriptor] = {}

    def walk(desc: Descriptor) -> None:
        found[desc.full_name] = desc
        for nested in desc.nested_types:
            walk(nested)

    for desc in fd.message_types_by_name.values():
        walk(desc)
    return found


def _enums(fd: FileDescriptor) -> dict[str, EnumDescriptor]:
    found = {e.full_name: e for e in fd.enum_types_by_name.values()}
    for desc in _messages(fd).values():
        found.update({e.full_name: e for e in desc.enum_types})
    return found


def _field_signature(field) -> tuple:
    sub = field.message_type or field.enum_type
    return (field.number, field.type, field.is_repeated, sub.full_name if sub else None)


@pytest.mark.parametrize(
    ("mine", "reference"),
    [(ours_config.DESCRIPTOR, triton_config.DESCRIPTOR), (ours.DESCRIPTOR, triton_service.DESCRIPTOR)],
    ids=["model_config", "grpc_service"],
)
def test_every_field_matches_the_published_proto(mine: FileDescriptor, reference: FileDescriptor) -> None:
    theirs = _messages(reference)
    mismatches = []
    for name, desc in _messages(mine).items():
        assert name in theirs, f"{name} is not in the published proto"
        for field in desc.fields:
            ref = theirs[name].fields_by_name.get(field.name)
            if ref is None or _field_signature(ref) != _field_signature(field):
                mismatches.append(f"{name}.{field.name}")
    assert not mismatches, f"fields differ from the published proto: {mismatches}"
    ref_enums = _enums(reference)
    for name, enum in _enums(mine).items():
        assert {v.name: v.number for v in enum.values} == {v.name: v.number for v in ref_enums[name].values}


def test_service_methods_match_the_published_service() -> None:
    mine = ours.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    theirs = triton_service.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert mine.full_name == "inference.GRPCInferenceService"

    def sig(service):
        return {
            m.name: (m.input_type.full_name, m.output_type.full_name, m.client_streaming, m.server_streaming)
            for m in service.methods
        }

    assert sig(mine) == sig(theirs)


def test_bytes_round_trip_with_tritonclient_messages() -> None:
    request = ours.ModelInferRequest(model_name="m", model_version="2", id="req-1")
    request.parameters["timeout"].int64_param = 1500
    request.parameters["priority"].uint64_param = 3
    tensor = request.inputs.add(name="input", datatype="FP32", shape=[2, 3])
    tensor.contents.fp32_contents.extend([0.5] * 6)
    request.outputs.add(name="logits").parameters["classification"].int64_param = 2
    request.raw_input_contents.append(b"\x00\x01")
    decoded = triton_service.ModelInferRequest.FromString(request.SerializeToString())
    assert decoded.parameters["priority"].uint64_param == 3
    assert list(decoded.inputs[0].shape) == [2, 3]
    assert decoded.outputs[0].parameters["classification"].int64_param == 2
    back = ours.ModelInferRequest.FromString(decoded.SerializeToString())
    assert back == request


def test_generated_code_uses_the_private_pool_not_the_default() -> None:
    from google.protobuf import descriptor_pool

    from protos._pool import POOL

    assert (
        POOL.FindMessageTypeByName("kiln.classify.v1.ClassifyRequest")
        is classify_pb2.ClassifyRequest.DESCRIPTOR
    )
    with pytest.raises(KeyError):
        descriptor_pool.Default().FindMessageTypeByName("kiln.classify.v1.ClassifyRequest")
