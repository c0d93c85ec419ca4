"""What clients can cause stays out of the error log, problems of the repository are said once,
and repository control is off unless configured (issue 20, items 4, 6 and 7).

Against the real in-process server on 127.0.0.1: the log is read from the root logger (every
record of the server thread, grpc's own loggers included), the counters from its registry.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from serving.clients.client import KilnClient
from serving.grpc.config import ServeConfig
from tests.fuzz.load import BATCH, wait_until
from tests.integration.server_fixtures import ServerThread, publish_tiny_model, running_server

ROOT = Path(__file__).resolve().parents[2]


class Records(logging.Handler):
    """Every log record of the process at INFO and above while installed."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def at(self, level: int, text: str = "") -> list[str]:
        """Messages logged exactly at `level` that contain `text`."""
        return [r.getMessage() for r in self.records if r.levelno == level and text in r.getMessage()]

    def loud(self) -> list[str]:
        """ERROR (and worse) records, and any record that carries a traceback."""
        return [r.getMessage() for r in self.records if r.levelno >= logging.ERROR or r.exc_info]


@pytest.fixture
def logs() -> Iterator[Records]:
    handler, root = Records(), logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def _config(repo: Path, **extra: object) -> ServeConfig:
    return ServeConfig(repo=repo, host="127.0.0.1", port=0, metrics_port=None, **extra)  # type: ignore[arg-type]


def _client_errors(srv: ServerThread, reason: str) -> float:
    value = srv.server.registry.get_sample_value("kiln_client_errors_total", {"reason": reason})
    return value or 0.0


def _index(client: KilnClient) -> dict[str, tuple[str, str]]:
    return {m.version: (m.state, m.reason) for m in client.repository_index().models}


def test_load_of_a_corrupt_version_is_one_warning_and_counted(tmp_path: Path, logs: Records) -> None:
    publish_tiny_model(tmp_path, seed=1)
    with running_server(_config(tmp_path, repository_control=True)) as srv, KilnClient(srv.address) as client:
        broken = publish_tiny_model(tmp_path, seed=2)  # version 2, then damaged on disk
        (broken / "model.onnx").write_bytes(b"corrupt")
        before = _client_errors(srv, "failed_precondition")
        for _ in range(3):
            with pytest.raises(grpc.RpcError) as info:
                client.load_model("tiny")
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "version 2 failed to load" in info.value.details()
        assert _client_errors(srv, "failed_precondition") - before == 3
        assert client.infer("tiny", {"input": BATCH})["logits"].shape == (1, 4)  # v1 serves on
    assert logs.loud() == []
    warnings = logs.at(logging.WARNING)
    assert len(warnings) == 1 and "tiny v2 failed to load" in warnings[0], warnings


def test_poll_says_once_that_a_new_version_is_broken(tmp_path: Path, logs: Records) -> None:
    repo, staging = tmp_path / "repo", tmp_path / "staging"
    publish_tiny_model(repo, seed=1)
    broken = publish_tiny_model(staging, seed=2, version=2)
    (broken / "model.onnx").write_bytes(b"corrupt")
    with running_server(_config(repo, poll_interval_s=0.02)) as srv, KilnClient(srv.address) as client:
        broken.rename(repo / "tiny" / "2")
        wait_until(lambda: _index(client).get("2", ("", ""))[0] == "UNAVAILABLE", what="v2 refused")
        time.sleep(0.5)  # about 25 more polls find the same broken version
        assert _index(client)["1"][0] == "READY"
    assert logs.loud() == []
    assert len(logs.at(logging.WARNING, "tiny")) == 1, logs.at(logging.WARNING)


def test_deleted_manifest_of_the_serving_version_is_reported(tmp_path: Path, logs: Records) -> None:
    manifest = publish_tiny_model(tmp_path, seed=1) / "kiln.json"
    text = manifest.read_text()
    with running_server(_config(tmp_path, poll_interval_s=0.02)) as srv, KilnClient(srv.address) as client:
        manifest.unlink()
        wait_until(lambda: _index(client)["1"][1] != "", what="the index to show the missing kiln.json")
        time.sleep(0.3)  # more polls: still one warning
        state, reason = _index(client)["1"]
        assert state == "READY" and "kiln.json" in reason and "not found" in reason
        assert client.infer("tiny", {"input": BATCH})["logits"].shape == (1, 4)  # keeps serving
        manifest.write_text(text)
        wait_until(lambda: _index(client)["1"] == ("READY", ""), what="the reason to clear")
    assert logs.loud() == []
    warnings = logs.at(logging.WARNING, "tiny")
    assert len(warnings) == 1 and "kiln.json" in warnings[0], warnings


def test_repository_control_is_off_by_default(tmp_path: Path) -> None:
    publish_tiny_model(tmp_path, seed=1)
    assert ServeConfig(repo=tmp_path).repository_control is False
    with running_server(_config(tmp_path)) as srv, KilnClient(srv.address) as client:
        for call in (lambda: client.unload_model("tiny"), lambda: client.load_model("tiny")):
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert client.model_ready("tiny") and client.infer("tiny", {"input": BATCH})["logits"].shape == (1, 4)
        assert [m.state for m in client.repository_index().models] == ["READY"]  # the index stays


_STALLED_STREAM_CLIENT = """
import sys, time, grpc
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from serving.clients.client import build_infer_request
from tests.fuzz.load import BATCH
request = build_infer_request("tiny", {"input": BATCH}, request_id="r" * 16_000)
channel = grpc.insecure_channel(sys.argv[1])
answers = pb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(iter([request] * 3000))
for _ in range(50):
    next(answers)
print("stalled", flush=True)  # stops reading: the server's next writes block, then it is killed
time.sleep(600)
"""


def _kill_a_stalled_stream_client(address: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-c", _STALLED_STREAM_CLIENT, address]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "stalled"
        time.sleep(0.5)  # the server is blocked writing to it
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def test_client_killed_mid_stream_is_a_counted_warning(tmp_path: Path, logs: Records) -> None:
    publish_tiny_model(tmp_path, seed=1)
    with running_server(_config(tmp_path)) as srv, KilnClient(srv.address) as client:
        before = _client_errors(srv, "write_failed")
        for _ in range(3):
            _kill_a_stalled_stream_client(srv.address)
        wait_until(lambda: _client_errors(srv, "write_failed") > before, what="the write failure counted")
        assert client.infer("tiny", {"input": BATCH})["logits"].shape == (1, 4)
    assert logs.loud() == []
    assert len(logs.at(logging.WARNING)) <= 1  # once per process and method: an earlier test may have said it
