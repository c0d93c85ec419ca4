"""Lifecycle under load: hot reload of a new version, explicit unload/load, and SIGTERM drain in a
real `kiln serve` subprocess. No request may fail in any of them."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest

from serving.clients.client import KilnClient
from serving.grpc.config import ServeConfig
from tests.integration.server_fixtures import (
    publish_tiny_model,
    reference_logits,
    running_server,
    start_serve_process,
)

ROOT = Path(__file__).resolve().parents[2]
BATCH = np.random.default_rng(0).normal(size=(1, 3, 8, 8)).astype(np.float32)


class Hammer:
    """Client threads sending requests until stopped; records versions seen and every failure."""

    def __init__(
        self, address: str, threads: int = 4, stop_on_unavailable: bool = False, model: str = "tiny"
    ) -> None:
        self.address, self.stop_on_unavailable, self.model = address, stop_on_unavailable, model
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.versions: dict[str, int] = {}
        self.failures: list[tuple[grpc.StatusCode, str]] = []
        self.refused = 0
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def __enter__(self) -> Hammer:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join(60)

    @property
    def successes(self) -> int:
        with self.lock:
            return sum(self.versions.values())

    def _run(self) -> None:
        with KilnClient(self.address, timeout=30) as client:
            while not self.stop.is_set():
                try:
                    response = client.inference.ModelInfer(_request(self.model), timeout=30)
                except grpc.RpcError as exc:
                    with self.lock:
                        # After SIGTERM the drain refuses new calls with UNAVAILABLE (retryable);
                        # never CANCELLED (test_shutdown_drain.py proves it over repeated runs).
                        refused = (grpc.StatusCode.UNAVAILABLE,)
                        if self.stop_on_unavailable and exc.code() in refused:
                            self.refused += 1
                            return
                        self.failures.append((exc.code(), exc.details()))
                    continue
                with self.lock:
                    self.versions[response.model_version] = self.versions.get(response.model_version, 0) + 1


def _request(model: str = "tiny"):  # type: ignore[no-untyped-def]
    from serving.clients.client import build_infer_request

    return build_infer_request(model, {"input": BATCH})


def _wait_until(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "condition not reached in time"
        time.sleep(0.01)


def test_hot_reload_under_load_drops_nothing(tmp_path: Path) -> None:
    publish_tiny_model(tmp_path, seed=1)
    config = ServeConfig(repo=tmp_path, host="127.0.0.1", port=0, metrics_port=None, poll_interval_s=0.05)
    with running_server(config) as srv, Hammer(srv.address) as hammer:
        _wait_until(lambda: hammer.successes >= 20)
        publish_tiny_model(tmp_path, seed=2)  # version 2, different weights
        _wait_until(lambda: hammer.versions.get("2", 0) >= 20)
        with KilnClient(srv.address) as client:
            index = [(m.version, m.state) for m in client.repository_index().models]
            logits = client.infer("tiny", {"input": BATCH})["logits"]
    assert hammer.failures == []
    assert hammer.versions.get("1", 0) >= 20 and index == [("2", "READY")]
    np.testing.assert_allclose(
        logits, reference_logits(tmp_path / "tiny" / "2" / "model.onnx", BATCH), rtol=1e-5
    )


def test_broken_new_version_never_takes_the_model_down(tmp_path: Path) -> None:
    repo, staging = tmp_path / "repo", tmp_path / "staging"
    publish_tiny_model(repo, seed=1)
    broken = publish_tiny_model(staging, seed=2, version=2)
    (broken / "model.onnx").write_bytes(b"corrupted after publishing")
    config = ServeConfig(repo=repo, host="127.0.0.1", port=0, metrics_port=None, poll_interval_s=0.05)
    with running_server(config) as srv, Hammer(srv.address) as hammer, KilnClient(srv.address) as client:
        _wait_until(lambda: hammer.successes >= 10)
        broken.rename(repo / "tiny" / "2")  # appears atomically, like a publish
        _wait_until(
            lambda: ("2", "UNAVAILABLE") in [(m.version, m.state) for m in client.repository_index().models]
        )
        served = hammer.successes
        _wait_until(lambda: hammer.successes >= served + 10)
        states = {m.version: (m.state, m.reason) for m in client.repository_index().models}
    assert hammer.failures == [] and set(hammer.versions) == {"1"}
    assert states["1"][0] == "READY" and "size mismatch" in states["2"][1]


def test_unload_and_load_through_the_repository_api(tmp_path: Path) -> None:
    publish_tiny_model(tmp_path)
    config = ServeConfig(repo=tmp_path, host="127.0.0.1", port=0, metrics_port=None, repository_control=True)
    with running_server(config) as srv, KilnClient(srv.address) as client:
        client.unload_model("tiny")
        assert not client.model_ready("tiny") and client.health("tiny") == "NOT_SERVING"
        with pytest.raises(grpc.RpcError) as info:
            client.infer("tiny", {"input": BATCH})
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "unloaded" in info.value.details()
        client.load_model("tiny")
        assert client.model_ready("tiny") and client.health("tiny") == "SERVING"
        assert client.infer("tiny", {"input": BATCH})["logits"].shape == (1, 4)


def test_sigterm_under_load_loses_no_accepted_request(tmp_path: Path) -> None:
    publish_tiny_model(tmp_path, max_batch_size=64)
    # A long batching delay keeps many requests queued at the moment SIGTERM arrives.
    proc, port, lines = start_serve_process(
        tmp_path, "--max-queue-delay-us", "20000", "--grace-period-s", "10"
    )
    try:
        address = f"127.0.0.1:{port}"
        with KilnClient(address) as probe:
            assert probe.health() == "SERVING" and probe.health("tiny") == "SERVING"
        with Hammer(address, threads=6, stop_on_unavailable=True) as hammer:
            _wait_until(lambda: hammer.successes >= 30)
            sent_at = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
            exit_seconds = time.monotonic() - sent_at
            hammer.stop.set()
        assert proc.stderr is not None
        lines += [json.loads(line) for line in proc.stderr]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()
    drained = next(line for line in lines if line["msg"].startswith("drained tiny"))
    assert hammer.failures == []
    assert drained["fail"] == 0 and drained["success"] == hammer.successes
    assert exit_seconds < 10 and any(line["msg"] == "kiln stopped" for line in lines)
