"""SIGKILL under load, then a restart on the same port: clients see UNAVAILABLE while the process
is gone (never a wrong or half answer), and the new process is ready, warmed up and serving the
same clients again within seconds, without any of them reconnecting by hand."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import grpc

from serving.clients.client import KilnClient
from tests.fuzz.load import BATCH, Hammer, KilnProcess, wait_until
from tests.integration.server_fixtures import publish_tiny_model, reference_logits


def _ready(address: str) -> bool:
    try:
        with KilnClient(address, timeout=2) as probe:
            return probe.health() == "SERVING" and probe.model_ready("tiny")
    except grpc.RpcError:
        return False


def test_sigkill_under_load_then_restart_comes_back_ready(tmp_path: Path) -> None:
    onnx = publish_tiny_model(tmp_path) / "model.onnx"
    first = KilnProcess(tmp_path)
    address = f"127.0.0.1:{first.port}"
    second = None
    try:
        with Hammer(address, threads=3) as load:
            wait_until(lambda: load.count("tiny") >= 30, what="load before the kill")
            assert first.stop(signal.SIGKILL, timeout=10) == -signal.SIGKILL
            before = load.count("tiny")
            killed_at = time.monotonic()
            second = KilnProcess(tmp_path, "--port", str(first.port))
            wait_until(lambda: _ready(address), what="readiness after restart")
            ready_seconds = time.monotonic() - killed_at
            # the same client channels reconnect on their own and are served again
            wait_until(lambda: load.count("tiny") >= before + 30, what="load served after the restart")
        with KilnClient(address) as client:
            logits = client.infer("tiny", {"input": BATCH})["logits"]
    finally:
        first.stop(signal.SIGKILL)
        if second is not None:
            assert second.stop() == 0
    print(f"ready {ready_seconds:.2f} s after SIGKILL; {len(load.failures)} calls refused meanwhile")
    assert second.port == first.port and ready_seconds < 30
    assert {code for _, code, _ in load.failures} <= {grpc.StatusCode.UNAVAILABLE}, load.failures[:5]
    assert abs(logits - reference_logits(onnx, BATCH)).max() < 1e-5
