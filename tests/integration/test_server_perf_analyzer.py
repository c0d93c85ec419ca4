"""perf_analyzer (Triton's load generator, gRPC mode) completes a measurement against Kiln.

It calls ServerMetadata, ModelMetadata and ModelConfig first and exits unless all three succeed
and agree, then ModelStatistics (we list "statistics"), then ModelInfer under load.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from serving.grpc.config import ServeConfig
from tests.integration.server_fixtures import publish_tiny_model, running_server


def _find_perf_analyzer() -> str | None:
    """$KILN_PERF_ANALYZER, else kiln-perf-analyzer / perf_analyzer on PATH, else the tools venv's wrapper."""
    tools = Path(__file__).resolve().parents[2] / ".tools-venv" / "bin" / "kiln-perf-analyzer"
    candidates = [
        os.environ.get("KILN_PERF_ANALYZER"),
        shutil.which("kiln-perf-analyzer"),
        shutil.which("perf_analyzer"),
        str(tools) if tools.is_file() else None,
    ]
    return next((c for c in candidates if c), None)


PERF_ANALYZER = _find_perf_analyzer()
pytestmark = pytest.mark.skipif(
    PERF_ANALYZER is None,
    reason="perf_analyzer not found (set KILN_PERF_ANALYZER, put it on PATH, or set up .tools-venv)",
)


@pytest.mark.slow
@pytest.mark.parametrize("streaming", [False, True], ids=["unary", "streaming"])
def test_perf_analyzer_completes_a_measurement(tmp_path: Path, streaming: bool) -> None:
    publish_tiny_model(tmp_path, max_batch_size=8)
    config = ServeConfig(repo=tmp_path, host="127.0.0.1", port=0, metrics_port=None)
    with running_server(config) as srv:
        # A huge stability percentage: the point is a completed measurement, and on a shared
        # 2-core box windows are rarely within perf_analyzer's default 10 % of each other.
        cmd = [
            str(PERF_ANALYZER), "-i", "grpc", "-u", srv.address, "-m", "tiny", "-b", "1",
            "--concurrency-range", "4", "--measurement-mode", "count_windows",
            "--measurement-request-count", "200", "--max-trials", "10", "--stability-percentage", "999",
        ]  # fmt: skip
        if streaming:
            cmd.append("--streaming")
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "Throughput:" in output and "infer/sec" in output, output
