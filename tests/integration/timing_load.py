"""A closed-loop load generator for the timing-backend tests, run as its own process so its GIL
never competes with the server's (as a real client's does not):

    python -m tests.integration.timing_load ADDRESS MODEL --concurrency 8 --rows 4 --seconds 2

`concurrency` threads each send one KilnClient.infer at a time. After `warmup` seconds it prints
"start", after `seconds` more "end" (the test samples the backend's busy counters at each), keeps
the load on for `cooldown` seconds so the window ends under load too, then prints one JSON line:
client-side latencies (seconds) of the requests that started inside the window and the number
that completed inside it.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time

import numpy as np

from serving.clients.client import KilnClient


def _worker(
    client: KilnClient, model: str, batch: np.ndarray, window: list[float], stop: threading.Event,
    latencies: list[float], completed: list[int],
) -> None:  # fmt: skip
    while not stop.is_set():
        begin = time.perf_counter()
        client.infer(model, {"input": batch})
        end = time.perf_counter()
        if window[0] <= begin and end <= window[1]:
            latencies.append(end - begin)  # list.append is atomic under the GIL
        if window[0] <= end <= window[1]:
            completed.append(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("address")
    parser.add_argument("model")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--shape", default="3,8,8", help="non-batch input dims")
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--cooldown", type=float, default=0.3)
    args = parser.parse_args(argv)
    dims = tuple(int(d) for d in args.shape.split(","))
    batch = np.zeros((args.rows, *dims), np.float32)
    window = [float("inf"), float("inf")]
    stop, latencies, completed = threading.Event(), [], []
    with KilnClient(args.address) as client:
        threads = [
            threading.Thread(
                target=_worker, args=(client, args.model, batch, window, stop, latencies, completed)
            )
            for _ in range(args.concurrency)
        ]
        for thread in threads:
            thread.start()
        time.sleep(args.warmup)
        window[:] = [time.perf_counter(), float("inf")]
        print("start", flush=True)
        time.sleep(args.seconds)
        window[1] = time.perf_counter()
        print("end", flush=True)
        time.sleep(args.cooldown)
        stop.set()
        for thread in threads:
            thread.join()
    seconds = window[1] - window[0]
    print(json.dumps({"latencies": latencies, "completed": len(completed), "seconds": seconds}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
