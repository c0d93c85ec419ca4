"""Fuzzing a live server: hostile ModelInfer / Classify messages, byte-level mutations, random
bytes to every method path, and streams of all of these (strategies in tests/fuzz). Every answer
must be OK or a deliberate status, before its deadline, with nothing logged as an error by the
server, which must serve correct answers afterwards. benchmarks/fuzz_run.py runs the same cases
by the ten thousand; the regressions below pin what fuzzing found.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings

from protos.inference import grpc_service_pb2 as pb
from serving.clients.client import KilnClient
from tests.fuzz.harness import (
    MAX_IMAGE_BYTES,
    ErrorLog,
    Tally,
    fuzz_config,
    health_problem,
    send,
    watching_errors,
)
from tests.fuzz.strategies import CLASSIFY_STREAM, INFER, METHODS, STREAM_INFER, Case, cases, deep_groups
from tests.integration.server_fixtures import ServerThread, publish_tiny_model

CASES = 900  # about 1,000 requests (streams carry several): ~15 s on a shared 2-core box
FUZZ = settings(
    max_examples=CASES,
    derandomize=True,  # the same cases on every CI run; benchmarks/fuzz_run.py draws new ones
    database=None,
    deadline=None,
    phases=[Phase.explicit, Phase.generate, Phase.shrink],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)


@pytest.fixture(scope="module")
def onnx_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("repo")
    return publish_tiny_model(repo, max_batch_size=4) / "model.onnx"


@pytest.fixture(scope="module")
def errors() -> Iterator[ErrorLog]:
    with watching_errors() as handler:
        yield handler


@pytest.fixture(scope="module")
def server(onnx_path: Path, errors: ErrorLog) -> Iterator[ServerThread]:
    thread = ServerThread(fuzz_config(onnx_path.parents[2])).start()
    yield thread
    thread.stop()


@pytest.fixture(scope="module")
def channel(server: ServerThread) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.address) as chan:
        yield chan


def _judge(channel: grpc.Channel, errors: ErrorLog, case: Case, tally: Tally | None = None) -> None:
    outcome = send(channel, case, timeout=20)
    if tally is not None:
        tally.add(case, outcome)
    assert outcome.problem is None, outcome.problem
    logged = errors.take()
    assert not logged, f"the server logged errors: {logged}"


def test_fuzzed_requests_get_deliberate_statuses(
    server: ServerThread, channel: grpc.Channel, errors: ErrorLog, onnx_path: Path
) -> None:
    tally = Tally()

    @FUZZ
    @given(case=cases(MAX_IMAGE_BYTES))
    def fuzz(case: Case) -> None:
        _judge(channel, errors, case, tally)

    fuzz()
    assert tally.requests >= 950 and tally.crashes == tally.hangs == 0
    assert tally.statuses["OK"] >= 50, tally.statuses  # the strategies still reach the model
    assert {"INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED"} <= set(tally.statuses), tally.statuses
    assert health_problem(server.address, onnx_path) is None
    batcher = server.server.manager.get("tiny").batcher
    assert batcher.queue_depth == batcher.inflight == 0


PAYLOADS = (
    b"",
    b"\xff" * 7,
    b"\x0a\xff\xff\xff\xff\x0f",
    b"\x12\x02\xc3\x28",
    deep_groups(101),
    deep_groups(50_000),
)


@pytest.mark.parametrize("method", METHODS)
def test_unparsable_bytes_on_every_method(channel: grpc.Channel, errors: ErrorLog, method: str) -> None:
    """Random bytes, invalid UTF-8 in a string field, and deep nesting reach the proto parser of
    every method: INVALID_ARGUMENT (or a parse that happens to succeed), never UNKNOWN/INTERNAL."""
    for payload in PAYLOADS:
        _judge(channel, errors, Case(method, (payload,), "sweep"))


def test_unparsable_message_is_invalid_argument_naming_the_problem(channel: grpc.Channel) -> None:
    """Regression: a parse failure was UNKNOWN (unary) or INTERNAL plus a logged traceback (streams)."""
    for method in (INFER, STREAM_INFER, CLASSIFY_STREAM, "/grpc.health.v1.Health/Check"):
        outcome = send(channel, Case(method, (b"\xff\xff\xff\xff",)))
        assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT, (method, outcome)
        assert "could not be parsed" in outcome.details


@pytest.mark.parametrize("shape", [[0, 2**62, 2**62], [0, 2**63 - 1, 3, 8, 8], [0, 3, 2**40, 2**40]])
def test_zero_rows_with_huge_dims_is_invalid(server: ServerThread, shape: list[int]) -> None:
    """Regression: numpy refused these zero-element shapes with ValueError -> INTERNAL."""
    for raw in (True, False):
        request = pb.ModelInferRequest(model_name="tiny")
        request.inputs.add(name="input", datatype="FP32", shape=shape)
        if raw:
            request.raw_input_contents.append(b"")
        with KilnClient(server.address) as client, pytest.raises(grpc.RpcError) as info:
            client.inference.ModelInfer(request, timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "too many elements" in info.value.details()


@pytest.mark.parametrize("version", ["\u00b2", "9" * 5000, "1" * 19])
def test_odd_version_strings_are_not_found(server: ServerThread, version: str) -> None:
    """Regression: '²' passes str.isdigit() and int('²') raised; 5000 digits exceed int()'s limit."""
    with KilnClient(server.address) as client, pytest.raises(grpc.RpcError) as info:
        client.infer("tiny", {"input": np.zeros((1, 3, 8, 8), np.float32)}, version=version)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_huge_names_come_back_clipped(server: ServerThread) -> None:
    """Regression: a 20 kB model name echoed in the status message overflowed the client's trailer
    limit, so the client saw RESOURCE_EXHAUSTED instead of NOT_FOUND."""
    with KilnClient(server.address) as client, pytest.raises(grpc.RpcError) as info:
        client.infer("x" * 20_000, {"input": np.zeros((1, 3, 8, 8), np.float32)})
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert len(info.value.details()) < 1100 and "clipped" in info.value.details()
