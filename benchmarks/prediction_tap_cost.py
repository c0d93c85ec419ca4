"""What prediction metrics cost a computed batch: the batcher's taps of one served version, timed.

    .venv/bin/python benchmarks/prediction_tap_cost.py --repo benchmarks/out/tuning-repo --model resnet20

Starts the server in this process on `--repo` (metrics on, so the version's batcher has its
`PredictionTap`), then calls the batcher's taps directly with batches of random logits of 1, 16
and 64 rows, `--calls` times each, and prints microseconds per batch (best of three runs). The
taps run in the batch worker between two computed batches, so this is time the model waits.
Run it from another checkout (a git worktree) to compare commits; it appends nothing.
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


def tap_microseconds(taps: list, batch: object, calls: int) -> float:
    """Best of three runs of `calls` passes over every tap, in microseconds per batch."""
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(calls):
            for tap in taps:
                tap(batch)
        best = min(best, (time.perf_counter() - start) / calls * 1e6)
    return best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repo", type=Path, default=ROOT / "benchmarks" / "out" / "tuning-repo")
    p.add_argument("--model", default="resnet20")
    p.add_argument("--calls", type=int, default=3000)
    args = p.parse_args(argv)

    from serving.grpc.config import ServeConfig
    from serving.runtime.batcher import ComputedBatch
    from tests.integration.server_fixtures import running_server

    config = ServeConfig(
        repo=args.repo, models=(args.model,), host="127.0.0.1", port=0, metrics_port=0, precision="fp32"
    )
    rng = np.random.default_rng(0)
    print(cpu_summary())
    with running_server(config) as srv:
        loaded = next(lv for lv in srv.server.manager.loaded() if lv.model == args.model)
        taps = list(loaded.batcher._taps)
        classes = len(loaded.manifest.labels)
        print(f"{args.model} v{loaded.version}: taps {[type(t).__name__ for t in taps]}, {classes} classes")
        for rows in (1, 16, 64):
            logits = rng.normal(scale=4.0, size=(rows, classes)).astype(np.float32)
            batch = ComputedBatch({}, {loaded.handle.head.output: logits}, rows, 0.001)
            print(f"{rows:3d} rows: {tap_microseconds(taps, batch, args.calls):6.1f} us per batch")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
