"""KServe v2 tensors <-> numpy: typed `contents` and `raw_*_contents`, BYTES framing, and the
Triton classification extension. Pure functions; every malformed request raises
InvalidInputError naming the tensor, what was expected and what came.

Wire facts (see shared/PROTOCOL.md): raw tensors are row-major, little-endian, unpadded, one
entry per tensor in order; BOOL is one byte; a BYTES element is a 4-byte little-endian length then
the bytes; FP16/BF16 travel raw only. Responses always carry `raw_output_contents` with exactly one
entry per output, in order (tritonclient reads numeric outputs only from there).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from protos.inference import grpc_service_pb2 as pb
from serving.errors import BackendError, InvalidInputError

# KServe datatype -> (numpy dtype, typed-contents field); BF16 has no numpy dtype here.
DATATYPES: dict[str, tuple[np.dtype | None, str | None]] = {
    "BOOL": (np.dtype(np.bool_), "bool_contents"),
    "UINT8": (np.dtype("<u1"), "uint_contents"),
    "UINT16": (np.dtype("<u2"), "uint_contents"),
    "UINT32": (np.dtype("<u4"), "uint_contents"),
    "UINT64": (np.dtype("<u8"), "uint64_contents"),
    "INT8": (np.dtype("<i1"), "int_contents"),
    "INT16": (np.dtype("<i2"), "int_contents"),
    "INT32": (np.dtype("<i4"), "int_contents"),
    "INT64": (np.dtype("<i8"), "int64_contents"),
    "FP16": (np.dtype("<f2"), None),
    "FP32": (np.dtype("<f4"), "fp32_contents"),
    "FP64": (np.dtype("<f8"), "fp64_contents"),
    "BYTES": (np.dtype(object), "bytes_contents"),
}
_CONTENT_FIELDS = tuple(f.name for f in pb.InferTensorContents.DESCRIPTOR.fields)
_BY_KIND = {
    (dt.kind, dt.itemsize): name for name, (dt, _) in DATATYPES.items() if dt is not None and name != "BYTES"
}
MAX_ELEMENTS = 1 << 31  # refuse shapes whose element count cannot be a real payload


@dataclass(frozen=True, slots=True)
class RequestedOutput:
    """An output the client asked for; `classification` > 0 asks for top-k "score:index:label"."""

    name: str
    classification: int = 0


def param_value(param: pb.InferParameter) -> Any:
    """The Python value held by an InferParameter (None when unset)."""
    which = param.WhichOneof("parameter_choice")
    return None if which is None else getattr(param, which)


def _element_count(name: str, shape: Sequence[int]) -> int:
    if any(d < 0 for d in shape):
        raise InvalidInputError(f"input {name!r}: shape {list(shape)} has a negative dimension")
    # Zero dims do not count: numpy refuses [0, 2**62, 2**62] too (its size check skips zeros).
    if math.prod(max(d, 1) for d in shape) > MAX_ELEMENTS:
        raise InvalidInputError(f"input {name!r}: shape {list(shape)} has too many elements")
    return math.prod(shape)


def _dtype_for(name: str, datatype: str) -> tuple[np.dtype | None, str | None]:
    if datatype not in DATATYPES:
        if datatype == "BF16":
            raise InvalidInputError(f"input {name!r}: datatype BF16 is not supported by this server")
        raise InvalidInputError(
            f"input {name!r}: unknown datatype {datatype!r}; expected one of {sorted(DATATYPES)}"
        )
    return DATATYPES[datatype]


def decode_bytes_elements(name: str, data: bytes, count: int) -> np.ndarray:
    """Split BYTES framing (4-byte LE length + bytes, repeated) into an object array of `count`."""
    items: list[bytes] = []
    offset = 0
    while offset < len(data):
        if offset + 4 > len(data):
            raise InvalidInputError(f"input {name!r}: truncated BYTES length prefix at offset {offset}")
        (length,) = struct.unpack_from("<I", data, offset)
        offset += 4
        if offset + length > len(data):
            raise InvalidInputError(f"input {name!r}: BYTES element of {length} bytes overruns the buffer")
        items.append(data[offset : offset + length])
        offset += length
    if len(items) != count:
        raise InvalidInputError(f"input {name!r}: expected {count} BYTES elements, got {len(items)}")
    array = np.empty(count, dtype=object)
    array[:] = items
    return array


def encode_bytes_elements(array: np.ndarray) -> bytes:
    """BYTES framing of every element (str is UTF-8 encoded)."""
    parts: list[bytes] = []
    for item in array.reshape(-1):
        data = item.encode("utf-8") if isinstance(item, str) else bytes(item)
        parts.append(struct.pack("<I", len(data)))
        parts.append(data)
    return b"".join(parts)


def _decode_raw(tensor: pb.ModelInferRequest.InferInputTensor, raw: bytes) -> np.ndarray:
    shape = tuple(tensor.shape)
    count = _element_count(tensor.name, shape)
    dtype, _ = _dtype_for(tensor.name, tensor.datatype)
    if tensor.datatype == "BYTES":
        return decode_bytes_elements(tensor.name, raw, count).reshape(shape)
    expected = count * dtype.itemsize
    if len(raw) != expected:
        raise InvalidInputError(
            f"input {tensor.name!r}: raw content is {len(raw)} bytes, expected {expected} "
            f"({tensor.datatype} x shape {list(shape)})"
        )
    array = np.frombuffer(raw, dtype=dtype).reshape(shape)
    return array.astype(dtype.newbyteorder("="), copy=False)


def _decode_typed(tensor: pb.ModelInferRequest.InferInputTensor) -> np.ndarray:
    shape = tuple(tensor.shape)
    count = _element_count(tensor.name, shape)
    dtype, field = _dtype_for(tensor.name, tensor.datatype)
    if field is None:
        raise InvalidInputError(
            f"input {tensor.name!r}: {tensor.datatype} must be sent in raw_input_contents"
        )
    contents = tensor.contents
    stray = [f for f in _CONTENT_FIELDS if f != field and len(getattr(contents, f))]
    if stray:
        raise InvalidInputError(
            f"input {tensor.name!r}: {tensor.datatype} data must be in '{field}', got {stray}"
        )
    values = getattr(contents, field)
    if len(values) != count:
        raise InvalidInputError(
            f"input {tensor.name!r}: {len(values)} values in '{field}', "
            f"expected {count} for shape {list(shape)}"
        )
    if tensor.datatype == "BYTES":
        array = np.empty(count, dtype=object)
        array[:] = list(values)
        return array.reshape(shape)
    native = dtype.newbyteorder("=")
    if tensor.datatype in ("UINT8", "UINT16", "INT8", "INT16"):
        wide = np.asarray(values, dtype=np.int64)
        info = np.iinfo(native)
        if wide.size and (wide.min() < info.min or wide.max() > info.max):
            raise InvalidInputError(f"input {tensor.name!r}: values out of range for {tensor.datatype}")
        return wide.astype(native).reshape(shape)
    return np.asarray(values, dtype=native).reshape(shape)


def decode_inputs(request: pb.ModelInferRequest) -> dict[str, np.ndarray]:
    """All input tensors of `request` as numpy arrays (native byte order), by name."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidInputError(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs (need one per input)"
        )
    arrays: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(request.inputs):
        if tensor.name in arrays:
            raise InvalidInputError(f"input {tensor.name!r} given twice")
        if raw:
            if tensor.HasField("contents") and tensor.contents.ByteSize():
                raise InvalidInputError(f"input {tensor.name!r}: both raw and typed contents given")
            arrays[tensor.name] = _decode_raw(tensor, raw[i])
        else:
            arrays[tensor.name] = _decode_typed(tensor)
    if not arrays:
        raise InvalidInputError("the request has no inputs")
    return arrays


