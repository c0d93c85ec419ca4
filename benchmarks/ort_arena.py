"""ONNX Runtime's CPU sessions with one memory arena per process (`share_ort_arena`, default on)
or one arena each: resident memory.

    .venv/bin/python benchmarks/ort_arena.py --repo benchmarks/out/tuning-repo     (~4 min)

1. In process, the worst case: Kiln's ORT backend on ResNet-50 FP32 of `--repo`, the sessions a
   worker of several holds (its own on one thread per core of its share, the wide one on every
   core; twins off), each running one batch of `--rows` (default 64, the served maximum); resident
   set after each step, in a fresh process per setting.
2. Served: `kiln serve --precision fp32 --workers 2` with `--share-ort-arena` and with
   `--no-share-ort-arena`, one after the other: each worker's resident set once ready, and after
   perf_analyzer ran at concurrency 64 and then 4 (batches on each worker's own and wide sessions).
Prints a markdown section and appends it to benchmarks/RESULTS-serving.md (`--results`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without install

from benchmarks import serve_bench_lib as lib  # noqa: E402
from benchmarks.serve_throughput import input_data, model_files  # noqa: E402
from benchmarks.soak.sampler import proc_status  # noqa: E402

MODEL = "resnet50"
SETTINGS = {"shared": "--share-ort-arena", "one each": "--no-share-ort-arena"}
LOADS = (64, 4)  # perf_analyzer concurrency, in this order


def rss_mb(pid: int) -> float:
    return proc_status(pid)[0]


def in_process(onnx: Path, rows: int, share: bool) -> list[tuple[str, float]]:
    """Run in a child process (`--child`): [(step, resident MB)] for one setting."""
    import numpy as np

    from serving.runtime.backends.base import BackendOptions
    from serving.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend

    cpus = len(lib.pin_to(None))
    steps = [("start", rss_mb(os.getpid()))]
    sessions = (("own session (half the cores)", max(1, cpus // 2)), ("wide session (every core)", cpus))
    held = []  # both stay loaded, as in a worker
    for label, threads in sessions:
        options = BackendOptions(intra_op_threads=threads, share_arena=share, lone_batch_spinning="off",
                                 single_thread_small_batches="off")  # fmt: skip
        backend = OnnxRuntimeBackend(onnx, max_batch_size=rows, options=options)
        held.append(backend)
        steps.append((f"{label} loaded", rss_mb(os.getpid())))
        spec = backend.inputs[0]
        rng = np.random.default_rng(0)
        backend.infer({spec.name: rng.standard_normal((rows, *spec.shape[1:])).astype(np.float32)})
        steps.append((f"{label} ran {rows} rows", rss_mb(os.getpid())))
    return steps


def served(args: argparse.Namespace, cpus: set[int]) -> dict[str, list[tuple[str, list[float]]]]:
    """{setting: [(step, [resident MB per worker])]}."""
    _, name, shape, _ = model_files(args.repo, MODEL)
    data = input_data(args.work / f"{MODEL}-input.json", name, shape)
    pa = [str(args.perf_analyzer), "-i", "grpc", "-m", "{model}", "--input-data", str(data),
          "--max-trials", "3", "-s", "999"]  # fmt: skip
    out: dict[str, list[tuple[str, list[float]]]] = {}
    for label, flag in SETTINGS.items():
        port = lib.free_port()
        cmd = lib.serve_command(port, "--repo", str(args.repo), "--models", MODEL, "--precision", "fp32",
                                "--workers", "2", "--metrics-port", str(lib.free_port()), flag)  # fmt: skip
        with lib.serving_process(cmd, port, args.work / f"server-{port}.log", cpus=cpus) as proc:
            children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
            workers = [c for c in children if "spawn_main" in Path(f"/proc/{c}/cmdline").read_text()]
            steps = [("ready", [rss_mb(int(w)) for w in workers])]
            for c in LOADS:
                lib.measure_pa(pa, port, MODEL, c, args.work, cpus, window_ms=8000)
                steps.append((f"after concurrency {c}", [rss_mb(int(w)) for w in workers]))
        out[label] = steps
        print(label, steps, flush=True)
    return out


def render(inproc: dict, serve: dict, args: argparse.Namespace, cpus: set[int]) -> str:
    title = "ONNX Runtime's CPU arena shared or one per session"
    flags = f"--repo {args.repo} --rows {args.rows}"
    lines = [
        *lib.section_head(title, "ort_arena.py", flags, f"CPUs {sorted(cpus)}", args.perf_analyzer),
        *lib.table_head(
            f"In process, ResNet-50 FP32, a worker's two sessions each running a batch of {args.rows} "
            "(resident MB):",
            ["step", *inproc],
        ),
    ]
    for i, (step, _) in enumerate(next(iter(inproc.values()))):
        lines.append(f"| {step} | " + " | ".join(f"{inproc[k][i][1]:,.0f}" for k in inproc) + " |")
    lines += lib.table_head(
        "Served, `kiln serve --precision fp32 --workers 2` on ResNet-50, resident MB of each worker "
        "(perf_analyzer over gRPC, 3 windows of 8 s at each concurrency):",
        ["step", *serve],
    )
    for i, (step, _) in enumerate(next(iter(serve.values()))):
        cells = [" + ".join(f"{mb:,.0f}" for mb in serve[k][i][1]) for k in serve]
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = lib.bench_parser(__doc__, "ort-arena")
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--child", choices=("shared", "own"), help=argparse.SUPPRESS)  # one in-process run
    args = p.parse_args(argv)
    if not lib.has_model(args.repo, MODEL):
        return 2
    onnx = model_files(args.repo, MODEL)[0]
    if args.child:
        print(json.dumps(in_process(onnx, args.rows, share=args.child == "shared")))
        return 0
    cpus = lib.pin_to(None)
    args.work.mkdir(parents=True, exist_ok=True)
    inproc = {}
    for label, child in (("shared", "shared"), ("one each", "own")):
        cmd = [lib.PYTHON, __file__, "--repo", str(args.repo), "--rows", str(args.rows), "--child", child]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=600)
        inproc[label] = json.loads(done.stdout.strip().splitlines()[-1])
        print(label, inproc[label], flush=True)
    serve = served(args, cpus)
    lib.report(render(inproc, serve, args, cpus), args.results, append=not args.no_append)
    return 0


if __name__ == "__main__":
    sys.exit(main())
