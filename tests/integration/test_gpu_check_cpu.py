"""benchmarks/gpu/check.py in its CPU mode: the same script the lent GPU runs (engine sweep,
served sweep with perf_analyzer, batcher on/off, timing backend, py-spy during concurrency 16),
on the CPU provider with a tiny model, so it cannot rot between GPU runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_the_gpu_check_runs_end_to_end_in_cpu_mode(tmp_path: Path) -> None:
    cmd = [sys.executable, "benchmarks/gpu/check.py", "--cpu", "--out", str(tmp_path),
           "--seconds", "0.05", "--window-ms", "300"]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    results = json.loads((tmp_path / "results.json").read_text())
    engine = results["engine"]
    assert not [r for r in engine if "error" in r], engine
    assert {(r["input"], r["batch"]) for r in engine} == {
        (i, b) for i in ("uint8", "fp32") for b in (1, 2, 4, 8)
    }
    assert all(r["images_per_s"] > 0 for r in engine)
    fit = results["timing"]["device-time-resnet20"]
    assert fit["base_us"] + fit["per_row_us"] > 0  # the timing backend replays a real device time
    served = results["served"]
    if served and "perf_analyzer not found" in served[0].get("error", ""):
        pytest.skip("perf_analyzer not found (make tools): the engine half ran")
    assert not [r for r in served if "error" in r], served
    modes = {(r["mode"], r["concurrency"]) for r in served}
    assert modes == {(m, c) for m in ("batcher", "no-batcher", "timing-backend") for c in (1, 16, 64)}
    assert all(r["throughput"] > 0 for r in served)
    spy = (tmp_path / "pyspy-resnet20-uint8-batcher-c16.txt").read_text()
    if "Thread" in spy:  # py-spy may lack ptrace rights in a container; it then says why
        assert "kiln-resnet20-uint8-0" in spy  # the batch worker, dumped under load
    assert "| timing-backend | 16 |" in (tmp_path / "results.md").read_text()
