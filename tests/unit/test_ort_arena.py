"""One CPU memory arena per process for ONNX Runtime (serving/runtime/backends/ort_arena.py,
`share_ort_arena`): a second session that runs the same large batch as the first grows the
process by its own arena when each session has one, and by next to nothing when they share.

Each measurement runs in a fresh interpreter: inside a long test run, memory earlier tests freed
stays resident and an arena may grow into it unseen."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.unit.test_backends_onnxruntime import write_wide_model

ROWS = 8192  # one activation of the wide model: 8192 x 512 float32 = 16 MiB
MIB = 1 << 20
ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads the resident set from /proc")

# argv: model path, "1" to share the arena; prints the bytes the second backend's batch added
_MEASURE = """
import gc, json, sys
from pathlib import Path
import numpy as np
from serving.runtime.backends import BackendOptions
from serving.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
from tests.fuzz.load import rss_bytes

def rss():
    gc.collect()
    return rss_bytes()

model, share, rows = Path(sys.argv[1]), sys.argv[2] == "1", int(sys.argv[3])
options = BackendOptions(share_arena=share, lone_batch_spinning="off", single_thread_small_batches="off",
                         pin_threads=False)
first, second = (OnnxRuntimeBackend(model, max_batch_size=rows, options=options) for _ in range(2))
batch = {"input": np.ones((rows, 512), dtype=np.float32)}
first.infer(batch)
before = rss()
second.infer(batch)
print(json.dumps(rss() - before))
"""


def _second_session_growth(model: Path, *, share: bool) -> int:
    """Bytes a fresh process grew by when a second backend ran the batch the first one already ran."""
    done = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(model), "1" if share else "0", str(ROWS)],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    return int(json.loads(done.stdout.strip().splitlines()[-1]))


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_wide_model(tmp_path_factory.mktemp("arena") / "wide.onnx")


def test_sessions_that_share_the_arena_do_not_each_grow_one(model: Path) -> None:
    own = _second_session_growth(model, share=False)
    shared = _second_session_growth(model, share=True)
    assert own >= 16 * MIB, f"a session's own arena for a {ROWS}-row batch grew only {own / MIB:.1f} MiB"
    assert shared <= own / 4, f"shared arena: {shared / MIB:.1f} MiB against {own / MIB:.1f} MiB each"
