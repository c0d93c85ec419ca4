"""Hypothesis strategies for hostile requests, each drawn as a `Case`: a method path and the
serialized message(s) to send to it with a bytes-in, bytes-out client (so malformed protobuf can
be sent too, and the server's parser is fuzzed along with its handlers).

Kinds of case: structured ModelInferRequest (wrong dtypes, shapes with negative/huge/zero dims,
raw byte counts off by one, BYTES framing with bad length prefixes, NaN/Inf values, many
parameters), Classify requests (see tests.fuzz.images), byte-level mutations of valid messages,
random bytes and deeply nested groups sent to every method, and streams mixing all of these.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
from grpc_health.v1 import health_pb2
from hypothesis import strategies as st

from protos.inference import grpc_service_pb2 as pb
from protos.kiln.classify.v1 import classify_pb2 as cpb
from serving.protocol.codec import DATATYPES
from tests.fuzz.images import encode, images

INFER = "/inference.GRPCInferenceService/ModelInfer"
STREAM_INFER = "/inference.GRPCInferenceService/ModelStreamInfer"
CLASSIFY = "/kiln.classify.v1.Classifier/Classify"
CLASSIFY_STREAM = "/kiln.classify.v1.Classifier/ClassifyStream"
STREAMING = frozenset(
    {STREAM_INFER, CLASSIFY_STREAM, "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"}
)


def _methods() -> tuple[str, ...]:
    names = []
    for file, service in ((pb, "GRPCInferenceService"), (cpb, "Classifier"), (health_pb2, "Health")):
        desc = file.DESCRIPTOR.services_by_name[service]
        names += [
            f"/{desc.full_name}/{m.name}"
            for m in desc.methods
            if not m.server_streaming or m.client_streaming
        ]
    return (
        *names,
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        "/no.such.Service/Method",
        "/",
    )


METHODS = _methods()  # Health/Watch left out: it streams until the client goes away, by design


@dataclass(frozen=True)
class Case:
    """One fuzz request: `messages` (one unless the method streams requests) sent to `method`."""

    method: str
    messages: tuple[bytes, ...]
    note: str = ""

    @property
    def streaming(self) -> bool:
        """True when the method takes a request stream."""
        return self.method in STREAMING


def weighted(*choices: tuple[int, st.SearchStrategy[object]]) -> st.SearchStrategy[object]:
    """One of the strategies, each drawn with its relative weight. (st.one_of cannot weigh: it
    drops repeated strategies, and it picks a branch uniformly.)"""
    slots = [index for index, (weight, _) in enumerate(choices) for _ in range(weight)]
    return st.sampled_from(slots).flatmap(lambda index: choices[index][1])


def mostly(valid: object, *hostile: st.SearchStrategy[object], weight: int = 4) -> st.SearchStrategy[object]:
    """`valid` about `weight` times in `weight + 1`, else one of `hostile`: most requests stay
    close enough to valid to reach the checks deep in the server."""
    return weighted((weight, st.just(valid)), (1, st.one_of(*hostile)))


MODEL_NAMES = mostly(
    "tiny",
    st.sampled_from(
        ["", "nope", "../tiny", "/etc/passwd", "tiny\x00", "TINY", "tiny/1", "..", ".", "x" * 5000]
    ),
    st.text(max_size=24),
)
ODD_VERSIONS = ["0", "2", "-1", "1.0", "\u00b2", "\u0663", " 1", "9" * 40]  # superscript 2, Arabic 3
VERSIONS = mostly("", st.just("1"), st.sampled_from(ODD_VERSIONS), st.text(max_size=8), weight=3)
DATATYPE_NAMES = mostly(
    "FP32", st.sampled_from([*DATATYPES, "BF16", "FP8", "", "fp32", "FP32\x00", "STRING"])
)
HUGE_DIMS = [0, 1, 2, 3, 4, 8, -1, -(2**63), 2**31, 2**62, 2**63 - 1]
ROWS = st.sampled_from([1, 1, 1, 2, 3, 4, 0, 5, 9])
SHAPES = weighted(
    (6, st.builds(lambda rows: [rows, 3, 8, 8], ROWS)),
    (1, st.lists(st.integers(-2, 9), max_size=5)),
    (1, st.lists(st.sampled_from(HUGE_DIMS), max_size=6)),
)
SPECIAL_FLOATS = (np.nan, np.inf, -np.inf, -0.0, 3.4e38, 1e-45)


def _param(kind: str, value: int) -> pb.InferParameter:
    if kind == "bool":
        return pb.InferParameter(bool_param=bool(value & 1))
    if kind == "int64":
        return pb.InferParameter(int64_param=value - 2**62)
    if kind == "uint64":
        return pb.InferParameter(uint64_param=value)
    if kind == "double":
        return pb.InferParameter(double_param=float("nan") if value % 3 == 0 else value / 7)
    if kind == "small":  # e.g. a `timeout` of 0-2 microseconds: expires before it is queued
        return pb.InferParameter(int64_param=value % 3)
    if kind == "string":
        return pb.InferParameter(string_param="p" * (value % 300))
    return pb.InferParameter()  # unset oneof


PARAM_KEYS = ["timeout", "priority", "classification", "binary_data_output", "sequence_id", "k", ""]
PARAM_KINDS = ["bool", "int64", "uint64", "double", "string", "none", "small", "small"]
PARAMS = mostly(
    [],
    st.lists(
        st.tuples(st.sampled_from(PARAM_KEYS), st.sampled_from(PARAM_KINDS), st.integers(0, 2**63 - 1)),
        min_size=1,
        max_size=4,
    ),
    weight=2,
)


def _fill_params(target: object, drawn: list[tuple[str, str, int]], many: int) -> None:
    for key, kind, value in drawn:
        target[key].CopyFrom(_param(kind, value))  # type: ignore[index]
    for i in range(many):  # lots of parameters at once (a parser/CPU cost check)
        target[f"param-{i:05d}"].CopyFrom(_param("string", i))  # type: ignore[index]


def _values(datatype: str, count: int, seed: int, specials: bool) -> np.ndarray | None:
    """`count` values of `datatype` (None when it has no numpy type), NaN/Inf sprinkled in floats."""
    dtype = DATATYPES.get(datatype, (None, None))[0]
    if dtype is None or dtype.kind == "O" or count > 65_536:
        return None
    rng = np.random.default_rng(seed)
    values = (
        rng.normal(size=count).astype(dtype) if dtype.kind == "f" else rng.integers(0, 2, count).astype(dtype)
    )
    if specials and dtype.kind == "f" and count:
        idx = rng.integers(0, count, max(1, count // 8))
        with np.errstate(over="ignore"):  # 3.4e38 becomes inf in FP16: that is the point
            values[idx] = np.array(SPECIAL_FLOATS)[rng.integers(0, len(SPECIAL_FLOATS), idx.size)]
    return values


def bytes_framing(elements: list[bytes], lie: int, tail: bytes) -> bytes:
    """BYTES elements framed with 4-byte LE lengths; `lie` is added to the last length prefix."""
    parts = [struct.pack("<I", len(e)) + e for e in elements]
    if parts and lie:
        last = elements[-1]
        parts[-1] = struct.pack("<I", (len(last) + lie) % 2**32) + last
    return b"".join(parts) + tail


def _tensor(draw: st.DrawFn, request: pb.ModelInferRequest, raw_mode: bool) -> None:
    """Add one drawn input tensor (and its raw or typed contents) to `request`."""
    datatype = draw(DATATYPE_NAMES)
    shape = draw(SHAPES)
    name = draw(mostly("input", st.sampled_from(["bogus", "", "INPUT", "input\x00"])))
    tensor = request.inputs.add(name=name, datatype=datatype, shape=shape)
    _fill_params(tensor.parameters, draw(PARAMS), 0)
    count = int(np.prod(shape, dtype=object)) if all(d >= 0 for d in shape) else -1
    values = (
        _values(datatype, count, draw(st.integers(0, 2**32 - 1)), draw(st.booleans())) if count >= 0 else None
    )
    content = draw(mostly("exact", st.sampled_from(["off", "random", "framing", "typed", "empty"]), weight=3))
    if raw_mode:
        data = b""
        if content in ("exact", "off") and values is not None:
            data = values.tobytes()
            if content == "off":
                delta = draw(st.sampled_from([-1, 1, -4, 4]))
                data = data[:delta] if delta < 0 else data + bytes(delta)
        elif content == "framing":
            elements = draw(st.lists(st.binary(max_size=8), max_size=4))
            data = bytes_framing(
                elements,
                draw(st.sampled_from([0, 1, -1, 2**31])),
                draw(st.sampled_from([b"", b"\x01", b"\x01\x00"])),
            )
        elif content == "random":
            data = draw(st.binary(max_size=1024))
        request.raw_input_contents.append(data)
    elif content == "typed" or (content in ("exact", "off") and values is not None):
        right = DATATYPES.get(datatype, (None, None))[1] or "fp32_contents"
        field = draw(
            mostly(right, st.sampled_from([f.name for f in pb.InferTensorContents.DESCRIPTOR.fields]))
        )
        _typed(tensor.contents, field, values, draw(st.integers(1, 3)) if content == "off" else 0)


def _typed(contents: pb.InferTensorContents, field: str, values: np.ndarray | None, extra: int) -> None:
    items = [] if values is None else values.reshape(-1).tolist()
    items = items + items[:extra]
    if field == "bytes_contents":
        contents.bytes_contents.extend(str(v).encode() for v in items)
    elif field == "bool_contents":
        contents.bool_contents.extend(bool(v) for v in items)
    elif field in ("fp32_contents", "fp64_contents"):
        getattr(contents, field).extend(float(v) for v in items)
    else:
        bits = {"int_contents": 31, "int64_contents": 63, "uint_contents": 32, "uint64_contents": 64}[field]
        low = -(2**bits) if field.startswith("int") else 0
        high = 2**bits - 1
        getattr(contents, field).extend(min(max(int(v) if np.isfinite(v) else 0, low), high) for v in items)


@st.composite
def infer_requests(draw: st.DrawFn) -> pb.ModelInferRequest:
    """A structured ModelInferRequest, mostly almost valid so the checks deep inside are reached."""
    request = pb.ModelInferRequest(
        model_name=draw(MODEL_NAMES), model_version=draw(VERSIONS), id=draw(st.text(max_size=16))
    )
    raw_mode = draw(st.booleans())
    for _ in range(draw(mostly(1, st.sampled_from([0, 2, 3])))):
        _tensor(draw, request, raw_mode)
    if draw(mostly(False, st.just(True), weight=9)):  # one raw entry too many
        request.raw_input_contents.append(b"\x00" * 4)
    _fill_params(request.parameters, draw(PARAMS), draw(st.sampled_from([0, 0, 0, 0, 2_000])))
    timeout_us = draw(mostly(0, st.sampled_from([1, 2, 50, 10**12, -5]), weight=6))
    if timeout_us:  # KServe's `timeout` (µs): the tiny ones expire before the request is queued
        request.parameters["timeout"].int64_param = timeout_us
    wanted = mostly([], st.lists(st.sampled_from(["logits", "logits", "probs", ""]), min_size=1, max_size=2))
    for name in draw(wanted):
        out = request.outputs.add(name=name)
        _fill_params(out.parameters, draw(PARAMS), 0)
    return request


@st.composite
def classify_requests(draw: st.DrawFn, max_image_bytes: int) -> cpb.ClassifyRequest:
    """A Classify request of hostile images (see tests.fuzz.images)."""
    count = draw(st.sampled_from([1, 1, 1, 1, 2, 3, 0, 17]))
    return cpb.ClassifyRequest(
        model=draw(MODEL_NAMES),
        version=draw(VERSIONS),
        images=[draw(images(max_image_bytes)) for _ in range(min(count, 3))]
        + [cpb.Image(encoded=b"x")] * max(0, count - 3),
        top_k=draw(st.sampled_from([0, 1, 3, 4, 5, 2**32 - 1])),
        request_id=draw(st.text(max_size=16)),
    )


def _valid_templates() -> tuple[tuple[str, bytes], ...]:
    raw = pb.ModelInferRequest(model_name="tiny", id="t")
    raw.inputs.add(name="input", datatype="FP32", shape=[1, 3, 8, 8])
    raw.raw_input_contents.append(np.ones((1, 3, 8, 8), np.float32).tobytes())
    typed = pb.ModelInferRequest(model_name="tiny")
    typed.inputs.add(name="input", datatype="FP32", shape=[1, 3, 8, 8]).contents.fp32_contents.extend(
        [0.5] * 192
    )
    out = typed.outputs.add(name="logits")
    out.parameters["classification"].int64_param = 2
    png = cpb.ClassifyRequest(
        model="tiny", images=[cpb.Image(encoded=encode("PNG", "RGB", 8, 8, 1))], top_k=2
    )
    raw_image = cpb.ClassifyRequest(
        model="tiny", images=[cpb.Image(raw=cpb.RawImage(height=8, width=8, channels=3, data=bytes(192)))]
    )
    return ((INFER, raw.SerializeToString()), (INFER, typed.SerializeToString()),
            (CLASSIFY, png.SerializeToString()), (CLASSIFY, raw_image.SerializeToString()))  # fmt: skip


TEMPLATES = _valid_templates()


@st.composite
def mutated_messages(draw: st.DrawFn) -> Case:
    """A valid message with a few byte-level edits: flips, inserts, deletions, truncation."""
    method, data = draw(st.sampled_from(TEMPLATES))
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["set", "set", "insert", "delete", "truncate", "varint"]))
        pos = draw(st.integers(0, max(0, len(out) - 1)))
        if op == "set" and out:
            out[pos] = draw(st.integers(0, 255))
        elif op == "insert":
            out[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del out[pos : pos + draw(st.integers(1, 8))]
        elif op == "truncate":
            del out[pos:]
        elif out:  # a run of varint continuation bytes: lengths and tags that never end
            out[pos:pos] = b"\xff" * draw(st.integers(1, 12))
    return Case(method, (bytes(out),), "mutated")


def deep_groups(depth: int) -> bytes:
    """Nested start-group tags of an unknown field: the parser must refuse, not recurse forever."""
    return b"\xfb\x07" * depth + b"\xfc\x07" * depth  # field 127, wire types 3 (start) / 4 (end)


@st.composite
def raw_bytes(draw: st.DrawFn) -> Case:
    """Random bytes (or deep nesting) to any method path, streaming ones included."""
    method = draw(st.sampled_from(METHODS))
    payload = draw(
        st.one_of(st.binary(max_size=512), st.builds(deep_groups, st.sampled_from([50, 101, 5_000, 100_000])))
    )
    return Case(method, (payload,), "raw bytes")


@st.composite
def stream_cases(draw: st.DrawFn, max_image_bytes: int) -> Case:
    """A request stream of 1-4 messages, structured, mutated or random."""
    if draw(st.booleans()):
        items = st.one_of(infer_requests().map(lambda r: r.SerializeToString()), st.binary(max_size=64))
        return Case(STREAM_INFER, tuple(draw(st.lists(items, min_size=1, max_size=4))), "stream infer")
    items = st.one_of(
        classify_requests(max_image_bytes).map(lambda r: r.SerializeToString()), st.binary(max_size=64)
    )
    return Case(CLASSIFY_STREAM, tuple(draw(st.lists(items, min_size=1, max_size=3))), "stream classify")


def cases(max_image_bytes: int) -> st.SearchStrategy[Case]:
    """Every kind of case, in proportions that spend most requests on the richest handlers."""
    infer = infer_requests().map(lambda r: Case(INFER, (r.SerializeToString(),), "infer"))
    classify = classify_requests(max_image_bytes).map(
        lambda r: Case(CLASSIFY, (r.SerializeToString(),), "classify")
    )
    return weighted(
        (4, infer),
        (3, classify),
        (1, mutated_messages()),
        (1, raw_bytes()),
        (1, stream_cases(max_image_bytes)),
    )
