"""Every error case answers the right gRPC status with a message naming the problem, and the
server keeps serving afterwards. A gate around the real backend's `infer` holds batches so queue
and deadline behaviour can be observed deterministically."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping

import grpc
import numpy as np
import pytest

from protos.inference import grpc_service_pb2 as pb
from serving.clients.client import KilnClient, build_infer_request
from serving.grpc.config import ServeConfig
from tests.integration.server_fixtures import ServerThread, publish_tiny_model

MARKER = 123.0  # an input filled with this value identifies one request inside a batch


class Gate:
    """Wraps a backend's infer: can hold batches, fail on the marker, and records what it saw."""

    def __init__(self, infer: Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]) -> None:
        self._infer = infer
        self.open = threading.Event()
        self.open.set()
        self.entered = threading.Event()
        self.fail_on_marker = False
        self.seen: list[np.ndarray] = []

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch = inputs["input"]
        self.seen.append(batch.copy())
        self.entered.set()
        assert self.open.wait(30), "gate never opened"
        if self.fail_on_marker and np.any(batch == MARKER):
            raise RuntimeError("simulated backend fault")
        return self._infer(inputs)

    def saw_marker(self) -> bool:
        return any(np.any(b == MARKER) for b in self.seen)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    repo = tmp_path_factory.mktemp("repo")
    publish_tiny_model(repo, "tiny", max_batch_size=4)
    broken = publish_tiny_model(repo, "broken")
    (broken / "model.onnx").write_bytes(b"not the published bytes")
    config = ServeConfig(
        repo=repo,
        host="127.0.0.1",
        port=0,
        metrics_port=None,
        max_queue_size=2,
        max_queue_per_client=2,
        max_queue_delay_us=0,
        max_receive_message_bytes=64 * 1024,
        max_image_bytes=2048,
        repository_control=True,  # test_repository_load_unload_errors
    )
    thread = ServerThread(config).start()
    yield thread
    thread.stop()


@pytest.fixture(scope="module")
def gate(server: ServerThread) -> Gate:
    backend = server.server.manager.get("tiny").backend
    gate = Gate(backend.infer)
    backend.infer = gate  # type: ignore[method-assign]
    return gate


