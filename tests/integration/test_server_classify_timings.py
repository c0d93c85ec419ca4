"""Classify's `compute_us` is the backend time of the request's own batch, measured with the
timing backend (`backend: null`), whose batch time is known in advance: base + per-row x rows.

Two concurrent requests run in batches of different sizes on two instances. The server's event
loop is then held busy until both batches have finished, so both results are delivered in the same
loop pass, as happens under load. A report of "the batch that finished last" would give the small
request the big batch's time; each must report its own.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np

from serving.clients.client import KilnClient
from serving.grpc.config import ServeConfig
from serving.runtime.batcher import DynamicBatcher
from tests.integration.server_fixtures import publish_tiny_model, running_server

BASE_US, PER_ROW_US = 40_000, 20_000
SMALL_S = (BASE_US + PER_ROW_US * 1) / 1e6  # 60 ms: a batch of 1 row
BIG_S = (BASE_US + PER_ROW_US * 8) / 1e6  # 200 ms: a batch of 8 rows


def _config(repo: Path) -> ServeConfig:
    return ServeConfig(
        repo=repo, host="127.0.0.1", port=0, metrics_port=None, backend="null", instances=2,
        null_base_us=BASE_US, null_per_row_us=PER_ROW_US, max_queue_delay_us=0,
    )  # fmt: skip


def _wait_for_batched(batcher: DynamicBatcher, requests: int) -> None:
    deadline = time.monotonic() + 10
    while batcher.queue_depth + batcher.inflight < requests:
        assert time.monotonic() < deadline, "the requests never reached the batcher"
        time.sleep(0.001)


async def _hold_the_loop(seconds: float) -> None:
    time.sleep(seconds)  # blocks the server's event loop on purpose: results pile up behind it


def _classify(address: str, images: int, into: dict[int, int]) -> None:
    pixels = np.zeros((images, 8, 8, 3), np.uint8)
    with KilnClient(address) as client:
        into[images] = client.classify("tiny", list(pixels), timeout=30).timings.compute_us


def test_each_request_reports_its_own_batch_compute_time(tmp_path: Path) -> None:
    publish_tiny_model(tmp_path, max_batch_size=8)
    reported: dict[int, int] = {}
    with running_server(_config(tmp_path)) as srv:
        batcher = srv.server.manager.get("tiny").batcher
        big = threading.Thread(target=_classify, args=(srv.address, 8, reported))
        small = threading.Thread(target=_classify, args=(srv.address, 1, reported))
        big.start()
        _wait_for_batched(batcher, 1)
        small.start()  # while the 8-row batch computes: a batch of its own on the other instance
        _wait_for_batched(batcher, 2)
        srv.call(_hold_the_loop(BIG_S + 0.3))
        big.join(30)
        small.join(30)
    assert set(reported) == {1, 8}, reported
    assert SMALL_S * 1e6 <= reported[1] < BIG_S * 1e6, reported
    assert reported[8] >= BIG_S * 1e6, reported
