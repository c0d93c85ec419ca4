"""Where the CPU goes per served request: Kiln (workers 1 and 2) against the bare null server,
and against the CPU time a request may cost to reach 0.9 x L (issue 16's c16 target).

    .venv/bin/python benchmarks/serve_cpu_budget.py --rounds 2         (~4 min; needs `perf`, root)

For each server (benchmarks/null_server.py; `kiln serve --precision fp32 --workers 1` and
`--workers 2` on ResNet-20 of `--repo`), alternated per round: perf_analyzer over gRPC at
`--concurrency` (default 16) and, in the middle of its run, `perf record -a` on the CPUs of the
run (`perf` samples every thread of the box: server, client, idle). Each sample is charged to a
part: ONNX Runtime's library, the server's event loop threads (a process's main thread), its other
threads (batch workers' Python, gRPC's own threads), the client, idle. CPU microseconds per
request = share of samples x CPUs x 1e6 / the run's inferences per second.

The budget line: L = 1/(1/E + 1/N) with E (the engine's batch-16 rate, in process) and N (the null
server's rate) of the same round, so 0.9 x L allows CPUs x 1e6 / (0.9 x L) CPU microseconds per
request, everything included (the client too, as in N). Prints a markdown section and appends it
to benchmarks/RESULTS-serving.md (`--results`).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without install

from benchmarks import serve_bench_lib as lib  # noqa: E402
from benchmarks.serve_throughput import input_data, model_files  # noqa: E402

MODEL = "resnet20"
SERVERS = ("null", "kiln w1", "kiln w2")
PARTS = ("ONNX Runtime", "event loops", "other server threads", "client", "idle", "other")
PERF_AFTER_S, PERF_FOR_S = 4.0, 8.0  # perf_analyzer's windows are running by then, and past it
# perf report --sort pid,comm,dso: "  27.78%    16730:python   python   onnxruntime_pybind11_state...so"
_ROW = re.compile(r"^\s*([\d.]+)%\s+(\d+):\S+\s+(\S+)\s+(\S+)")


def server_tids(pid: int) -> tuple[set[int], set[int]]:
    """(main threads, every thread) of process `pid` and its children (a supervisor's workers)."""
    pids = [pid]
    with contextlib.suppress(OSError):
        children = (Path(f"/proc/{pid}/task/{pid}/children").read_text()).split()
        pids += [int(c) for c in children]
    tids: set[int] = set()
    for p in pids:
        with contextlib.suppress(OSError):
            tids |= {int(t) for t in os.listdir(f"/proc/{p}/task")}
    return set(pids), tids


def charge(report: str, mains: set[int], tids: set[int]) -> dict[str, float]:
    """Share of all samples (0-1) per part, from `perf report --sort pid,comm,dso` text."""
    parts: dict[str, float] = collections.defaultdict(float)
    for line in report.splitlines():
        m = _ROW.match(line)
        if not m:
            continue
        share, tid, comm, dso = float(m[1]) / 100, int(m[2]), m[3], m[4]
        if tid == 0:
            part = "idle"
        elif tid in tids:
            if "onnxruntime" in dso:
                part = "ONNX Runtime"
            else:
                part = "event loops" if tid in mains else "other server threads"
        elif comm.startswith("perf_analyz") or comm.startswith("default-execut"):
            part = "client"
        else:
            part = "other"
        parts[part] += share
    return dict(parts)


def profiled_run(
    pa: list[str], port: int, model: str, proc_pid: int, args: argparse.Namespace, cpus: set[int]
) -> tuple[lib.Measure, dict[str, float]]:
    """perf_analyzer at `args.concurrency`, `perf record` on `cpus` in the middle of it."""
    data = args.work / f"perf-{port}.data"
    threads: dict[str, set[int]] = {}

    def record() -> None:
        threads["mains"], threads["tids"] = server_tids(proc_pid)  # workers are up by now
        cpu_list = ",".join(map(str, sorted(cpus)))
        subprocess.run(["perf", "record", "-q", "-F", "999", "-C", cpu_list, "-o", str(data), "--",
                        "sleep", str(PERF_FOR_S)], capture_output=True, check=True, timeout=120)  # fmt: skip

    timer = threading.Timer(PERF_AFTER_S, record)
    timer.start()
    measure = lib.measure_pa(pa, port, model, args.concurrency, args.work, cpus, window_ms=args.window_ms)
    timer.join()
    report = subprocess.run(
        ["perf", "report", "-i", str(data), "--no-children", "-g", "none", "--sort", "pid,comm,dso",
         "--stdio"], capture_output=True, text=True, check=True, timeout=300,
    ).stdout  # fmt: skip
    data.unlink(missing_ok=True)
    return measure, charge(report, threads["mains"], threads["tids"])


def run(args: argparse.Namespace, cpus: set[int]) -> list[dict]:
    onnx, name, shape, classes = model_files(args.repo, MODEL)
    data = input_data(args.work / f"{MODEL}-input.json", name, shape)
    engine = lib.Engine(onnx, shape, name)
    pa = [str(args.perf_analyzer), "-i", "grpc", "-m", "{model}", "--input-data", str(data),
          "--max-trials", "4", "-s", "20"]  # fmt: skip
    rounds = []
    for _ in range(args.rounds):
        before = engine.measure()
        figures: dict[str, tuple[lib.Measure, dict[str, float]]] = {}
        for server in SERVERS:
            port = lib.free_port()
            if server == "null":
                cmd = [lib.PYTHON, str(ROOT / "benchmarks" / "null_server.py"), "--port", str(port),
                       "--input-shape", ",".join(map(str, shape)), "--classes", str(classes)]  # fmt: skip
            else:
                workers, metrics = server[-1], str(lib.free_port())
                flags = ("--precision", "fp32", "--workers", workers, "--metrics-port", metrics)
                cmd = lib.serve_command(port, "--repo", str(args.repo), "--models", MODEL, *flags)
            log = args.work / f"server-{port}.log"
            with lib.serving_process(cmd, port, log, cpus=cpus) as proc:
                model = "null" if server == "null" else MODEL
                figures[server] = profiled_run(pa, port, model, proc.pid, args, cpus)
            m = figures[server][0]
            print(f"{server}: {m.throughput:.0f} inf/s, parts {figures[server][1]}", flush=True)
        rounds.append({"engine": lib.bracket(before, engine.measure()), "figures": figures})
    return rounds


def render(rounds: list[dict], args: argparse.Namespace, cpus: set[int]) -> str:
    n_cpus = len(cpus)
    where = f"client and servers pinned to CPUs {sorted(cpus)}"
    flags = f"--repo {args.repo} --rounds {args.rounds} --concurrency {args.concurrency}"
    lines = [
        *lib.section_head("CPU per served request", "serve_cpu_budget.py", flags, where, args.perf_analyzer),
        f"- perf_analyzer over gRPC at concurrency {args.concurrency}, {args.window_ms} ms windows; "
        f"`perf record -a -F 999` for {PERF_FOR_S:g} s inside each run. CPU us per request by part "
        "(event loops: each server process's main thread, outside ONNX Runtime; other server "
        "threads: batch workers' Python and kernel time, gRPC's threads)",
        "",
        "| round | server | conns per process | inf/s | "
        + " | ".join(PARTS)
        + " | total busy | budget at 0.9 x L |",
        "|---|---|---|---|" + "---|" * len(PARTS) + "---|---|",
    ]
    for i, rnd in enumerate(rounds, 1):
        e, null = rnd["engine"]["E"], rnd["figures"]["null"][0].throughput
        limit = 1 / (1 / e + 1 / null)
        budget = n_cpus * 1e6 / (0.9 * limit)
        for server, (m, parts) in rnd["figures"].items():
            per = {p: parts.get(p, 0.0) * n_cpus * 1e6 / m.throughput for p in PARTS}
            busy = sum(v for p, v in per.items() if p != "idle")
            cells = " | ".join(f"{per[p]:.0f}" for p in PARTS)
            head = f"| {i} | {server} | {m.connections} | {m.throughput:,.0f}"
            lines.append(f"{head} | {cells} | {busy:.0f} | {budget:.0f} |")
        blank = "| " * len(PARTS)
        lines.append(f"| {i} | E {e:,.0f} img/s, N {null:,.0f}, L {limit:,.0f} | | | {blank}| |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = lib.bench_parser(__doc__, "cpu-budget")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--window-ms", type=int, default=5000)
    p.add_argument("--cpus", type=str, default=None, help="comma-separated CPU ids (default: all usable)")
    args = p.parse_args(argv)
    if shutil.which("perf") is None:
        print("needs Linux `perf` (and the rights to sample every CPU: root or perf_event_paranoid <= 0)",
              file=sys.stderr)  # fmt: skip
        return 2
    if not lib.has_model(args.repo, MODEL):
        return 2
    cpus = lib.pin_to(args.cpus)
    args.work.mkdir(parents=True, exist_ok=True)
    rounds = run(args, cpus)
    lib.report(render(rounds, args, cpus), args.results, append=not args.no_append)
    return 0


if __name__ == "__main__":
    sys.exit(main())
