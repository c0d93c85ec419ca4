"""Long fuzz run against a live Kiln server: >= 10,000 hostile requests, counted per status.

    .venv/bin/python -m benchmarks.fuzz_run                      # 10,000 cases, 4 client threads
    .venv/bin/python -m benchmarks.fuzz_run --cases 2000 --seed 7 --concurrency 1

The server runs in this process on 127.0.0.1 (tests.fuzz.harness.fuzz_config: tight limits so
every one is reachable) with the tiny test classifier. Cases come from the same hypothesis
strategies as tests/integration/test_fuzz_server.py, here with a random (printed) seed and
several client threads at once, so races between hostile and valid requests get a chance too.
The run prints requests per status, crashes (a status outside the deliberate set, a lost stream
answer, an ERROR in the server log) and hangs (no answer before the deadline), then checks the
server still serves correct answers. Exit status 1 if anything went wrong.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed

from benchmarks.machine import describe_cpu
from tests.fuzz.harness import MAX_IMAGE_BYTES, Tally, fuzz_config, health_problem, send, watching_errors
from tests.fuzz.strategies import Case, cases
from tests.integration.server_fixtures import publish_tiny_model, running_server


def run(address: str, n_cases: int, seed: int, concurrency: int, timeout: float) -> Tally:
    """Send `n_cases` drawn cases from `concurrency` threads; returns the tally."""
    tally, lock = Tally(), threading.Lock()
    slots = threading.Semaphore(concurrency * 2)
    channels = [grpc.insecure_channel(address) for _ in range(concurrency)]
    pool = ThreadPoolExecutor(concurrency)
    counter = iter(range(10**9))

    def one(case: Case, channel: grpc.Channel) -> None:
        try:
            outcome = send(channel, case, timeout)
            with lock:
                tally.add(case, outcome)
        finally:
            slots.release()

    @settings(
        max_examples=n_cases,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=cases(MAX_IMAGE_BYTES))
    def draw(case: Case) -> None:
        slots.acquire()
        pool.submit(one, case, channels[next(counter) % concurrency])

    hypothesis_seed(seed)(draw)()
    pool.shutdown(wait=True)
    for channel in channels:
        channel.close()
    return tally


def main(argv: list[str] | None = None) -> int:
    """Run the fuzz and print the figures; 0 when no crash, no hang and the server is healthy."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--cases", type=int, default=10_000, help="fuzz cases (streams carry several requests)"
    )
    parser.add_argument("--seed", type=int, default=None, help="hypothesis seed (default: random, printed)")
    parser.add_argument("--concurrency", type=int, default=4, help="client threads")
    parser.add_argument("--timeout", type=float, default=20.0, help="per-call deadline, seconds")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp)
        version_dir = publish_tiny_model(repo, max_batch_size=4)
        with watching_errors() as errors, running_server(fuzz_config(repo)) as srv:
            start = time.monotonic()
            tally = run(srv.address, args.cases, seed, args.concurrency, args.timeout)
            seconds = time.monotonic() - start
            after = health_problem(srv.address, version_dir / "model.onnx")
            manager = srv.server.manager.get("tiny")
            leftovers = manager.batcher.queue_depth + manager.batcher.inflight
            logged = errors.take()
    print(f"machine: {describe_cpu()}; load average {Path('/proc/loadavg').read_text().split()[0]}")
    print(f"seed {seed}: {tally.cases} cases, {tally.requests} requests in {seconds:.1f} s "
          f"({args.concurrency} client threads), slowest answer {tally.slowest:.2f} s")  # fmt: skip
    for status, count in tally.statuses.most_common():
        print(f"  {status:<20} {count:>7}")
    print(f"crashes {tally.crashes}, hangs {tally.hangs}, server ERROR log records {len(logged)}, "
          f"queued/in-flight left {leftovers}, healthy after: {after is None}")  # fmt: skip
    for case, problem in tally.problems:
        print(f"  PROBLEM {problem} <- {case.method} {case.note} {[m[:80] for m in case.messages]}")
    for line in logged[:10]:
        print(f"  LOG {line}")
    if after is not None:
        print(f"  AFTER {after}")
    ok = tally.crashes == tally.hangs == leftovers == 0 and not logged and after is None
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
