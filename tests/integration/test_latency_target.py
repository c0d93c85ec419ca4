"""`latency_target_ms` holds queue wait + compute under the target across a step in load, where a
fixed `max_queue_delay_us` that suits the heavy load breaks the target for a lone client.

Real server, perf_analyzer (its own process) at concurrency 1, then 64; the timing backend gives
every batch a known device time (20 ms + 1 ms per row, two instances, batches up to 64 rows), so
the figures mean the same on any CPU. What is checked is the server's own end-to-end time per
request (`kiln_request_duration_seconds`, whose 0.15 s bucket is the target).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from serving.grpc.config import ServeConfig
from tests.integration.server_fixtures import ServerThread, publish_tiny_model, running_server
from tests.integration.test_server_perf_analyzer import PERF_ANALYZER

TARGET_S = 0.15  # a bucket boundary of kiln_request_duration_seconds
TIMING = {"backend": "null", "null_base_us": 20_000, "null_per_row_us": 1000, "instances": 2}
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(PERF_ANALYZER is None, reason="perf_analyzer not found (make tools)"),
]


def _within_target(srv: ServerThread, concurrency: int, data: Path) -> tuple[float, int]:
    """Run perf_analyzer at `concurrency`; the share of the requests it caused that the server
    answered within TARGET_S, and how many there were."""

    def sample(le: str) -> float:
        labels = {"model": "tiny", "version": "1", "le": le}
        return srv.server.registry.get_sample_value("kiln_request_duration_seconds_bucket", labels) or 0.0

    before = sample(str(TARGET_S)), sample("+Inf")
    cmd = [
        str(PERF_ANALYZER), "-i", "grpc", "-u", srv.address, "-m", "tiny", "--input-data", str(data),
        "--concurrency-range", str(concurrency), "--measurement-interval", "1500", "--max-trials", "3",
        "--stability-percentage", "999",
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    # 2: no stable window (shared cores); the requests were made, and the server counted them
    assert done.returncode in (0, 2), done.stdout[-2000:] + done.stderr[-2000:]
    within, total = sample(str(TARGET_S)) - before[0], sample("+Inf") - before[1]
    assert total > 0
    return within / total, int(total)


def _serve(tmp_path: Path, **batching: object) -> ServerThread:
    config = ServeConfig(repo=tmp_path, host="127.0.0.1", port=0, metrics_port=0, **TIMING, **batching)  # type: ignore[arg-type]
    return running_server(config)  # type: ignore[return-value]


def test_latency_target_holds_from_one_client_to_64_where_a_fixed_delay_breaks(tmp_path: Path) -> None:
    publish_tiny_model(tmp_path, max_batch_size=64)
    data = tmp_path / "data.json"
    data.write_text(json.dumps({"data": [{"input": [0.1] * 192}]}))
    with _serve(tmp_path, latency_target_ms=TARGET_S * 1000) as srv:
        lone, _ = _within_target(srv, 1, data)
        crowd, _ = _within_target(srv, 64, data)
    # A fixed wait long enough to fill 64-row batches: fine for 64 clients, not for one.
    with _serve(tmp_path, max_queue_delay_us=int(TARGET_S * 0.95e6)) as srv:
        fixed_lone, _ = _within_target(srv, 1, data)
    # p99 within the target for one client and for 64; on a box loaded by other work the event
    # loop's own share (outside the batcher's budget) can push a few percent past it (seen: 96 %
    # at load average 4 on 2 cores), so 95 % is the bound that still separates it from the fixed
    # delay (< 50 %).
    assert lone >= 0.99 and crowd >= 0.95, (lone, crowd)
    assert fixed_lone < 0.5, fixed_lone
