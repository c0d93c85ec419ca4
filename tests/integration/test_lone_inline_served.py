"""`kiln serve` computes a request alone in the server on its event loop (serving/runtime/solo.py):
real server on 127.0.0.1, tritonclient over gRPC, real ONNX Runtime. One client sending one request
at a time is served inline with the model's numbers; many clients at once are batched by the
worker as before; `lone_request_inline_max_ms: 0` (flag, env, file) turns it off."""

from __future__ import annotations

import argparse
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from serving import cli
from serving.grpc.config import ConfigError, load_config
from tests.integration.server_fixtures import (
    ServerThread,
    local_config,
    publish_tiny_model,
    reference_logits,
    running_server,
)

RNG = np.random.default_rng(5)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("repo")
    publish_tiny_model(path, "tiny", max_batch_size=8)
    return path


def _infer(client: grpcclient.InferenceServerClient, batch: np.ndarray) -> np.ndarray:
    tensor = grpcclient.InferInput("input", list(batch.shape), "FP32")
    tensor.set_data_from_numpy(batch)
    return client.infer("tiny", [tensor]).as_numpy("logits")


def _one_client_in_turn(server: ServerThread, rows: np.ndarray) -> np.ndarray:
    client = grpcclient.InferenceServerClient(server.address)
    try:
        return np.concatenate([_infer(client, rows[i : i + 1]) for i in range(len(rows))])
    finally:
        client.close()


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[ServerThread]:
    with running_server(local_config(repo)) as srv:  # the default: inline up to 2 ms
        yield srv  # type: ignore[misc]


def test_a_lone_client_is_served_inline_with_the_models_numbers(server: ServerThread, repo: Path) -> None:
    batcher = server.server.manager.get("tiny").batcher
    rows = RNG.normal(size=(20, 3, 8, 8)).astype(np.float32)
    before = batcher.inline_batches
    answers = _one_client_in_turn(server, rows)
    np.testing.assert_allclose(
        answers, reference_logits(repo / "tiny" / "1" / "model.onnx", rows), rtol=1e-5, atol=1e-5
    )
    # all but the first (which teaches the batcher a lone batch's cost) may go inline; a request
    # that came right after a scheduling hiccup goes through the worker, so not all are required
    assert batcher.inline_batches - before >= 10


def test_many_clients_at_once_are_batched_by_the_worker(server: ServerThread, repo: Path) -> None:
    loaded = server.server.manager.get("tiny")
    rows = RNG.normal(size=(8 * 40, 3, 8, 8)).astype(np.float32)
    stats_before = loaded.stats.to_proto()
    inline_before = loaded.batcher.inline_batches
    answers: list[np.ndarray | None] = [None] * 8
    start = threading.Barrier(8)

    def client(k: int) -> None:
        start.wait()
        answers[k] = _one_client_in_turn(server, rows[k * 40 : (k + 1) * 40])

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    expected = reference_logits(repo / "tiny" / "1" / "model.onnx", rows)
    np.testing.assert_allclose(np.concatenate(answers), expected, rtol=1e-5, atol=1e-5)  # type: ignore[arg-type]
    stats = loaded.stats.to_proto()
    requests = stats.inference_count - stats_before.inference_count
    batches = stats.execution_count - stats_before.execution_count
    assert requests == 8 * 40
    # the gate's first version inlined nearly all of them (1.0 rows a batch); how many rows the
    # worker's batches then hold is timing (batch pipelining halves them, a busy box thins them)
    inline = loaded.batcher.inline_batches - inline_before
    assert inline < requests / 2, f"{inline} of {requests} requests inline: inline took the load"
    assert batches < requests, f"{requests} requests in {batches} batches: none was batched"


def test_zero_turns_it_off(repo: Path) -> None:
    with running_server(local_config(repo, lone_request_inline_max_ms=0)) as srv:
        rows = RNG.normal(size=(6, 3, 8, 8)).astype(np.float32)
        answers = _one_client_in_turn(srv, rows)  # type: ignore[arg-type]
        np.testing.assert_allclose(
            answers, reference_logits(repo / "tiny" / "1" / "model.onnx", rows), rtol=1e-5, atol=1e-5
        )
        assert srv.server.manager.get("tiny").batcher.inline_batches == 0  # type: ignore[attr-defined]


def test_the_setting_from_flag_env_and_file(
    repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert load_config(env={"KILN_REPO": str(repo)}).lone_request_inline_max_ms == 2.0
    assert (
        load_config(
            env={"KILN_REPO": str(repo), "KILN_LONE_REQUEST_INLINE_MAX_MS": "0.5"}
        ).lone_request_inline_max_ms
        == 0.5
    )
    file = tmp_path / "kiln.yaml"
    file.write_text(f"repo: {repo}\nlone_request_inline_max_ms: 0\n")
    assert load_config(config_file=file, env={}).lone_request_inline_max_ms == 0
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["--repo", str(repo), "--lone-request-inline-max-ms", "1.5", "--print-config"])
    assert cli.run(args) == 0
    assert json.loads(capsys.readouterr().out)["lone_request_inline_max_ms"] == 1.5
    with pytest.raises(ConfigError, match=r"lone_request_inline_max_ms: must be in \[0, 1000\], got -1"):
        load_config(env={"KILN_REPO": str(repo), "KILN_LONE_REQUEST_INLINE_MAX_MS": "-1"})
