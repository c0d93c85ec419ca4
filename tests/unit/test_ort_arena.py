"""One CPU memory arena per process for ONNX Runtime (serving/runtime/backends/ort_arena.py,
`share_ort_arena`): a second session that runs the same large batch as the first grows the
process by its own arena when each session has one, and by next to nothing when they share."""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import numpy as np
import pytest

from serving.runtime.backends import BackendOptions
from serving.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
from tests.unit.test_backends_onnxruntime import write_wide_model

ROWS = 8192  # one activation of the wide model: 8192 x 512 float32 = 16 MiB
MIB = 1 << 20

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads the resident set from /proc")


def _rss() -> int:
    gc.collect()
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def _second_session_growth(model: Path, *, share: bool) -> int:
    """Bytes the process grew by when a second backend ran the batch the first one already ran."""
    options = BackendOptions(
        share_arena=share, lone_batch_spinning="off", single_thread_small_batches="off", pin_threads=False
    )
    batch = {"input": np.ones((ROWS, 512), dtype=np.float32)}
    first, second = (OnnxRuntimeBackend(model, max_batch_size=ROWS, options=options) for _ in range(2))
    try:
        first.infer(batch)
        before = _rss()
        second.infer(batch)
        return _rss() - before
    finally:
        first.close()
        second.close()


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_wide_model(tmp_path_factory.mktemp("arena") / "wide.onnx")


def test_sessions_that_share_the_arena_do_not_each_grow_one(model: Path) -> None:
    own = _second_session_growth(model, share=False)
    shared = _second_session_growth(model, share=True)
    assert own >= 16 * MIB, f"a session's own arena for a {ROWS}-row batch grew only {own / MIB:.1f} MiB"
    assert shared <= own / 4, f"shared arena: {shared / MIB:.1f} MiB against {own / MIB:.1f} MiB each"
