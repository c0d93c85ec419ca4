"""`batch_pipelining` (serving/runtime/batcher.py, "Pipelining"): real server on 127.0.0.1,
tritonclient over gRPC, real ONNX Runtime. Under closed-loop load from many clients, each on its
own connection, every answer carries the model's numbers (which batch a request rides in is
timing; the batch shapes themselves are pinned down in tests/unit/test_batcher_dynamic.py); the
setting reaches the batcher from flag, env and file."""

from __future__ import annotations

import argparse
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from serving import cli
from serving.grpc.config import load_config
from tests.integration.server_fixtures import (
    ServerThread,
    local_config,
    publish_tiny_model,
    reference_logits,
    running_server,
)

CLIENTS, ROUNDS = 8, 30


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("repo")
    publish_tiny_model(path, "tiny", max_batch_size=16)
    return path


def _closed_loop(server: ServerThread, rows: np.ndarray) -> list[np.ndarray]:
    """CLIENTS threads, each its own connection, each sending ROUNDS one-row requests in turn."""
    answers: list[np.ndarray] = [np.empty(0)] * CLIENTS
    errors: list[BaseException] = []

    def client(index: int) -> None:
        conn = grpcclient.InferenceServerClient(server.address)
        try:
            got = []
            for r in range(ROUNDS):
                row = rows[(index * ROUNDS + r) % len(rows)][None]
                tensor = grpcclient.InferInput("input", list(row.shape), "FP32")
                tensor.set_data_from_numpy(row)
                got.append(conn.infer("tiny", [tensor]).as_numpy("logits"))
            answers[index] = np.concatenate(got)
        except BaseException as exc:  # reported by the test thread
            errors.append(exc)
        finally:
            conn.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    return answers


def test_pipelined_batches_answer_every_client_with_the_models_numbers(repo: Path) -> None:
    rows = np.random.default_rng(3).normal(size=(CLIENTS * ROUNDS, 3, 8, 8)).astype(np.float32)
    with running_server(local_config(repo)) as srv:
        batcher = srv.server.manager.get("tiny").batcher  # type: ignore[attr-defined]
        assert batcher.pipelining  # the default
        answers = _closed_loop(srv, rows)  # type: ignore[arg-type]
    expected = reference_logits(repo / "tiny" / "1" / "model.onnx", rows)
    for index, got in enumerate(answers):
        want = expected[[(index * ROUNDS + r) % len(rows) for r in range(ROUNDS)]]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_the_setting_from_flag_env_and_file(
    repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert load_config(env={"KILN_REPO": str(repo)}).batch_pipelining is True
    off = load_config(env={"KILN_REPO": str(repo), "KILN_BATCH_PIPELINING": "false"})
    assert off.batch_pipelining is False
    file = tmp_path / "kiln.yaml"
    file.write_text(f"repo: {repo}\nbatch_pipelining: false\n")
    assert load_config(config_file=file, env={}).batch_pipelining is False
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["--repo", str(repo), "--no-batch-pipelining", "--print-config"])
    assert cli.run(args) == 0
    assert json.loads(capsys.readouterr().out)["batch_pipelining"] is False
    with running_server(local_config(repo, batch_pipelining=False)) as srv:
        assert not srv.server.manager.get("tiny").batcher.pipelining  # type: ignore[attr-defined]