def _status(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def _wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "condition not reached in time"
        time.sleep(0.005)


def _input(rows: int, fill: float | None = None, dtype: type = np.float32) -> dict[str, np.ndarray]:
    data = np.zeros((rows, 3, 8, 8), dtype) if fill is None else np.full((rows, 3, 8, 8), fill, dtype)
    return {"input": data}


INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(
    ("inputs", "options", "code", "message"),
    [
        (
            {"input": np.zeros((1, 3, 8, 9), np.float32)},
            {},
            INVALID,
            "expected shape [-1, 3, 8, 8], got [1, 3, 8, 9]",
        ),
        (_input(1, dtype=np.float64), {}, INVALID, "'input': expected datatype FP32, got FP64"),
        ({"bogus": np.zeros((1, 3, 8, 8), np.float32)}, {}, INVALID, "unknown input(s) ['bogus']"),
        (_input(5), {}, INVALID, "batch size 5 exceeds the model's max_batch_size 4"),
        (_input(1), {"outputs": ["probs"]}, INVALID, "unknown output 'probs'; the model has ['logits']"),
        (_input(1), {"version": "9"}, grpc.StatusCode.NOT_FOUND, "model 'tiny' has no version 9"),
        (_input(1), {"version": "latest"}, grpc.StatusCode.NOT_FOUND, "versions are integers"),
    ],
    ids=["shape", "dtype", "input-name", "batch-over-max", "output-name", "version", "version-text"],
)
def test_bad_requests(
    client: KilnClient, inputs: dict, options: dict, code: grpc.StatusCode, message: str
) -> None:
    got_code, details = _status(lambda: client.infer("tiny", inputs, **options))
    assert got_code == code and message in details


def test_unknown_model_is_not_found(client: KilnClient) -> None:
    code, details = _status(lambda: client.infer("nope", _input(1)))
    assert code == grpc.StatusCode.NOT_FOUND and "model 'nope' not found" in details


def test_raw_byte_length_and_typed_count(client: KilnClient) -> None:
    request = build_infer_request("tiny", _input(1))
    request.raw_input_contents[0] = request.raw_input_contents[0][:-4]
    code, details = _status(lambda: client.inference.ModelInfer(request, timeout=10))
    assert code == INVALID and "raw content is 764 bytes, expected 768" in details
    typed = pb.ModelInferRequest(model_name="tiny")
    typed.inputs.add(name="input", datatype="FP32", shape=[1, 3, 8, 8]).contents.fp32_contents.extend(
        [0.0] * 10
    )
    code, details = _status(lambda: client.inference.ModelInfer(typed, timeout=10))
    assert code == INVALID and "10 values in 'fp32_contents', expected 192" in details


def test_oversized_message_is_resource_exhausted(client: KilnClient) -> None:
    huge = {"input": np.zeros((4, 3, 8, 512), np.float32)}  # 192 KiB > the 64 KiB limit
    code, _ = _status(lambda: client.infer("tiny", huge))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_images_undecodable_and_too_large(client: KilnClient) -> None:
    code, details = _status(lambda: client.classify("tiny", [b"definitely not a jpeg"]))
    assert code == INVALID and "image 0: cannot decode image" in details
    code, details = _status(lambda: client.classify("tiny", [b"\xff" * 4096]))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "4096 bytes, the limit is 2048" in details


def test_model_that_failed_to_load_is_unavailable_with_reason(client: KilnClient) -> None:
    code, details = _status(lambda: client.infer("broken", _input(1)))
    assert code == grpc.StatusCode.UNAVAILABLE
    assert "model 'broken' is not ready" in details and "model.onnx: size mismatch" in details
    assert not client.model_ready("broken") and client.model_ready("tiny")
    index = {(m.name, m.state) for m in client.repository_index().models}
    assert ("broken", "UNAVAILABLE") in index and ("tiny", "READY") in index
    assert client.health("broken") == "NOT_SERVING"


def test_queue_full_is_resource_exhausted_at_once(
    server: ServerThread, client: KilnClient, gate: Gate
) -> None:
    batcher = server.server.manager.get("tiny").batcher
    gate.open.clear()
    gate.entered.clear()
    futures = [client.inference.ModelInfer.future(build_infer_request("tiny", _input(1)), timeout=30)]
    try:
        assert gate.entered.wait(10)  # the first batch holds the only instance
        futures += [
            client.inference.ModelInfer.future(build_infer_request("tiny", _input(1)), timeout=30)
            for _ in range(2)
        ]
        _wait_until(lambda: batcher.queue_depth == 2)
        start = time.monotonic()
        code, details = _status(lambda: client.infer("tiny", _input(1)))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue of model 'tiny' is full" in details
        assert time.monotonic() - start < 5
    finally:
        gate.open.set()
    for future in futures:
        assert future.result(timeout=30).outputs[0].name == "logits"


def test_expired_deadline_never_reaches_the_backend(
    server: ServerThread, client: KilnClient, gate: Gate
) -> None:
    batcher = server.server.manager.get("tiny").batcher
    dropped_before = sum(batcher.dropped.values())
    gate.seen.clear()
    gate.open.clear()
    gate.entered.clear()
    blocker = client.inference.ModelInfer.future(build_infer_request("tiny", _input(1)), timeout=30)
    try:
        assert gate.entered.wait(10)
        code, _ = _status(lambda: client.infer("tiny", _input(1, fill=MARKER), timeout=0.3))
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        gate.open.set()
    blocker.result(timeout=30)
    client.infer("tiny", _input(1))  # FIFO: once this is answered, the expired request was handled
    assert not gate.saw_marker()
    assert sum(batcher.dropped.values()) > dropped_before


def test_backend_fault_fails_only_that_batch(client: KilnClient, gate: Gate) -> None:
    gate.fail_on_marker = True
    try:
        code, details = _status(lambda: client.infer("tiny", _input(1, fill=MARKER)))
    finally:
        gate.fail_on_marker = False
    assert code == grpc.StatusCode.INTERNAL and "batch of 1 rows failed" in details
    assert client.infer("tiny", _input(2))["logits"].shape == (2, 4)
    assert client.server_ready()


def test_empty_model_name_and_no_inputs(client: KilnClient) -> None:
    code, details = _status(lambda: client.inference.ModelInfer(pb.ModelInferRequest(), timeout=10))
    assert code == INVALID and "model_name is empty" in details
    code, details = _status(
        lambda: client.inference.ModelInfer(pb.ModelInferRequest(model_name="tiny"), timeout=10)
    )
    assert code == INVALID and "the request has no inputs" in details


def test_repository_load_unload_errors(client: KilnClient) -> None:
    code, details = _status(lambda: client.load_model("ghost"))
    assert code == grpc.StatusCode.NOT_FOUND and "model 'ghost' not found" in details
    code, _ = _status(lambda: client.unload_model("ghost"))
    assert code == grpc.StatusCode.NOT_FOUND
    code, details = _status(lambda: client.load_model("broken"))
    assert code == grpc.StatusCode.UNAVAILABLE and "broken" in details


def test_metadata_of_unavailable_and_unknown_models(client: KilnClient) -> None:
    assert _status(lambda: client.model_metadata("broken"))[0] == grpc.StatusCode.UNAVAILABLE
    assert _status(lambda: client.model_config("nope"))[0] == grpc.StatusCode.NOT_FOUND
    assert _status(lambda: client.statistics("nope"))[0] == grpc.StatusCode.NOT_FOUND
