"""KServe tensor codec, checked against what the real tritonclient sends and reads."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from protos.inference import grpc_service_pb2 as pb
from serving.errors import InvalidInputError
from serving.protocol.codec import (
    classify_rows,
    decode_bytes_elements,
    decode_inputs,
    encode_bytes_elements,
    encode_outputs,
    requested_outputs,
)

grpcclient = pytest.importorskip("tritonclient.grpc", reason="tritonclient not installed")
service_pb2 = pytest.importorskip("tritonclient.grpc.service_pb2")


_TYPED_FIELD = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "INT8": "int_contents",
    "INT64": "int64_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def _request(arrays: dict[str, np.ndarray], *, binary: bool) -> pb.ModelInferRequest:
    """Raw: built exactly as tritonclient does (it always sends raw), then parsed with our proto.
    Typed: the `contents` field per datatype (what other KServe clients send)."""
    theirs = service_pb2.ModelInferRequest(model_name="m")
    for name, array in arrays.items():
        dtype = grpcclient.np_to_triton_dtype(array.dtype)
        item = grpcclient.InferInput(name, list(array.shape), dtype)
        if binary:
            item.set_data_from_numpy(array)
            theirs.raw_input_contents.extend([item._get_content()])
        else:
            getattr(item._get_tensor().contents, _TYPED_FIELD[dtype]).extend(array.reshape(-1).tolist())
        theirs.inputs.extend([item._get_tensor()])
    return pb.ModelInferRequest.FromString(theirs.SerializeToString())


ARRAYS = {
    "fp32": np.arange(12, dtype=np.float32).reshape(2, 2, 3) / 7,
    "fp64": np.linspace(-1, 1, 6).reshape(2, 3),
    "int8": np.array([[-128, 0, 127]], dtype=np.int8),
    "uint8": np.array([[0, 200, 255]], dtype=np.uint8),
    "int64": np.array([[-(2**40), 5]], dtype=np.int64),
    "uint64": np.array([[2**63, 1]], dtype=np.uint64),
    "bool": np.array([[True, False, True]]),
    "bytes": np.array([[b"ab", b"", "\u00e9".encode()]], dtype=object),
}


@pytest.mark.parametrize("binary", [True, False], ids=["raw", "typed"])
@pytest.mark.parametrize("key", sorted(ARRAYS))
def test_decode_matches_what_tritonclient_sent(key: str, binary: bool) -> None:
    array = ARRAYS[key]
    decoded = decode_inputs(_request({"x": array}, binary=binary))["x"]
    assert decoded.shape == array.shape
    if array.dtype == object:
        assert decoded.tolist() == array.tolist()
    else:
        assert decoded.dtype == array.dtype and np.array_equal(decoded, array)


def test_fp16_raw_only() -> None:
    array = np.array([[1.5, -2.25]], dtype=np.float16)
    assert np.array_equal(decode_inputs(_request({"h": array}, binary=True))["h"], array)
    typed = pb.ModelInferRequest(
        inputs=[pb.ModelInferRequest.InferInputTensor(name="h", datatype="FP16", shape=[1])]
    )
    with pytest.raises(InvalidInputError, match="'h': FP16 must be sent in raw_input_contents"):
        decode_inputs(typed)


def _raw_request(datatype: str, shape: list[int], raw: list[bytes]) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(raw_input_contents=raw)
    request.inputs.add(name="x", datatype=datatype, shape=shape)
    return request


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (
            _raw_request("FP32", [1, 3], [b"\0" * 11]),
            "'x': raw content is 11 bytes, expected 12 (FP32 x shape [1, 3])",
        ),
        (_raw_request("FP32", [1, 3], [b"\0" * 12, b""]), "raw_input_contents has 2 entries for 1 inputs"),
        (_raw_request("FP33", [1], [b"\0" * 4]), "'x': unknown datatype 'FP33'"),
        (_raw_request("FP32", [1, -3], [b""]), "'x': shape [1, -3] has a negative dimension"),
        (_raw_request("BYTES", [2], [struct.pack("<I", 9) + b"abc"]), "BYTES element of 9 bytes overruns"),
        (_raw_request("BYTES", [2], [struct.pack("<I", 1) + b"a"]), "expected 2 BYTES elements, got 1"),
        (pb.ModelInferRequest(), "the request has no inputs"),
    ],
)
def test_decode_errors_name_the_problem(request_: pb.ModelInferRequest, message: str) -> None:
    with pytest.raises(InvalidInputError) as info:
        decode_inputs(request_)
    assert message in str(info.value)


def test_typed_count_range_and_mixing_errors() -> None:
    request = pb.ModelInferRequest()
    tensor = request.inputs.add(name="x", datatype="FP32", shape=[2, 2])
    tensor.contents.fp32_contents.extend([1.0, 2.0, 3.0])
    with pytest.raises(InvalidInputError, match="3 values in 'fp32_contents', expected 4 for shape"):
        decode_inputs(request)
    tensor.contents.fp32_contents.append(4.0)
    tensor.contents.int_contents.append(1)
    with pytest.raises(
        InvalidInputError, match="FP32 data must be in 'fp32_contents', got \\['int_contents'\\]"
    ):
        decode_inputs(request)
    small = pb.ModelInferRequest()
    small.inputs.add(name="u", datatype="UINT8", shape=[1]).contents.uint_contents.append(300)
    with pytest.raises(InvalidInputError, match="values out of range for UINT8"):
        decode_inputs(small)
    both = _raw_request("FP32", [1], [b"\0" * 4])
    both.inputs[0].contents.fp32_contents.append(1.0)
    with pytest.raises(InvalidInputError, match="both raw and typed contents"):
        decode_inputs(both)


def test_requested_outputs_validation() -> None:
    request = pb.ModelInferRequest()
    assert [o.name for o in requested_outputs(request, ["a", "b"])] == ["a", "b"]
    request.outputs.add(name="b").parameters["classification"].int64_param = 3
    assert requested_outputs(request, ["a", "b"])[0].classification == 3
    request.outputs.add(name="zzz")
    with pytest.raises(InvalidInputError, match="unknown output 'zzz'; the model has \\['a', 'b'\\]"):
        requested_outputs(request, ["a", "b"])
    bad = pb.ModelInferRequest()
    bad.outputs.add(name="a").parameters["classification"].int64_param = 0
    with pytest.raises(InvalidInputError, match="classification must be an integer >= 1, got 0"):
        requested_outputs(bad, ["a"])


def test_bytes_framing_round_trip() -> None:
    items = np.array([b"x", b"", b"hello"], dtype=object)
    assert decode_bytes_elements("t", encode_bytes_elements(items), 3).tolist() == items.tolist()


def test_classification_like_triton() -> None:
    logits = np.array([[0.1, 2.0, -1.0], [3.0, 0.0, 0.5]], dtype=np.float32)
    top = classify_rows(logits, 2, ["cat", "dog", "eel"])
    assert top.shape == (2, 2)
    assert top[0].tolist() == [b"2.000000:1:dog", b"0.100000:0:cat"]
    assert top[1, 0] == b"3.000000:0:cat"
    assert classify_rows(logits, 10, []).shape == (2, 3)  # k capped at the class count, no labels


def test_encoded_response_reads_back_through_tritonclient() -> None:
    logits = np.array([[0.25, -1.5, 4.0]], dtype=np.float32)
    request = pb.ModelInferRequest()
    request.outputs.add(name="probs")
    request.outputs.add(name="logits").parameters["classification"].int64_param = 1
    response = pb.ModelInferResponse(model_name="m", id="r1")
    wanted = requested_outputs(request, ["logits", "probs"])
    encode_outputs(response, {"logits": logits, "probs": logits * 2}, wanted, ["a", "b", "c"])
    assert len(response.raw_output_contents) == len(response.outputs) == 2
    result = grpcclient.InferResult(service_pb2.ModelInferResponse.FromString(response.SerializeToString()))
    assert np.array_equal(result.as_numpy("probs"), logits * 2)
    assert result.as_numpy("logits").tolist() == [[b"4.000000:2:c"]]
