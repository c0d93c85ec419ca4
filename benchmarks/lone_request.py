"""A lone request after an idle gap: what the concurrency-1 target's E1 (a back-to-back figure)
leaves out.

    .venv/bin/python benchmarks/lone_request.py --repo benchmarks/out/tuning-repo     (~1 min)

At concurrency 1 the server idles between requests for the client's round trip (~0.5-0.7 ms on 2
cores). The target `served >= 0.9 x 1/(1/N1 + E1)` adds E1, ONNX Runtime's batch-1 time measured
back to back, to the bare gRPC round trip 1/N1. This script measures what an idle gap does to the
same work, in this process, with no gRPC, after sleeping `gap` on the event loop `kiln serve` picks
(uvloop where installed) before each call, as a server sleeps in epoll between a lone client's
requests:

  E1 session      ONNX Runtime's lone row on the session E1 is measured with (serve_bench_lib.Engine:
                  2 threads, spinning on)
  served row      the lone row as `kiln serve` runs it: its backend's `infer` (the session it picks for
                  1-row batches, its thread pinning)
  null handler    the bare null server's ModelInfer (benchmarks/null_server.py): the Python a
                  request costs any server
  Kiln, null      `kiln serve`'s ModelInfer over `--backend null`: decode, route, the batcher (a
                  request alone is computed on the event loop), statistics, metrics, encode
  Kiln, model     the same over the model: the whole lone request but gRPC

Each cell: p50 / mean microseconds of `--runs` calls, the median over `--rounds` rounds that
interleave every cell (the box's speed drifts within a minute). A gap of 0 is back to back (for Kiln's
handler that is a server under load: the request goes through the batcher's worker thread). The
header records the machine's idle policy (cpuidle driver; `guest_halt_poll_ns` 0 on a KVM guest
means an idle vCPU exits to the host at once). Appends a section to RESULTS-serving.md unless
--no-append.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without install

from benchmarks import serve_bench_lib as lib  # noqa: E402
from benchmarks.null_server import NullInference  # noqa: E402
from benchmarks.serve_throughput import model_files  # noqa: E402
from serving.cli import loop_factory  # noqa: E402
from serving.clients.client import build_infer_request  # noqa: E402
from serving.grpc.config import ServeConfig  # noqa: E402
from serving.grpc.inference import InferenceServicer  # noqa: E402
from serving.grpc.server import Server  # noqa: E402

COLUMNS = ("E1 session", "served row", "null handler", "Kiln, null", "Kiln, model")
# after each cell: a spinning ONNX Runtime pool (the E1 session's) spins on ~40 ms after its last Run
SETTLE_S = 0.1
IDLE_FILES = {
    "cpuidle driver": Path("/sys/devices/system/cpu/cpuidle/current_driver"),
    "guest_halt_poll_ns": Path("/sys/module/haltpoll/parameters/guest_halt_poll_ns"),
}


class _Context:
    """What ModelInfer reads of a gRPC call's context: no deadline, one peer."""

    def time_remaining(self) -> None:
        return None

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"


async def timed(call: Callable[[], object], gap_s: float, runs: int) -> tuple[float, float]:
    """(p50, mean) microseconds of `call` (awaited if it returns a coroutine), each after sleeping
    `gap_s` on the event loop (none for 0); 20 untimed calls first."""

    async def once() -> None:
        result = call()
        if asyncio.iscoroutine(result):
            await result

    for _ in range(20):
        await once()
    times = []
    for _ in range(runs):
        if gap_s:
            await asyncio.sleep(gap_s)
        start = time.perf_counter()
        await once()
        times.append(time.perf_counter() - start)
    us = np.asarray(times) * 1e6
    return float(np.percentile(us, 50)), float(us.mean())


@contextlib.asynccontextmanager
async def kiln_handler(
    repo: Path, model: str, backend: str
) -> AsyncIterator[tuple[InferenceServicer, Server]]:
    """A started `kiln serve` Server over `backend` and a ModelInfer servicer on its parts."""
    config = ServeConfig(repo=repo, models=(model,), host="127.0.0.1", port=0, metrics_port=0,
                         workers=1, backend=backend, precision="fp32")  # fmt: skip
    server = Server(config)
    await server.start()
    try:
        yield InferenceServicer(server.manager, config, server_version="bench", is_ready=lambda: True,
                                metrics=server.metrics, admission=server.admission), server  # fmt: skip
    finally:
        await server.shutdown(1.0)


