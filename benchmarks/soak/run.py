"""Soak: `kiln serve` under steady perf_analyzer load for a long time; is anything creeping?

    .venv/bin/python -m benchmarks.soak.run                          # 10 min, tiny model, 200 req/s
    .venv/bin/python -m benchmarks.soak.run --duration 60 --warmup 10 # a quick look
    .venv/bin/python -m benchmarks.soak.run --repo benchmarks/out/serve-repo --model resnet20

The server runs as a child process (`python -m serving.dispatch serve`, metrics on a free port).
perf_analyzer (`.tools-venv/bin/kiln-perf-analyzer`, or $KILN_PERF_ANALYZER) sends a fixed
request rate (or a fixed concurrency) of real inputs (benchmarks/soak/inputs.py) for the whole
duration in three equal windows. Every --interval seconds the server's RSS, open fds, threads,
queue depth and request counts by status are written to <out>.csv (benchmarks/soak/sampler.py).
At the end: RSS growth from the end of the warm-up to the end of the run (target < 5 %), its
trend in MiB per hour, and errors (failed requests, perf_analyzer failure, ERROR lines in the
server log; target 0), printed as a table row and saved to <out>.json. Exit status 1 if a target
is missed.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.machine import describe_cpu
from benchmarks.soak.inputs import write_input_data
from benchmarks.soak.sampler import Sample, sample

ROOT = Path(__file__).resolve().parents[2]
PERF_ANALYZER = ROOT / ".tools-venv" / "bin" / "kiln-perf-analyzer"


class ServerProcess:
    """`kiln serve` in a child process; learns its ports from the JSON log, counts ERROR lines."""

    def __init__(self, repo: Path, extra: list[str]) -> None:
        cmd = [sys.executable, "-m", "serving.dispatch", "serve", "--repo", str(repo), "--host", "127.0.0.1",
               "--port", "0", "--metrics-port", "0", "--log-format", "json", *extra]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
        self.errors: list[str] = []
        self.grpc_port, self.metrics_port = self._wait_listening()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _note(self, line: str) -> dict[str, object]:
        record = json.loads(line)
        if record.get("level") in ("error", "critical"):
            self.errors.append(str(record.get("msg"))[:300])
        return record

    def _wait_listening(self) -> tuple[int, int]:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            record = self._note(line)
            if "grpc_port" in record:
                return int(record["grpc_port"]), int(record["metrics_port"])  # type: ignore[arg-type]
        raise RuntimeError(f"kiln serve exited with {self.proc.wait()} before listening: {self.errors}")

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._note(line)

    def stop(self) -> int:
        """SIGTERM (graceful drain), then the exit code."""
        self.proc.terminate()
        code = self.proc.wait(timeout=60)
        self._reader.join(10)
        return code


def perf_command(args: argparse.Namespace, address: str, model: str, data: Path) -> list[str]:
    """perf_analyzer for `args.duration` seconds: three windows, the stability check disabled."""
    window_ms = max(1000, int(args.duration * 1000 / 3))
    load = (
        ["--request-rate-range", f"{args.rate}:{args.rate}:1"]
        if args.rate > 0
        else ["--concurrency-range", f"{args.concurrency}:{args.concurrency}:1"]
    )
    return [str(args.perf_analyzer), "-i", "grpc", "-u", address, "-m", model, "-b", "1", *load,
            "--input-data", str(data), "--measurement-mode", "time_windows", "-p", str(window_ms),
            "--max-trials", "3", "--stability-percentage", "999"]  # fmt: skip


def summarize(samples: list[Sample], warmup: float, errors: int) -> dict[str, float]:
    """RSS growth after warm-up (%, and trend in MiB/h), fd/thread drift, requests and errors."""
    after = [s for s in samples if s.t_s >= warmup] or samples[-1:]
    first, last = after[0], after[-1]
    hours = max(last.t_s - first.t_s, 1e-9) / 3600
    mean_t = sum(s.t_s for s in after) / len(after)
    mean_r = sum(s.rss_mib for s in after) / len(after)
    var_t = sum((s.t_s - mean_t) ** 2 for s in after) or 1e-9
    slope_per_s = sum((s.t_s - mean_t) * (s.rss_mib - mean_r) for s in after) / var_t
    return {
        "rss_warm_mib": first.rss_mib,
        "rss_end_mib": last.rss_mib,
        "rss_max_mib": max(s.rss_mib for s in after),
        "rss_growth_pct": 100 * (last.rss_mib - first.rss_mib) / first.rss_mib,
        "rss_trend_mib_per_h": slope_per_s * 3600 if hours > 0 else 0.0,
        "fds_warm": first.fds,
        "fds_end": last.fds,
        "threads_warm": first.threads,
        "threads_end": last.threads,
        "queue_depth_max": max(s.queue_depth for s in samples),
        "requests_ok": last.requests_ok,
        "requests_error": last.requests_error,
        "errors": errors,
        "load_avg_mean": sum(s.load_avg_1m for s in samples) / len(samples),
    }


def drive(
    args: argparse.Namespace, server: ServerProcess, cmd: list[str], out: Path
) -> tuple[list[Sample], int]:
    """Run perf_analyzer (`cmd`) to its end, sampling the server into <out>.csv meanwhile."""
    samples: list[Sample] = []
    started = time.monotonic()
    with (
        open(out.with_suffix(".perf.txt"), "w") as perf_out,
        open(out.with_suffix(".csv"), "w", newline="") as f,
    ):
        perf = subprocess.Popen(cmd, stdout=perf_out, stderr=subprocess.STDOUT)
        writer = csv.DictWriter(f, fieldnames=list(Sample.__dataclass_fields__))
        writer.writeheader()
        # perf_analyzer may run past its three windows (a 600 s run took 717 s): allow for it
        while perf.poll() is None and time.monotonic() - started < args.duration * 1.5 + 120:
            samples.append(sample(server.proc.pid, server.metrics_port, time.monotonic() - started))
            writer.writerow(samples[-1].row())
            f.flush()
            time.sleep(args.interval)
        if perf.poll() is None:
            perf.kill()
        samples.append(sample(server.proc.pid, server.metrics_port, time.monotonic() - started))  # the end
        writer.writerow(samples[-1].row())
        return samples, perf.wait()


def soak(args: argparse.Namespace, repo: Path, model: str) -> dict[str, object]:
    """Run one soak; returns the summary (also written to <out>.json, samples to <out>.csv)."""
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    data = Path(tempfile.gettempdir()) / f"kiln-soak-input-{os.getpid()}.json"  # ~2 MB: not in results
    versions = sorted((repo / model).iterdir(), key=lambda p: int(p.name) if p.name.isdigit() else -1)
    described = write_input_data(versions[-1], data)
    server = ServerProcess(repo, args.server_flag)
    try:
        cmd = perf_command(args, f"127.0.0.1:{server.grpc_port}", model, data)
        samples, perf_code = drive(args, server, cmd, out)
    finally:
        exit_code = server.stop()
        data.unlink(missing_ok=True)
    perf_text = out.with_suffix(".perf.txt").read_text()
    errors = (perf_code != 0) + len(server.errors) + (exit_code != 0)  # failed requests counted apart
    summary: dict[str, object] = {
        "machine": describe_cpu(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "duration_s": round(samples[-1].t_s if samples else 0.0, 1),
        "warmup_s": args.warmup,
        "load": f"{args.rate} req/s" if args.rate > 0 else f"concurrency {args.concurrency}",
        "inputs": described,
        **{k: round(v, 3) for k, v in summarize(samples, args.warmup, errors).items()},
        "perf_analyzer_exit": perf_code,
        "server_exit": exit_code,
        "server_error_lines": server.errors[:10],
        "perf_summary": [line.strip() for line in perf_text.splitlines() if "throughput" in line.lower()][
            -3:
        ],
    }
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _tiny_repo(tmp: Path) -> tuple[Path, str]:
    from tests.integration.server_fixtures import publish_tiny_model

    publish_tiny_model(tmp, "tiny", max_batch_size=8)
    return tmp, "tiny"


TABLE_HEADER = (
    "| date | machine | model | load | duration | RSS after warm-up -> end (MiB) | growth | trend "
    "| fds | threads | requests OK | errors |\n|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def table_row(summary: dict[str, object], model: str) -> str:
    """One markdown row for the results table."""
    s = summary
    cells = [
        s["date"], s["machine"], model, s["load"], f"{s['duration_s']} s",
        f"{s['rss_warm_mib']:.1f} -> {s['rss_end_mib']:.1f}", f"{s['rss_growth_pct']:+.2f} %",
        f"{s['rss_trend_mib_per_h']:+.1f} MiB/h", f"{s['fds_warm']} -> {s['fds_end']}",
        f"{s['threads_warm']} -> {s['threads_end']}", int(s["requests_ok"]),  # type: ignore[call-overload]
        int(s["requests_error"]) + int(s["errors"]),  # type: ignore[call-overload]
    ]  # fmt: skip
    return "| " + " | ".join(str(c) for c in cells) + " |"


def main(argv: list[str] | None = None) -> int:
    """Parse flags, run the soak, print the table row; 0 when both targets are met."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of load (default 600)")
    parser.add_argument("--warmup", type=float, default=60.0, help="seconds before the RSS baseline")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between samples")
    parser.add_argument("--rate", type=int, default=200, help="requests/s (0: use --concurrency)")
    parser.add_argument("--concurrency", type=int, default=2, help="closed-loop clients when --rate 0")
    parser.add_argument("--repo", type=Path, help="model repository (default: the tiny test model)")
    parser.add_argument("--model", help="model to load (default: the tiny test model)")
    parser.add_argument("--server-flag", action="append", default=[], help="extra `kiln serve` flag")
    parser.add_argument(
        "--perf-analyzer", type=Path, default=Path(os.environ.get("KILN_PERF_ANALYZER", PERF_ANALYZER))
    )
    parser.add_argument(
        "--out", default=str(ROOT / "benchmarks" / "out" / "soak" / "soak"), help="output prefix"
    )
    args = parser.parse_args(argv)
    if not args.perf_analyzer.is_file():
        print(f"soak: perf_analyzer not found at {args.perf_analyzer} (run `make tools`)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        repo, model = (args.repo, args.model) if args.repo else _tiny_repo(Path(tmp))
        if model is None:
            print("soak: --model is required with --repo", file=sys.stderr)
            return 2
        summary = soak(args, repo, model)
    print(json.dumps(summary, indent=2))
    print(TABLE_HEADER)
    print(table_row(summary, model))
    ok = float(summary["rss_growth_pct"]) < 5 and summary["requests_error"] == 0 and summary["errors"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
