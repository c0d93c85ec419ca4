"""ONNX Runtime's intra-op spinning, with and without `session.force_spinning_stop`, on a served file.

    .venv/bin/python benchmarks/ort_spinning.py --onnx benchmarks/out/tuning-repo/resnet20/1/model.onnx

For each session setting (1 thread; 2 threads spinning off; 2 spinning on; 2 spinning on and
stopped when a Run returns: what `kiln serve --intra-op-spinning` uses), runs batches of 1 and 16
rows with a short sleep between runs (a server's gaps between batches) and prints p50/p99 ms
per run, rows/s, and the process's CPU seconds per wall second (spinning burns CPU in the gaps
unless it is stopped), then the CPU the pool burns in 0.3 s of idleness after a Run. Appends
nothing.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without install

from benchmarks.serve_bench_lib import cpu_summary  # noqa: E402

SETTINGS = {  # name: (threads, allow_spinning, force_spinning_stop)
    "1 thread": (1, "0", "0"),
    "2 threads, spinning off": (2, "0", "0"),
    "2 threads, spinning on": (2, "1", "0"),
    "2 threads, spinning on, stopped after Run": (2, "1", "1"),
}


def session(onnx: Path, threads: int, spin: str, stop: str):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.add_session_config_entry("session.intra_op.allow_spinning", spin)
    so.add_session_config_entry("session.force_spinning_stop", stop)
    return ort.InferenceSession(str(onnx), sess_options=so, providers=["CPUExecutionProvider"])


def measure(sess, rows: int, runs: int, gap_s: float) -> str:
    """p50/p99 ms per run, rows/s over the runs' own time, CPU s per wall s including the gaps."""
    inp = sess.get_inputs()[0]
    shape = [rows, *(d if isinstance(d, int) else 1 for d in inp.shape[1:])]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    for _ in range(20):
        sess.run(None, {inp.name: x})
    times = []
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(runs):
        time.sleep(gap_s)
        tick = time.perf_counter()
        sess.run(None, {inp.name: x})
        times.append(time.perf_counter() - tick)
    busy = (time.process_time() - cpu) / (time.perf_counter() - wall)
    ms = np.asarray(times) * 1e3
    return (
        f"batch {rows:2d}: p50 {np.percentile(ms, 50):6.3f} ms, p99 {np.percentile(ms, 99):6.3f} ms, "
        f"{rows * runs / (ms.sum() / 1e3):7.0f} rows/s, CPU/wall {busy:4.2f}"
    )


def idle_cpu(sess) -> float:
    """CPU seconds the process uses in 0.3 s of idleness right after a Run."""
    inp = sess.get_inputs()[0]
    shape = [16, *(d if isinstance(d, int) else 1 for d in inp.shape[1:])]
    sess.run(None, {inp.name: np.zeros(shape, np.float32)})
    cpu = time.process_time()
    time.sleep(0.3)
    return time.process_time() - cpu


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--onnx", type=Path, default=ROOT / "benchmarks/out/tuning-repo/resnet20/1/model.onnx")
    p.add_argument("--gap-us", type=float, default=300.0, help="sleep between runs")
    args = p.parse_args(argv)
    print(cpu_summary())
    for name, (threads, spin, stop) in SETTINGS.items():
        sess = session(args.onnx, threads, spin, stop)
        print(f"{name}:")
        for rows, runs in ((1, 600), (16, 150)):
            print("  " + measure(sess, rows, runs, args.gap_us / 1e6))
        print(f"  CPU burnt in 0.3 s idle after a Run: {idle_cpu(sess) * 1e3:.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
