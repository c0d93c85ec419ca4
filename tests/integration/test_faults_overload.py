"""Overload faults on a real server whose backend is held by a gate: a storm of clients that
cancel or let their deadlines pass while queued (none of them may reach the backend, and the
kiln_requests_dropped_total metric counts each one), and a queue overflowed again and again
(RESOURCE_EXHAUSTED at once, queued requests still served, resident memory flat).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from serving.clients.client import KilnClient, build_infer_request
from serving.grpc.config import ServeConfig
from tests.fuzz.load import MARKER, Gate, live_rss_bytes, metric, wait_until
from tests.integration.server_fixtures import ServerThread, publish_tiny_model, running_server

C = grpc.StatusCode


@contextlib.contextmanager
def gated_server(repo: Path, **extra: object) -> Iterator[tuple[ServerThread, Gate]]:
    """A server (metrics on a free port) whose only model's backend runs behind a Gate."""
    publish_tiny_model(repo, max_batch_size=4)
    config = ServeConfig(repo=repo, host="127.0.0.1", port=0, metrics_port=0, **extra)  # type: ignore[arg-type]
    with running_server(config) as srv:
        backend = srv.server.manager.get("tiny").backend
        gate = Gate(backend.infer)
        backend.infer = gate  # type: ignore[method-assign]
        yield srv, gate


def _request(rows: int = 1, fill: float = 0.0, request_id: str = ""):  # type: ignore[no-untyped-def]
    batch = np.full((rows, 3, 8, 8), fill, np.float32)
    return build_infer_request("tiny", {"input": batch}, request_id=request_id)


def _code(future: grpc.Future) -> C:
    try:
        future.result(timeout=60)
    except grpc.RpcError as exc:
        return exc.code()
    except grpc.FutureCancelledError:
        return C.CANCELLED
    return C.OK


def test_cancel_and_deadline_storm_spends_no_compute(tmp_path: Path) -> None:
    storm = 160
    with gated_server(tmp_path, max_queue_size=1024, max_queue_per_client=1024) as (srv, gate):
        port = srv.server.metrics_port
        assert port is not None
        clients = [KilnClient(srv.address) for _ in range(8)]  # many connections, as many clients
        try:
            gate.open.clear()
            blocker = clients[0].inference.ModelInfer.future(_request(), timeout=60)
            assert gate.entered.wait(10)
            futures = []
            for i in range(storm):  # half cancel themselves, half time out, all while queued
                stub = clients[i % len(clients)].inference.ModelInfer
                timeout = 60 if i % 2 else 0.5
                futures.append(stub.future(_request(fill=MARKER), timeout=timeout))
            batcher = srv.server.manager.get("tiny").batcher
            wait_until(lambda: batcher.queue_depth == storm, what="the storm queued")
            for future in futures[1::2]:
                future.cancel()
            codes = [_code(f) for f in futures]
            # the server saw every client go away before any compute was possible
            wait_until(lambda: metric(port, "kiln_requests_total", {"code": "CANCELLED"}) == storm)
            gate.open.set()
            assert _code(blocker) == C.OK
            assert clients[0].infer("tiny", {"input": np.ones((2, 3, 8, 8), np.float32)})["logits"].shape == (
                2,
                4,
            )
        finally:
            gate.open.set()
            for client in clients:
                client.close()
        assert codes[0::2] == [C.DEADLINE_EXCEEDED] * (storm // 2)
        assert codes[1::2] == [C.CANCELLED] * (storm // 2)
        assert gate.marker_rows == 0 and gate.rows_seen == 1 + 2  # the blocker and the last request
        assert metric(port, "kiln_requests_dropped_total", {"model": "tiny"}) == storm
        assert batcher.queue_depth == batcher.inflight == 0


@pytest.mark.slow
def test_repeated_queue_overflow_is_resource_exhausted_without_memory_growth(tmp_path: Path) -> None:
    queue, extra, rounds, warmup = 8, 400, 7, 3
    padding = "p" * 64_000  # each refused request carries 64 kB that a leak would keep
    samples = []
    with (
        gated_server(tmp_path, max_queue_size=queue, max_queue_per_client=queue) as (srv, gate),
        KilnClient(srv.address) as client,
    ):
        port = srv.server.metrics_port
        assert port is not None
        batcher = srv.server.manager.get("tiny").batcher
        stub = client.inference.ModelInfer
        for round_index in range(rounds):
            gate.open.clear()
            gate.entered.clear()
            held = [stub.future(_request(), timeout=60)]
            assert gate.entered.wait(10)
            held += [stub.future(_request(rows=4), timeout=60) for _ in range(queue)]
            wait_until(lambda: batcher.queue_depth == queue, what="a full queue")
            start = time.monotonic()
            refused = [stub.future(_request(rows=4, request_id=padding), timeout=60) for _ in range(extra)]
            refused_codes = {_code(f) for f in refused}
            refused_seconds = time.monotonic() - start
            gate.open.set()
            assert {_code(f) for f in held} == {C.OK}, f"round {round_index}"
            assert refused_codes == {C.RESOURCE_EXHAUSTED} and refused_seconds < 30
            if round_index >= warmup - 1:
                samples.append(live_rss_bytes())
        refused_total = metric(port, "kiln_requests_total", {"model": "tiny", "code": "RESOURCE_EXHAUSTED"})
    growth = samples[-1] - samples[0]
    assert refused_total == extra * rounds
    # A leak of the refused requests alone would keep 64 kB x 1,600 = 102 MB; in a test process
    # that also holds torch and other servers, RSS moves by up to ~15 MB on its own.
    assert growth < 40 * 2**20, f"RSS grew {growth / 2**20:.1f} MiB after warm-up: {samples}"
