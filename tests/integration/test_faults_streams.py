"""Slow stream readers: a client that sends a long request stream and stops reading the answers
must not hold up anyone else (no head-of-line blocking), must not make the server compute and
buffer answers nobody reads (its stream is back-pressured: the server stops reading its
requests), and gets every answer, in full, once it reads again."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from protos.inference import grpc_service_pb2_grpc as pb_grpc
from protos.kiln.classify.v1 import classify_pb2 as cpb
from protos.kiln.classify.v1 import classify_pb2_grpc as cpb_grpc
from serving.clients.client import KilnClient, build_infer_request
from serving.grpc.config import ServeConfig
from tests.fuzz.load import BATCH
from tests.integration.server_fixtures import ServerThread, publish_tiny_model, running_server

SENT = 3_000
PADDING = "r" * 16_000  # echoed in every answer: a few hundred unread answers fill the transport


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    repo = tmp_path_factory.mktemp("repo")
    publish_tiny_model(repo, "bulk", max_batch_size=8)
    publish_tiny_model(repo, "tiny", max_batch_size=8)
    with running_server(ServeConfig(repo=repo, host="127.0.0.1", port=0, metrics_port=None)) as srv:
        yield srv


class Sender:
    """Counts the requests a stream's generator has handed to gRPC."""

    def __init__(self, make: object, total: int) -> None:
        self.make, self.total, self.sent = make, total, 0

    def __iter__(self) -> Iterator[object]:
        for _ in range(self.total):
            self.sent += 1
            yield self.make()  # type: ignore[operator]


def _latencies(address: str, seconds: float) -> list[float]:
    """Unary requests to "tiny" from 2 threads for `seconds`; every one must succeed."""
    results: list[float] = []
    end = time.monotonic() + seconds

    def run() -> None:
        with KilnClient(address, timeout=10) as client:
            while time.monotonic() < end:
                start = time.monotonic()
                client.infer("tiny", {"input": BATCH})
                results.append(time.monotonic() - start)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + 30)
    return results


def _served(server: ServerThread, model: str) -> int:
    """Requests of `model` the server has answered (its statistics, read between batches)."""
    return server.server.manager.get(model).stats.to_proto().inference_stats.success.count


def test_unread_infer_stream_is_back_pressured_and_blocks_no_one(server: ServerThread) -> None:
    request = build_infer_request("bulk", {"input": BATCH}, request_id=PADDING)
    sender = Sender(lambda: request, SENT)
    with grpc.insecure_channel(server.address) as channel:
        answers = pb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(iter(sender), timeout=120)
        latencies = _latencies(server.address, 3.0)  # meanwhile nothing reads `answers`
        served_while_unread = _served(server, "bulk")
        received = [a for a in answers]  # now read everything
    assert len(latencies) > 20 and max(latencies) < 2.0, f"slowest other request {max(latencies):.2f} s"
    # the server stopped at its window plus what the transport buffers, far short of all of it
    assert server.server.config.stream_max_inflight <= served_while_unread < SENT // 2, served_while_unread
    assert len(received) == SENT and not any(a.error_message for a in received)
    assert all(a.infer_response.id == PADDING for a in received)


def test_unread_classify_stream_blocks_no_one(server: ServerThread) -> None:
    image = cpb.Image(raw=cpb.RawImage(height=8, width=8, channels=3, data=np.zeros(192, np.uint8).tobytes()))
    sender = Sender(lambda: cpb.ClassifyRequest(model="bulk", images=[image], request_id=PADDING), SENT)
    with grpc.insecure_channel(server.address) as channel:
        answers = cpb_grpc.ClassifierStub(channel).ClassifyStream(iter(sender), timeout=120)
        before = _served(server, "bulk")
        latencies = _latencies(server.address, 3.0)
        served_while_unread = _served(server, "bulk") - before
        received = [a for a in answers]
    assert len(latencies) > 20 and max(latencies) < 2.0, f"slowest other request {max(latencies):.2f} s"
    assert served_while_unread < SENT // 2, served_while_unread
    assert len(received) == SENT and all(a.HasField("response") for a in received)
    assert [a.request_id for a in received[:3]] == [PADDING] * 3
