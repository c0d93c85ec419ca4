"""Every resource limit is a setting, and each one is enforced once set: message size (both
ways), encoded image bytes, decoded pixels, images per Classify request, batch size, and queue
length. The server here is configured the way an operator would: a YAML file plus KILN_* variables.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import grpc
import numpy as np
import pytest

from serving.clients.client import KilnClient, build_infer_request
from serving.grpc.config import load_config
from tests.fuzz.images import encode, png_bomb
from tests.fuzz.load import Gate, wait_until
from tests.integration.server_fixtures import ServerThread, publish_tiny_model, running_server

C = grpc.StatusCode


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    root = tmp_path_factory.mktemp("limits")
    publish_tiny_model(root / "repo", max_batch_size=8)
    (root / "kiln.yaml").write_text(
        "repo: repo\nhost: 127.0.0.1\nport: 0\nmetrics_port: null\n"
        "max_receive_message_bytes: 65536\nmax_send_message_bytes: 32768\n"
        "max_image_bytes: 4096\nmax_image_pixels: 10000\n"
    )
    env = {
        "KILN_MAX_BATCH_SIZE": "2",
        "KILN_MAX_QUEUE_SIZE": "2",
        "KILN_MAX_QUEUE_PER_CLIENT": "2",
        "KILN_MAX_IMAGES_PER_REQUEST": "3",
    }
    config = load_config(config_file=root / "kiln.yaml", env=env)
    with running_server(config) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: ServerThread) -> Iterator[KilnClient]:
    with KilnClient(server.address, timeout=20) as kiln:
        yield kiln


def _refused(call: Callable[[], object]) -> tuple[C, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def _rows(n: int) -> dict[str, np.ndarray]:
    return {"input": np.zeros((n, 3, 8, 8), np.float32)}


def test_request_message_size(client: KilnClient) -> None:
    assert client.infer("tiny", _rows(2), request_id="x" * 20_000)["logits"].shape == (2, 4)
    code, _ = _refused(lambda: client.infer("tiny", _rows(2), request_id="x" * 70_000))
    assert code == C.RESOURCE_EXHAUSTED


def test_response_message_size(client: KilnClient) -> None:
    """The response echoes the id: over max_send_message_bytes it is not sent."""
    code, _ = _refused(lambda: client.infer("tiny", _rows(1), request_id="y" * 40_000))
    assert code == C.RESOURCE_EXHAUSTED
    assert client.infer("tiny", _rows(1))["logits"].shape == (1, 4)


def test_encoded_image_bytes(client: KilnClient) -> None:
    small = encode("PNG", "RGB", 8, 8, 1)
    assert len(client.classify("tiny", [small]).results) == 1
    big = encode("PNG", "RGB", 64, 64, 1)
    code, details = _refused(lambda: client.classify("tiny", [big]))
    assert code == C.RESOURCE_EXHAUSTED and f"{len(big)} bytes, the limit is 4096" in details


def test_decoded_pixels(client: KilnClient) -> None:
    code, details = _refused(lambda: client.classify("tiny", [png_bomb(101, 100)]))
    assert code == C.RESOURCE_EXHAUSTED and "101x100 = 10100 pixels, the limit is 10000" in details
    raw = np.zeros((100, 101, 1), np.uint8)
    assert _refused(lambda: client.classify("tiny", [raw]))[0] == C.RESOURCE_EXHAUSTED


def test_images_per_request(client: KilnClient) -> None:
    image = np.zeros((8, 8, 3), np.uint8)
    assert len(client.classify("tiny", [image] * 3).results) == 3
    code, details = _refused(lambda: client.classify("tiny", [image] * 4))
    assert code == C.INVALID_ARGUMENT and "send 1 to 3 images per request, got 4" in details


def test_batch_size(client: KilnClient) -> None:
    """The configured cap (2) wins over the manifest's max_batch_size (8)."""
    assert client.model_config("tiny").max_batch_size == 2
    code, details = _refused(lambda: client.infer("tiny", _rows(3)))
    assert code == C.INVALID_ARGUMENT and "exceeds the model's max_batch_size 2" in details


def test_queue_length(server: ServerThread, client: KilnClient) -> None:
    loaded = server.server.manager.get("tiny")
    gate = Gate(loaded.backend.infer)
    loaded.backend.infer = gate  # type: ignore[method-assign]
    gate.open.clear()
    stub = client.inference.ModelInfer
    try:
        held = [stub.future(build_infer_request("tiny", _rows(1)), timeout=30)]
        assert gate.entered.wait(10)
        held += [stub.future(build_infer_request("tiny", _rows(1)), timeout=30) for _ in range(2)]
        wait_until(lambda: loaded.batcher.queue_depth == 2, what="a full queue of 2")
        code, details = _refused(lambda: client.infer("tiny", _rows(1)))
        assert code == C.RESOURCE_EXHAUSTED and "(2 requests waiting; max_queue_size)" in details
    finally:
        gate.open.set()
    assert all(f.result(timeout=30).outputs for f in held)
