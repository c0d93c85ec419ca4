"""What prediction metrics cost a computed batch: the batcher's taps of one served version, timed.

    .venv/bin/python benchmarks/prediction_tap_cost.py --repo benchmarks/out/tuning-repo --model resnet20

Starts the server in this process on `--repo` (metrics on, so the version's batcher has its
`PredictionTap`), then calls the batcher's taps directly with batches of random logits of 1, 16
and 64 rows, `--calls` times each, and prints microseconds per batch (best of three runs): the
taps, which run in the batch worker between two computed batches (time the model waits), and
the counting of those batches, which the recorder does later, many batches at once, on its own
thread or at a scrape (`flush`, timed every 100 batches; absent before that design). Run it from
another checkout (a git worktree) to compare commits; it appends nothing.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without install

from benchmarks.serve_bench_lib import cpu_summary  # noqa: E402


def tap_microseconds(
    taps: list, batch: object, calls: int, flush: Callable[[], None] | None
) -> tuple[float, float]:
    """Best of three runs of `calls` passes over every tap: microseconds per batch in the taps,
    and in `flush` (called after every 100 batches, outside the taps' time)."""
    best_taps = best_flush = float("inf")
    for _ in range(3):
        in_taps = in_flush = 0.0
        for done in range(1, calls + 1):
            start = time.perf_counter()
            for tap in taps:
                tap(batch)
            in_taps += time.perf_counter() - start
            if flush is not None and (done % 100 == 0 or done == calls):
                start = time.perf_counter()
                flush()
                in_flush += time.perf_counter() - start
        best_taps, best_flush = min(best_taps, in_taps / calls * 1e6), min(best_flush, in_flush / calls * 1e6)
    return best_taps, best_flush


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
        recorder = getattr(srv.server.metrics, "extensions", {}).get("predictions")
        flush = getattr(recorder, "flush", None)  # None: a tree that counted inside the tap
        for rows in (1, 16, 64):
            logits = rng.normal(scale=4.0, size=(rows, classes)).astype(np.float32)
            batch = ComputedBatch({}, {loaded.handle.head.output: logits}, rows, 0.001)
            in_taps, in_flush = tap_microseconds(taps, batch, args.calls, flush)
            counted = f", counting later {in_flush:6.1f} us per batch" if flush is not None else ""
            print(f"{rows:3d} rows: taps {in_taps:6.1f} us per batch{counted}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
