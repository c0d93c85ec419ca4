"""The timing backend (`backend: null`) behind the real server: the scheduler keeps every instance
busy, nobody waits more than two batch times, padding costs no device call, concurrency pays.

Each test starts the real server on 127.0.0.1 in-process (to read the backend's own busy counters)
and drives it from a separate process (tests/integration/timing_load.py, KilnClient threads), so
the load generator never competes for the server's GIL. Busy time is measured inside the backend
(InstancePool, around each device call), never inferred from wall-clock guesses.

These fail on a scheduler that serialises instances (one batch worker: the second instance idles,
throughput stays under one instance's ceiling) or parks batches behind the event loop (instances
idle between batches, latency grows). The machine is shared, so a window that misses is measured
once more: a serialising scheduler misses every window, a noisy neighbour rarely two in a row.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from serving.clients.client import KilnClient
from serving.grpc.config import ServeConfig
from serving.runtime.backends import InstanceBusy, NullBackend
from tests.integration.server_fixtures import LABELS, ServerThread, publish_tiny_model, running_server

ROOT = Path(__file__).resolve().parents[2]
MAX_BATCH = 8
ATTEMPTS = 2  # see the module docstring


@dataclass
class Window:
    """One measured load window: per-instance busy fraction, client latencies, throughput."""

    busy: list[float]
    latencies: np.ndarray  # seconds, client-side
    throughput: float  # completed requests per second
    calls: int

    def p99(self) -> float:
        return float(np.percentile(self.latencies, 99))


def _flip_a_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-40] ^= 1  # same size: the checksum, not the size check, must catch it
    path.write_bytes(bytes(data))


def _config(repo: Path, **overrides: object) -> ServeConfig:
    base = {"repo": repo, "host": "127.0.0.1", "port": 0, "metrics_port": None, "backend": "null"}
    return ServeConfig(**(base | overrides))  # type: ignore[arg-type]


@contextlib.contextmanager
def _server(tmp_path: Path, **overrides: object) -> Iterator[tuple[ServerThread, NullBackend]]:
    publish_tiny_model(tmp_path, max_batch_size=MAX_BATCH)
    with running_server(_config(tmp_path, **overrides)) as srv:
        (loaded,) = srv.server.manager.loaded()
        assert isinstance(loaded.backend, NullBackend), "model_manager must pass null_timing(config)"
        yield srv, loaded.backend


def _measure(
    srv: ServerThread, backend: NullBackend, *, concurrency: int, rows: int, seconds: float = 2.0
) -> Window:
    """Run the load process; sample the backend's counters when its window starts and ends."""
    cmd = [sys.executable, "-m", "tests.integration.timing_load", srv.address, "tiny"]
    cmd += ["--concurrency", str(concurrency), "--rows", str(rows), "--seconds", str(seconds)]
    with subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True) as proc:
        watchdog = threading.Timer(60.0, proc.kill)  # a stuck server must not hang the suite
        watchdog.start()
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "start"
            before, t0 = backend.instance_stats(), time.perf_counter()
            assert proc.stdout.readline().strip() == "end"
            after, t1 = backend.instance_stats(), time.perf_counter()
            report = json.loads(proc.stdout.readline())
        finally:
            watchdog.cancel()
    assert proc.returncode == 0
    return Window(
        busy=[(a.busy_seconds - b.busy_seconds) / (t1 - t0) for a, b in zip(after, before, strict=True)],
        latencies=np.array(report["latencies"]),
        throughput=report["completed"] / report["seconds"],
        calls=sum(a.calls - b.calls for a, b in zip(after, before, strict=True)),
    )


def test_two_instances_stay_busy_and_no_request_waits_past_two_batches(tmp_path: Path) -> None:
    base_us, per_row_us, delay_us = 6000, 250, 1000
    batch_s = (base_us + per_row_us * MAX_BATCH) / 1e6  # 8 ms per full batch
    with _server(
        tmp_path, instances=2, null_base_us=base_us, null_per_row_us=per_row_us, max_queue_delay_us=delay_us
    ) as (srv, backend):
        assert backend.instances == 2
        for _ in range(ATTEMPTS):
            # Three full batches for two instances: one always waits, so the queue is never empty
            # when an instance frees.
            window = _measure(srv, backend, concurrency=3, rows=MAX_BATCH)
            if min(window.busy) >= 0.90 and window.p99() <= 2 * batch_s + delay_us / 1e6:
                break
    assert window.calls > 0 and len(window.latencies) > 100
    assert min(window.busy) >= 0.90, f"instance busy fractions {window.busy}"
    assert window.p99() <= 2 * batch_s + delay_us / 1e6, (
        f"p99 {window.p99() * 1e3:.2f} ms > two batches ({2 * batch_s * 1e3:.1f} ms) + queue delay"
    )


