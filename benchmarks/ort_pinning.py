"""ONNX Runtime's threads pinned (`pin_ort_threads`, default on) or not: a lone client's latency.

    .venv/bin/python benchmarks/ort_pinning.py --repo benchmarks/out/tuning-repo    (~8 min)

1. In process: Kiln's ONNX Runtime backend on the ResNet-20 FP32 file of `--repo`, as `kiln serve`
   builds it (2 threads, the spinning twin for lone rows where "auto" keeps it), runs one row after
   the process slept G ms, for G in `GAPS_MS`; p50 / mean / p99 per G, pinned and not, alternated.
2. Served: `kiln serve --precision fp32 --workers 1` with `--pin-ort-threads` and with
   `--no-pin-ort-threads`, alternated for `--rounds`, under perf_analyzer over gRPC: open loops at
   100, 200 and 500 requests a second (`--request-rate-range`: a client that pauses between
   requests, as most do), and closed loops of 1, 16 and 64 clients.
Client and server share `--cpus` (default: every CPU this process may use). Prints a markdown
section and appends it to benchmarks/RESULTS-serving.md (`--results`).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without install

from benchmarks import serve_bench_lib as lib  # noqa: E402
from benchmarks.serve_throughput import input_data, model_files  # noqa: E402

MODEL = "resnet20"
GAPS_MS = (0.0, 0.3, 1.0, 2.0, 5.0)
RUNS = 600  # rows per gap and setting
LOADS = (("rate", 100), ("rate", 200), ("rate", 500), ("c", 1), ("c", 16), ("c", 64))
SETTINGS = {"pinned": "--pin-ort-threads", "not pinned": "--no-pin-ort-threads"}


def in_process(repo: Path) -> dict[str, dict[float, tuple[float, float, float]]]:
    """{setting: {gap ms: (p50, mean, p99) in us}} of a lone row after each idle gap."""
    from serving.runtime.backends.base import BackendOptions
    from serving.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend

    onnx, name, shape, _ = model_files(repo, MODEL)
    row = {name: np.random.default_rng(0).standard_normal((1, *shape)).astype(np.float32)}
    backends = {
        label: OnnxRuntimeBackend(onnx, max_batch_size=64, options=BackendOptions(pin_threads=pin))
        for label, pin in (("pinned", True), ("not pinned", False))
    }
    times: dict[str, dict[float, list[float]]] = {k: {g: [] for g in GAPS_MS} for k in backends}
    for backend in backends.values():
        for _ in range(50):
            backend.infer(row)
    for gap in GAPS_MS:
        for _ in range(RUNS // 50):  # alternate in rounds: drift hits both alike
            for label, backend in backends.items():
                for _ in range(50):
                    if gap:
                        time.sleep(gap / 1e3)
                    start = time.perf_counter()
                    backend.infer(row)
                    times[label][gap].append(time.perf_counter() - start)
    for backend in backends.values():
        backend.close()
    return {
        label: {
            g: (float(np.percentile(t, 50)) * 1e6, float(np.mean(t)) * 1e6, float(np.percentile(t, 99)) * 1e6)
            for g, t in gaps.items()
        }
        for label, gaps in times.items()
    }


Served = dict[str, dict[tuple[str, int], list[lib.Measure]]]  # setting -> load -> one per round


def served(args: argparse.Namespace, cpus: set[int]) -> Served:
    """{setting: {load: one Measure per round}}, the settings alternated within each round."""
    _, name, shape, _ = model_files(args.repo, MODEL)
    data = input_data(args.work / f"{MODEL}-input.json", name, shape)
    pa = [str(args.perf_analyzer), "-i", "grpc", "-m", "{model}", "--input-data", str(data),
          "--max-trials", "4", "-s", "10"]  # fmt: skip
    out: Served = {k: {load: [] for load in LOADS} for k in SETTINGS}
    for _ in range(args.rounds):
        for label, flag in SETTINGS.items():
            port = lib.free_port()
            cmd = lib.serve_command(port, "--repo", str(args.repo), "--models", MODEL, "--precision", "fp32",
                                "--workers", "1", "--metrics-port", str(lib.free_port()), flag)  # fmt: skip
            with lib.running(cmd, port, cpus, args.work):
                for kind, value in LOADS:
                    rate = value if kind == "rate" else None
                    measure = lib.measure_pa(
                        pa, port, MODEL, value, args.work, cpus, window_ms=4000, request_rate=rate
                    )
                    out[label][(kind, value)].append(measure)
                    print(f"{label:10s} {kind}{value}: {measure.throughput:.0f} inf/s p50 "
                          f"{measure.p50_ms:.2f} p99 {measure.p99_ms:.2f} ms", flush=True)  # fmt: skip
    return out


def render(gaps: dict, serve: dict, args: argparse.Namespace, cpus: set[int]) -> str:
    where = f"client and server pinned to CPUs {sorted(cpus)}"
    flags = f"--repo {args.repo} --rounds {args.rounds}"
    lines = [
        *lib.section_head(
            "ONNX Runtime threads pinned or not", "ort_pinning.py", flags, where, args.perf_analyzer
        ),
        *lib.table_head(
            f"In process, a lone ResNet-20 row on Kiln's ORT backend after the process slept G ms ({RUNS} "
            "rows per cell, alternated; p50 / mean / p99 us):",
            ["G (ms)", *gaps],
        ),
    ]
    for gap in GAPS_MS:
        cells = [" / ".join(f"{v:.0f}" for v in gaps[label][gap]) for label in gaps]
        lines.append(f"| {gap:g} | " + " | ".join(cells) + " |")
    lines += lib.table_head(
        "Served (`kiln serve --precision fp32 --workers 1`), perf_analyzer over gRPC, 4 s windows; "
        "per round: inf/s, p50 / p99 ms:",
        ["load", *serve],
    )
    for kind, value in LOADS:
        load = f"{value} requests/s" if kind == "rate" else f"concurrency {value}"
        cells = [
            "; ".join(
                f"{m.throughput:,.0f}, {m.p50_ms:.2f} / {m.p99_ms:.2f}" for m in serve[label][(kind, value)]
            )
            for label in serve
        ]
        lines.append(f"| {load} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = lib.bench_parser(__doc__, "ort-pinning")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--cpus", type=str, default=None, help="comma-separated CPU ids (default: all usable)")
    args = p.parse_args(argv)
    cpus = lib.pin_to(args.cpus)
    args.work.mkdir(parents=True, exist_ok=True)
    if not lib.has_model(args.repo, MODEL):
        return 2
    gaps = in_process(args.repo)
    serve = served(args, cpus)
    lib.report(render(gaps, serve, args, cpus), args.results, append=not args.no_append)
    return 0


if __name__ == "__main__":
    sys.exit(main())
