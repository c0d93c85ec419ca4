"""`max_connection_age_s`: the server sends GOAWAY when a connection reaches that age, so a
long-lived client reconnects (and a load balancer or SO_REUSEPORT may pick another backend), yet
nothing in flight is cut: a stream older than the age keeps receiving every answer on its old
connection while the same channel's unary calls move to a new one."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np

from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from serving.clients.client import build_infer_request
from tests.fuzz.load import BATCH
from tests.integration.server_fixtures import (
    ServerThread,
    local_config,
    publish_tiny_model,
    reference_logits,
    running_server,
)

AGE_S = 0.5
STREAMED, STREAM_GAP_S = 12, 0.2  # 2.4 s: past the age and past twice the age


def test_a_stream_outlives_the_connection_age_while_unary_calls_reconnect(tmp_path: Path) -> None:
    publish_tiny_model(tmp_path, "tiny", max_batch_size=8)
    expected = reference_logits(tmp_path / "tiny" / "1" / "model.onnx", BATCH)
    with running_server(local_config(tmp_path, max_connection_age_s=AGE_S)) as server:
        _stream_and_call(server, expected)


def _stream_and_call(server: ServerThread, expected: np.ndarray) -> None:
    """One channel: a stream of STREAMED requests and, meanwhile, unary calls one after another."""
    states: list[grpc.ChannelConnectivity] = []
    with grpc.insecure_channel(server.address) as channel:
        channel.subscribe(states.append, try_to_connect=True)
        stub = pb_grpc.GRPCInferenceServiceStub(channel)

        def requests() -> Iterator[pb.ModelInferRequest]:
            for i in range(STREAMED):
                yield build_infer_request("tiny", {"input": BATCH}, request_id=f"s{i}")
                time.sleep(STREAM_GAP_S)

        answers: list[pb.ModelStreamInferResponse] = []
        failure: list[grpc.RpcError] = []

        def stream() -> None:
            try:
                answers.extend(stub.ModelStreamInfer(requests(), timeout=30))
            except grpc.RpcError as exc:
                failure.append(exc)

        streaming = threading.Thread(target=stream)
        streaming.start()
        unary = 0
        while streaming.is_alive():  # the same channel's unary calls, all through the GOAWAYs
            reply = stub.ModelInfer(build_infer_request("tiny", {"input": BATCH}), timeout=10)
            np.testing.assert_allclose(
                np.frombuffer(reply.raw_output_contents[0], np.float32).reshape(expected.shape),
                expected, rtol=1e-5, atol=1e-5,
            )  # fmt: skip
            unary += 1
            time.sleep(0.05)
        streaming.join()
        channel.unsubscribe(states.append)
    assert not failure, f"the stream was cut: {failure[0].code()} {failure[0].details()}"
    assert [a.infer_response.id for a in answers] == [f"s{i}" for i in range(STREAMED)]
    assert not any(a.error_message for a in answers)
    assert unary > 10
    # the channel left READY at least once: a GOAWAY made it reconnect
    ready = [i for i, s in enumerate(states) if s == grpc.ChannelConnectivity.READY]
    assert ready and any(s != grpc.ChannelConnectivity.READY for s in states[ready[0] :]), states
