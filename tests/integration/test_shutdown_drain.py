"""SIGTERM under load, repeated: every request the server admitted before the drain is answered
with its result, the ones after it get UNAVAILABLE (retryable), none CANCELLED, and the process
is gone within the grace period (+0.5 s). Real `kiln serve` processes, the Python client with 16
threads, and perf_analyzer in async mode (`-a`) at concurrency 16."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from serving.clients.client import KilnClient, build_infer_request
from tests.integration.server_fixtures import publish_tiny_model, start_serve_process
from tests.integration.test_server_perf_analyzer import PERF_ANALYZER

RUNS = 20
GRACE_S = 5.0
EXIT_MARGIN_S = 0.5
BATCH = np.random.default_rng(0).normal(size=(1, 3, 8, 8)).astype(np.float32)
# A batching delay keeps requests queued at the moment SIGTERM arrives.
FLAGS = ("--max-queue-delay-us", "5000", "--grace-period-s", str(GRACE_S))


class Clients:
    """16 threads sending ModelInfer until refused; every outcome is recorded."""

    def __init__(self, address: str, threads: int = 16) -> None:
        self.address, self.ok, self.codes = address, 0, []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        request = build_infer_request("tiny", {"input": BATCH})
        with KilnClient(self.address, timeout=30) as client:
            while True:
                try:
                    client.inference.ModelInfer(request, timeout=30)
                except grpc.RpcError as exc:
                    with self.lock:
                        self.codes.append((exc.code(), exc.details()))
                    return
                with self.lock:
                    self.ok += 1


def _stop_and_time(proc: subprocess.Popen[str]) -> float:
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=GRACE_S + 30) == 0
    return time.monotonic() - sent


def _drained(proc: subprocess.Popen[str], lines: list[dict]) -> dict:
    assert proc.stderr is not None
    lines += [json.loads(line) for line in proc.stderr]
    proc.stderr.close()
    return next(line for line in lines if line["msg"].startswith("drained tiny"))


@pytest.mark.slow
def test_sigterm_never_cancels_python_clients(tmp_path: Path) -> None:
    publish_tiny_model(tmp_path, max_batch_size=64)
    cancelled, slow_exits = [], []
    for run in range(RUNS):
        proc, port, lines = start_serve_process(tmp_path, *FLAGS)
        try:
            clients = Clients(f"127.0.0.1:{port}")
            for thread in clients.threads:
                thread.start()
            while clients.ok < 200:
                time.sleep(0.005)
            seconds = _stop_and_time(proc)
            for thread in clients.threads:
                thread.join(30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        drained = _drained(proc, lines)
        codes = {code for code, _ in clients.codes}
        cancelled += [
            (run, details) for code, details in clients.codes if code != grpc.StatusCode.UNAVAILABLE
        ]
        assert codes <= {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}, clients.codes
        # what the server counts as answered is exactly what the clients received
        assert drained["fail"] == 0 and drained["success"] == clients.ok, (run, drained, clients.ok)
        if seconds > GRACE_S + EXIT_MARGIN_S:
            slow_exits.append((run, seconds))
    assert cancelled == [], f"{len(cancelled)} requests were not UNAVAILABLE: {cancelled[:5]}"
    assert slow_exits == []


@pytest.mark.slow
@pytest.mark.skipif(PERF_ANALYZER is None, reason="perf_analyzer not found (make tools)")
def test_sigterm_never_cancels_perf_analyzer_async(tmp_path: Path) -> None:
    publish_tiny_model(tmp_path, max_batch_size=64)
    data = tmp_path / "data.json"
    data.write_text(json.dumps({"data": [{"input": BATCH[0].ravel().tolist()}]}))
    failures = []
    for run in range(RUNS // 2):
        proc, port, lines = start_serve_process(tmp_path, *FLAGS)
        try:
            cmd = [
                str(PERF_ANALYZER), "-i", "grpc", "-u", f"127.0.0.1:{port}", "-m", "tiny", "-a",
                "--concurrency-range", "16", "--input-data", str(data), "--measurement-interval", "3000",
            ]  # fmt: skip
            perf = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            time.sleep(1.5)  # perf_analyzer's metadata calls, then load
            seconds = _stop_and_time(proc)
            output, _ = perf.communicate(timeout=60)
        finally:
            for child in (proc,):
                if child.poll() is None:
                    child.kill()
                    child.wait()
        drained = _drained(proc, lines)
        if "cancel" in output.lower() or drained["fail"] or seconds > GRACE_S + EXIT_MARGIN_S:
            failures.append((run, seconds, drained, output[-600:]))
        assert drained["success"] > 0 and "shutting down" in output, output[-2000:]
    assert failures == [], failures[:2]


def test_full_queue_past_the_grace_exits_on_time_and_refuses_retryably(tmp_path: Path) -> None:
    """Work that cannot finish within the grace: queued requests get UNAVAILABLE at its end, the
    running batch finishes, and the process is gone within grace + 0.5 s."""
    publish_tiny_model(tmp_path, max_batch_size=1)
    grace = 2.0
    # 200 ms per batch of one: 32 queued requests need 6.4 s, three times the grace.
    flags = ("--backend", "null", "--null-base-us", "200000", "--grace-period-s", str(grace))
    proc, port, lines = start_serve_process(tmp_path, *flags)
    codes: list[grpc.StatusCode] = []
    try:
        with KilnClient(f"127.0.0.1:{port}", timeout=60) as client:
            request = build_infer_request("tiny", {"input": BATCH})
            futures = [client.inference.ModelInfer.future(request, timeout=60) for _ in range(32)]
            time.sleep(0.5)  # all queued behind the first batches
            seconds = _stop_and_time(proc)
            for future in futures:
                try:
                    future.result()
                    codes.append(grpc.StatusCode.OK)
                except grpc.RpcError as exc:
                    codes.append(exc.code())
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    drained = _drained(proc, lines)
    assert seconds <= grace + EXIT_MARGIN_S, seconds
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, codes
    assert 0 < codes.count(grpc.StatusCode.OK) < len(codes)
    assert drained["success"] == codes.count(grpc.StatusCode.OK)


def test_idle_server_exits_at_once(tmp_path: Path) -> None:
    publish_tiny_model(tmp_path)
    proc, _, lines = start_serve_process(tmp_path, "--grace-period-s", "3")
    try:
        seconds = _stop_and_time(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    _drained(proc, lines)
    assert seconds <= EXIT_MARGIN_S, seconds


def test_sigterm_ends_an_open_stream_with_its_answers_then_unavailable(tmp_path: Path) -> None:
    """A stream open at SIGTERM: every request the server read is answered with its result, then
    the stream ends UNAVAILABLE (retryable), never CANCELLED."""
    from protos.inference import grpc_service_pb2_grpc as pb_grpc

    publish_tiny_model(tmp_path, max_batch_size=64)
    proc, port, lines = start_serve_process(tmp_path, *FLAGS)
    request = build_infer_request("tiny", {"input": BATCH})
    answers, ending = [], None
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:

            def requests():  # type: ignore[no-untyped-def]
                while True:
                    yield request
                    time.sleep(0.001)

            stream = pb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(requests(), timeout=60)
            try:
                for answer in stream:
                    answers.append(answer)
                    if len(answers) == 200:
                        proc.send_signal(signal.SIGTERM)
            except grpc.RpcError as exc:
                ending = exc.code()
        assert proc.wait(timeout=GRACE_S + 30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    drained = _drained(proc, lines)
    assert ending == grpc.StatusCode.UNAVAILABLE
    assert not any(a.error_message for a in answers)
    assert drained["success"] == len(answers) and drained["fail"] == 0