async def measure(repo: Path, model: str, gaps: list[float], runs: int, rounds: int) -> dict[str, dict]:
    """Every column at every gap, `rounds` times interleaved (the box is shared: its speed drifts
    within a minute); each cell is the median over the rounds of (p50, mean)."""
    onnx, input_name, shape, classes = model_files(repo, model)
    row = np.random.default_rng(0).standard_normal((1, *shape)).clip(-2.5, 2.5).astype(np.float32)
    feed = {input_name: row}
    req = build_infer_request(model, feed, request_id="1")  # raw FP32, as perf_analyzer sends
    engine = lib.engine_session(onnx, "1")
    null = NullInference(model, shape, classes, 64)
    context = _Context()
    async with kiln_handler(repo, model, "null") as (kiln_null, _), \
            kiln_handler(repo, model, "auto") as (kiln_model, server):  # fmt: skip
        backend = server.manager.get(model, "").backend
        calls: dict[str, Callable[[], object]] = {
            "E1 session": lambda: engine.run(None, feed),
            "served row": lambda: backend.infer(feed),
            "null handler": lambda: null.ModelInfer(req, context),
            "Kiln, null": lambda: kiln_null.ModelInfer(req, context),
            "Kiln, model": lambda: kiln_model.ModelInfer(req, context),
        }
        cells: dict[str, dict[float, list[tuple[float, float]]]] = {c: {g: [] for g in gaps} for c in COLUMNS}
        for _ in range(rounds):
            for gap in gaps:
                for column, call in calls.items():
                    cells[column][gap].append(await timed(call, gap, runs))
                    await asyncio.sleep(SETTLE_S)
    return {
        c: {g: tuple(statistics.median(v[i] for v in cells[c][g]) for i in (0, 1)) for g in gaps}
        for c in COLUMNS
    }


def idle_policy() -> str:
    """The machine's cpuidle driver and guest halt polling, where it has them."""
    parts = []
    for name, path in IDLE_FILES.items():
        try:
            parts.append(f"{name} {path.read_text().strip()}")
        except OSError:
            parts.append(f"{name} (none)")
    return ", ".join(parts)


def render(columns: dict[str, dict[float, tuple]], gaps: list[float], args_text: str) -> str:
    lines = lib.section_head("a lone request after an idle gap", "lone_request.py", args_text,
                             "everything in one process, no gRPC", None)  # fmt: skip
    lines += [f"- Idle policy: {idle_policy()}; load average {lib.load_average()}"]
    lines += lib.table_head("p50 / mean us per call after sleeping `gap` on the event loop:",
                            ("gap ms", *COLUMNS))  # fmt: skip
    for gap in gaps:
        cells = [f"{columns[c][gap][0]:.0f} / {columns[c][gap][1]:.0f}" for c in COLUMNS]
        lines.append(f"| {'back to back' if gap == 0 else f'{gap * 1e3:g}'} | " + " | ".join(cells) + " |")
    idle = [g for g in gaps if g]
    if idle:
        excess = statistics.fmean(columns["Kiln, null"][g][1] - columns["null handler"][g][1] for g in idle)
        lines += [
            "",
            f"- Kiln's own path beyond the null handler's, mean over the gaps > 0: {excess:.0f} us.",
        ]
        if 0 in gaps:
            late = statistics.fmean(columns["served row"][g][1] for g in idle) - columns["E1 session"][0][1]
            lines += [f"- The served lone row after a gap beyond E1 back to back, mean: {late:.0f} us."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = lib.bench_parser(__doc__.splitlines()[0], None)
    p.add_argument("--model", default="resnet20")
    p.add_argument("--gaps-ms", default="0,0.2,0.7,3", help="idle gaps before each call, ms")
    p.add_argument("--runs", type=int, default=300, help="timed calls per cell and round")
    p.add_argument("--rounds", type=int, default=5, help="rounds of every cell, interleaved")
    args = p.parse_args(argv)
    if not lib.has_model(args.repo, args.model):
        return 1
    gaps = [float(g) / 1e3 for g in args.gaps_ms.split(",")]
    with asyncio.Runner(loop_factory=loop_factory(ServeConfig(repo=args.repo))) as runner:  # as kiln serve
        columns = runner.run(measure(args.repo, args.model, gaps, args.runs, args.rounds))
    flags = f"--model {args.model} --gaps-ms {args.gaps_ms} --runs {args.runs} --rounds {args.rounds}"
    lib.report(render(columns, gaps, flags), args.results, append=not args.no_append)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
