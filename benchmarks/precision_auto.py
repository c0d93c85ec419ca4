"""`precision: auto` vs FP32, served, and the latency-target batcher vs fixed queue delays.

    .venv/bin/python -m benchmarks.precision_auto [--models resnet20,resnet50] [--concurrency 1,16,64]

For each model: `kiln train` (1 epoch; ResNet-20 on the bundled digits, ResNet-50 224² on 256
synthetic images) and `kiln export --precision fp32,int8` through the parity gate, then two
`kiln serve` processes, `--precision fp32` and `--precision auto`, each measured with
perf_analyzer over gRPC (throughput, p50, p99) at every concurrency; the INT8 accuracy delta is
read from kiln.json (the gate's own figure). Then ResNet-20 at a 10 ms target: the latency-target
batcher vs fixed `max_queue_delay_us` of 0, 2 and 5 ms, p99 at every concurrency. Everything runs
on the same cores (the server and perf_analyzer share them), one run; appends a section to
benchmarks/RESULTS-tuning.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

from benchmarks.serve_bench_lib import (
    DEFAULT_PA,
    PYTHON,
    ROOT,
    Measure,
    cpu_summary,
    free_port,
    load_average,
    measure_pa,
    running,
    serve_command,
)
from benchmarks.serve_throughput import input_data, model_files

RECIPES = {
    "resnet20": ["--model", "resnet20", "--data", "digits", "--image-size", "32", "--epochs", "1"],
    "resnet50": ["--model", "resnet50", "--data", "synthetic", "--channels", "3", "--image-size", "224",
                 "--num-samples", "256", "--num-classes", "10", "--epochs", "1", "--batch-size", "32"],
}  # fmt: skip


def prepare(name: str, repo: Path, work: Path) -> list[str]:
    """Train one epoch and export FP32 + INT8 through the gate (skipped when already there)."""
    if (repo / name).is_dir():
        return []
    runs = work / "runs"
    cmds = [
        [PYTHON, "-m", "serving.dispatch", "train", *RECIPES[name], "--runs-dir", str(runs), "--name", name,
         "--no-progress"],
        [PYTHON, "-m", "serving.dispatch", "export", str(runs / name), "--repo", str(repo), "--name", name,
         "--precision", "fp32,int8", "--max-batch", "64", "--fp32-input"],
    ]  # fmt: skip
    for cmd in cmds:
        subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=3600)
    return [" ".join(c) for c in cmds]


def accuracy_delta(repo: Path, name: str) -> str:
    """INT8 vs FP32 accuracy on the held-out split, as the gate measured it (kiln.json)."""
    version = max((p for p in (repo / name).iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    arts = {
        a["precision"]: a.get("parity") or {}
        for a in json.loads((version / "kiln.json").read_text())["artefacts"]
    }
    fp32, int8 = arts.get("fp32", {}).get("accuracy"), arts.get("int8", {}).get("accuracy")
    if fp32 is None or int8 is None:
        return "not recorded"
    return f"FP32 {fp32:.2%}, INT8 {int8:.2%} ({(int8 - fp32) * 100:+.2f} points)"


def serve_cmd(repo: Path, name: str, port: int, *extra: str) -> list[str]:
    return serve_command(
        port, "--repo", str(repo), "--models", name, "--metrics-port", str(free_port()), *extra
    )


def sweep(args: argparse.Namespace, name: str, modes: dict[str, list[str]], cpus: set[int]) -> dict:
    """perf_analyzer at every concurrency against one server per mode."""
    _, input_name, shape, _ = model_files(args.repo, name)
    data = input_data(args.work / f"{name}-input.json", input_name, shape)
    pa = [str(args.perf_analyzer), "-i", "grpc", "-m", "{model}", "--input-data", str(data),
          "--max-trials", "6", "-s", "20"]  # fmt: skip
    out: dict[str, dict[int, Measure]] = {}
    for mode, extra in modes.items():
        port = free_port()
        with running(serve_cmd(args.repo, name, port, *extra), port, None, args.work):  # type: ignore[arg-type]
            out[mode] = {
                c: measure_pa(pa, port, name, c, args.work, None, window_ms=args.measurement_ms)  # type: ignore[arg-type]
                for c in args.concurrency
            }
    return out


def render(args: argparse.Namespace, results: dict, prepared: list[str], cpus: set[int]) -> str:
    lines = [
        f"## {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC: precision auto and the latency target",
        "",
        f"- Machine: {cpu_summary()}; server and perf_analyzer on CPUs {sorted(cpus)}; "
        f"load average at the end {load_average()}.",
        f"- Command: `.venv/bin/python -m benchmarks.precision_auto --models {','.join(args.models)} "
        f"--concurrency {','.join(map(str, args.concurrency))}`; models prepared by: "
        + ("; ".join(f"`{c}`" for c in prepared) or "(already in the repository)"),
        "",
        "| model | mode | c | inf/s | p50 ms | p99 ms | vs fp32 |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, res in results.items():
        for mode, rows in res["sweep"].items():
            for c, m in rows.items():
                base = res["sweep"].get("fp32", {}).get(c)
                ratio = f"{m.throughput / base.throughput:.2f}x" if base and mode != "fp32" else ""
                figures = f"{m.throughput:,.0f} | {m.p50_ms:.2f} | {m.p99_ms:.2f}"
                lines.append(f"| {name} | {mode} | {c} | {figures} | {ratio} |")
        lines.append(f"| {name} | accuracy (gate) | | {res['accuracy']} | | | |")
    if "latency" in results.get("resnet20", {}):
        lines += ["", "Latency target 10 ms vs fixed delays (ResNet-20, auto precision): p99 ms / inf/s", "",
                  "| batching | " + " | ".join(f"c={c}" for c in args.concurrency) + " |",
                  "|---|" + "---|" * len(args.concurrency)]  # fmt: skip
        for mode, rows in results["resnet20"]["latency"].items():
            cells = [f"{rows[c].p99_ms:.1f} / {rows[c].throughput:,.0f}" for c in args.concurrency]
            lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet20,resnet50")
    p.add_argument("--concurrency", default="1,16,64")
    p.add_argument("--repo", type=Path, default=ROOT / "benchmarks" / "out" / "tuning-repo")
    p.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "out" / "tuning-work")
    p.add_argument(
        "--perf-analyzer", type=Path, default=Path(os.environ.get("KILN_PERF_ANALYZER", DEFAULT_PA))
    )
    p.add_argument("--measurement-ms", type=int, default=3000)
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "RESULTS-tuning.md")
    args = p.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    cpus = os.sched_getaffinity(0)  # every process may use all of them: no pinning (see _pin)
    args.work.mkdir(parents=True, exist_ok=True)
    prepared = [c for m in args.models for c in prepare(m, args.repo, args.work)]
    results: dict = {}
    for name in args.models:
        modes = {"fp32": ["--precision", "fp32"], "auto": ["--precision", "auto"]}
        results[name] = {"sweep": sweep(args, name, modes, cpus), "accuracy": accuracy_delta(args.repo, name)}
    if "resnet20" in args.models:
        fixed = {f"fixed {us // 1000} ms": ["--max-queue-delay-us", str(us)] for us in (0, 2000, 5000)}
        modes = {"target 10 ms": ["--latency-target-ms", "10"], **fixed}
        with contextlib.suppress(KeyError):
            results["resnet20"]["latency"] = sweep(args, "resnet20", modes, cpus)
    section = render(args, results, prepared, cpus)
    print(section)
    with args.results.open("a", encoding="utf-8") as out:
        out.write("\n" + section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