def requested_outputs(request: pb.ModelInferRequest, available: Sequence[str]) -> list[RequestedOutput]:
    """The outputs to return (all, in model order, when none are named); validates names/params."""
    if not request.outputs:
        return [RequestedOutput(name) for name in available]
    result: list[RequestedOutput] = []
    for out in request.outputs:
        if out.name not in available:
            raise InvalidInputError(f"unknown output {out.name!r}; the model has {list(available)}")
        k = 0
        if "classification" in out.parameters:
            value = param_value(out.parameters["classification"])
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidInputError(
                    f"output {out.name!r}: classification must be an integer >= 1, got {value!r}"
                )
            k = value
        result.append(RequestedOutput(out.name, k))
    return result


def classify_rows(array: np.ndarray, k: int, labels: Sequence[str]) -> np.ndarray:
    """Triton's classification extension: per row the top-k as b"score:index[:label]", shape [B, k]."""
    if array.ndim < 1:
        raise InvalidInputError("classification needs an output with a batch dimension")
    scores = array.reshape(array.shape[0], -1).astype(np.float64)
    k = min(k, scores.shape[1])
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    result = np.empty((scores.shape[0], k), dtype=object)
    for row in range(scores.shape[0]):
        for col, idx in enumerate(order[row]):
            text = f"{scores[row, idx]:f}:{idx}"
            if idx < len(labels):
                text += f":{labels[idx]}"
            result[row, col] = text.encode("utf-8")
    return result


def to_raw(array: np.ndarray) -> tuple[str, bytes]:
    """(KServe datatype, raw little-endian bytes) of an output array."""
    if array.dtype == object:
        return "BYTES", encode_bytes_elements(array)
    datatype = _BY_KIND.get((array.dtype.kind, array.dtype.itemsize))
    if datatype is None:
        raise BackendError(
            f"the model produced an output of numpy dtype {array.dtype}, which KServe cannot carry"
        )
    return datatype, np.ascontiguousarray(array, dtype=DATATYPES[datatype][0]).tobytes()


def encode_outputs(
    response: pb.ModelInferResponse,
    outputs: Mapping[str, np.ndarray],
    wanted: Sequence[RequestedOutput],
    labels: Sequence[str] = (),
) -> None:
    """Fill `response.outputs` and `raw_output_contents` (one raw entry per output, in order)."""
    for item in wanted:
        array = outputs[item.name]
        if item.classification:
            array = classify_rows(array, item.classification, labels)
        datatype, raw = to_raw(array)
        response.outputs.add(name=item.name, datatype=datatype, shape=array.shape)
        response.raw_output_contents.append(raw)
