"""Two `kiln serve` trees under the same perf_analyzer load, alternating, with their CPU per request.

    git worktree add /tmp/old 515c114
    .venv/bin/python benchmarks/serve_ab.py --old-tree /tmp/old --old-repo R_OLD --new-repo R_NEW \\
        --concurrency 16,64 --rounds 3

One fair comparison on a shared box needs both servers measured within minutes of each other:
each round starts the old tree's server, measures every concurrency, stops it, then does the same
with this tree's (`--new-first` swaps the order). Per point: perf_analyzer's throughput and p99
(`-p 4000 --max-trials 4`, `--input-data` of real values), the server's CPU seconds per answered
request (every thread's utime+stime from /proc over the window, divided by the growth of
`kiln_requests_total`) and its rows per batch (ModelStatistics). Each tree serves a repository its
own `kiln export` wrote (`--old-repo`, `--new-repo`): kiln.json's format changes between commits.
Prints one line per point and the means; appends nothing.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without install

from benchmarks import serve_bench_lib as lib  # noqa: E402
from benchmarks.serve_throughput import input_data, model_files  # noqa: E402

MODEL = "resnet20"


def server_cpu_seconds(pid: int) -> float:
    """utime + stime of every thread of `pid` so far."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def answered(metrics_port: int) -> float:
    """kiln_requests_total summed over its labels."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("kiln_requests_total{")
    )


def rows_and_batches(port: int) -> tuple[int, int]:
    """ModelStatistics' inference (rows) and execution (batches) counts of MODEL."""
    import tritonclient.grpc as triton

    stats = triton.InferenceServerClient(f"127.0.0.1:{port}").get_inference_statistics(MODEL).model_stats[0]
    return stats.inference_count, stats.execution_count


def measure(port: int, metrics_port: int, pid: int, c: int, data: Path, pa: Path, work: Path) -> dict:
    """One perf_analyzer point with the server's CPU per request and rows per batch over it."""
    out = work / f"pa-{port}-c{c}.csv"
    before = (server_cpu_seconds(pid), answered(metrics_port), rows_and_batches(port))
    subprocess.run(
        [str(pa), "-i", "grpc", "-m", MODEL, "--input-data", str(data), "-u", f"127.0.0.1:{port}",
         "--concurrency-range", str(c), "-p", "4000", "--max-trials", "4", "-s", "999", "-f", str(out)],
        check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    after = (server_cpu_seconds(pid), answered(metrics_port), rows_and_batches(port))
    row = next(csv.DictReader(out.open()))
    requests = after[1] - before[1]
    batches = after[2][1] - before[2][1]
    return {
        "throughput": float(row["Inferences/Second"]),
        "p99_ms": float(row["p99 latency"]) / 1000,
        "cpu_us": 1e6 * (after[0] - before[0]) / max(requests, 1),
        "rows_per_batch": (after[2][0] - before[2][0]) / max(batches, 1),
        "load": lib.load_average(),
    }


def run_tree(
    name: str, tree: Path, repo: Path, flags: list[str], args: argparse.Namespace, data: Path
) -> dict:
    """Start `tree`'s server on `repo`, measure every concurrency, stop it."""
    port, metrics_port = lib.free_port(), lib.free_port()
    cmd = lib.serve_command(port, "--repo", str(repo), "--models", MODEL, "--metrics-port", str(metrics_port),
                            "--precision", "fp32", *flags)  # fmt: skip
    results = {}
    with lib.serving_process(cmd, port, args.work / f"{name}.log", cwd=tree) as proc:
        for c in args.concurrency:
            results[c] = point = measure(port, metrics_port, proc.pid, c, data, args.perf_analyzer, args.work)
            print(
                f"{name:4s} c{c:<3d} {point['throughput']:8.1f} inf/s  p99 {point['p99_ms']:6.2f} ms  "
                f"{point['cpu_us']:6.0f} CPU us/request  {point['rows_per_batch']:4.1f} rows/batch  "
                f"load {point['load']}",
                flush=True,
            )
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--old-tree", type=Path, required=True, help="another checkout (a git worktree)")
    p.add_argument("--old-repo", type=Path, required=True, help="a repository the old tree's export wrote")
    p.add_argument("--new-repo", type=Path, required=True, help="a repository this tree's export wrote")
    p.add_argument("--concurrency", type=lambda s: [int(c) for c in s.split(",")], default=[16, 64])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--new-first", action="store_true", help="measure this tree first in each round")
    p.add_argument("--new-flags", default="--workers 1", help="extra flags for this tree's server")
    p.add_argument("--perf-analyzer", type=Path, default=lib.DEFAULT_PA)
    p.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "out" / "serve-ab")
    args = p.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    _, input_name, shape, _ = model_files(args.new_repo, MODEL)
    data = input_data(args.work / "input.json", input_name, shape)
    trees = [("old", args.old_tree, args.old_repo, []), ("new", ROOT, args.new_repo, args.new_flags.split())]
    if args.new_first:
        trees.reverse()
    print(lib.cpu_summary())
    runs: dict[str, list[dict]] = {"old": [], "new": []}
    for _ in range(args.rounds):
        for name, tree, repo, flags in trees:
            runs[name].append(run_tree(name, tree, repo, flags, args, data))
    for c in args.concurrency:
        old, new = (statistics.mean(r[c]["throughput"] for r in runs[n]) for n in ("old", "new"))
        print(f"c{c}: old {old:.1f}, new {new:.1f} inf/s (mean of {args.rounds}): new/old {new / old:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