def _stats(client: KilnClient) -> tuple[int, int, dict[int, int]]:
    (model,) = client.statistics("tiny").model_stats
    sizes = {b.batch_size: b.compute_infer.count for b in model.batch_stats}
    return model.execution_count, model.inference_count, sizes


def _totals(stats: tuple[InstanceBusy, ...]) -> tuple[int, int, float]:
    return sum(s.calls for s in stats), sum(s.rows for s in stats), sum(s.busy_seconds for s in stats)


def test_padding_to_buckets_adds_no_device_call(tmp_path: Path) -> None:
    base_us, per_row_us = 2000, 200
    with _server(tmp_path, instances=2, null_base_us=base_us, null_per_row_us=per_row_us) as (srv, backend):
        assert backend.buckets == (1, 2, 4, 8)
        with KilnClient(srv.address) as client:
            executions0, rows0, sizes0 = _stats(client)
            calls0, device_rows0, busy0 = _totals(backend.instance_stats())
            # 3-row requests make batches of 3 and 6 rows: both padded (to 4 and 8) in one call.
            _measure(srv, backend, concurrency=4, rows=3, seconds=1.0)
            executions, rows, sizes = _stats(client)
            calls, device_rows, busy = _totals(backend.instance_stats())
    assert calls - calls0 == executions - executions0 > 0
    assert device_rows - device_rows0 == rows - rows0
    batches = {size: count - sizes0.get(size, 0) for size, count in sizes.items()}
    assert {size for size, n in batches.items() if n} <= {3, 6} and batches.get(6, 0) > 0, batches
    # Each call held its instance for the padded rows: the padding happened inside that one call.
    padded = {3: 4, 6: 8}
    held = sum(n * (base_us + per_row_us * padded[size]) / 1e6 for size, n in batches.items())
    assert busy - busy0 >= held


def test_concurrency_16_is_never_slower_than_1(tmp_path: Path) -> None:
    batch_s = 20_000 / 1e6  # the same 20 ms for any batch: batching is all the gain
    with _server(tmp_path, instances=2, null_base_us=20_000) as (srv, backend):
        for _ in range(ATTEMPTS):
            single = _measure(srv, backend, concurrency=1, rows=1, seconds=1.5)
            many = _measure(srv, backend, concurrency=16, rows=1, seconds=1.5)
            one_instance_ceiling = MAX_BATCH / batch_s  # rows/s of a single instance at full batches
            if many.throughput >= single.throughput and many.throughput > 1.1 * one_instance_ceiling:
                break
    assert many.throughput >= single.throughput, (many.throughput, single.throughput)
    # Only both instances working at once can beat one instance's ceiling.
    assert many.throughput > 1.1 * one_instance_ceiling, (many.throughput, one_instance_ceiling)


def test_answers_zeros_shaped_and_validated_like_the_model(tmp_path: Path) -> None:
    with _server(tmp_path, null_base_us=100) as (srv, backend):
        triton = grpcclient.InferenceServerClient(srv.address)
        try:
            meta = triton.get_model_metadata("tiny")
            assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
                ("input", "FP32", [-1, 3, 8, 8])
            ]
            assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [
                ("logits", "FP32", [-1, len(LABELS)])
            ]
            batch = np.ones((5, 3, 8, 8), np.float32)
            inp = grpcclient.InferInput("input", list(batch.shape), "FP32")
            inp.set_data_from_numpy(batch)
            logits = triton.infer("tiny", [inp]).as_numpy("logits")
            assert logits.dtype == np.float32 and logits.shape == (5, len(LABELS)) and not logits.any()
            wrong = grpcclient.InferInput("input", [1, 3, 4, 4], "FP32")
            wrong.set_data_from_numpy(np.ones((1, 3, 4, 4), np.float32))
            with pytest.raises(InferenceServerException, match="expected shape") as info:
                triton.infer("tiny", [wrong])
            assert "INVALID_ARGUMENT" in str(info.value)
            too_big = grpcclient.InferInput("input", [MAX_BATCH + 1, 3, 8, 8], "FP32")
            too_big.set_data_from_numpy(np.ones((MAX_BATCH + 1, 3, 8, 8), np.float32))
            with pytest.raises(InferenceServerException, match="exceeds"):
                triton.infer("tiny", [too_big])
        finally:
            triton.close()
        assert backend.device_calls >= 1


def test_a_damaged_artefact_is_still_refused(tmp_path: Path) -> None:
    _flip_a_bit(publish_tiny_model(tmp_path, max_batch_size=MAX_BATCH) / "model.onnx")
    with running_server(_config(tmp_path, null_base_us=100)) as srv, KilnClient(srv.address) as client:
        with pytest.raises(grpc.RpcError) as info:
            client.infer("tiny", {"input": np.zeros((1, 3, 8, 8), np.float32)})
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "sha256 mismatch" in (info.value.details() or "")
