"""`kiln serve` with `lone_batch_spinning: on`: a lone request runs on the spinning twin, batches
formed under load on the usual session, and both answer with the model's numbers (real server on
127.0.0.1, tritonclient over gRPC, real ONNX Runtime sessions). `single_thread_small_batches` is
off here, so that every batch of 2+ rows reaches the usual session."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from serving.grpc.config import ServeConfig
from tests.integration.server_fixtures import (
    ServerThread,
    publish_tiny_model,
    reference_logits,
    running_server,
)

RNG = np.random.default_rng(3)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    repo = tmp_path_factory.mktemp("repo")
    publish_tiny_model(repo, "tiny", max_batch_size=8)
    config = ServeConfig(
        repo=repo, host="127.0.0.1", port=0, metrics_port=None, instances=1, intra_op_threads=2,
        lone_batch_spinning="on", single_thread_small_batches="off", max_queue_delay_us=20_000,
    )  # fmt: skip
    with running_server(config) as srv:
        yield srv  # type: ignore[misc]


def _infer(address: str, batch: np.ndarray) -> np.ndarray:
    client = grpcclient.InferenceServerClient(address)
    try:
        tensor = grpcclient.InferInput("input", list(batch.shape), "FP32")
        tensor.set_data_from_numpy(batch)
        return client.infer("tiny", [tensor]).as_numpy("logits")
    finally:
        client.close()


def test_lone_and_batched_requests_answer_the_models_numbers(server: ServerThread, repo_onnx: Path) -> None:
    twin = server.server.manager.get("tiny").backend.sized_runners[0]
    rows = RNG.normal(size=(12, 3, 8, 8)).astype(np.float32)
    before = twin.counts["lone"]
    for i in range(4):  # one at a time: each is a 1-row batch
        np.testing.assert_allclose(
            _infer(server.address, rows[i : i + 1]),
            reference_logits(repo_onnx, rows[i : i + 1]),
            rtol=1e-5,
            atol=1e-5,
        )
    assert twin.counts["lone"] - before == 4
    with ThreadPoolExecutor(8) as pool:  # together, within the 20 ms queue delay: batched
        answers = list(pool.map(lambda i: _infer(server.address, rows[i : i + 1]), range(4, 12)))
    np.testing.assert_allclose(
        np.concatenate(answers), reference_logits(repo_onnx, rows[4:]), rtol=1e-5, atol=1e-5
    )
    assert twin.counts["batched"] > 0, "no request shared a batch: nothing ran on the batched session"


@pytest.fixture(scope="module")
def repo_onnx(server: ServerThread) -> Path:
    return Path(server.server.config.repo) / "tiny" / "1" / "model.onnx"
