"""Served sweep of the GPU check: `kiln serve` in its own process, perf_analyzer (gRPC, the
Triton load generator in C++, so the client's GIL is out of the picture) at each concurrency,
batcher on and off, and the timing backend with the engine's own device time; during the
concurrency-16 run a py-spy dump of the server's threads and `nvidia-smi dmon` (where present).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

from benchmarks.serve_bench_lib import free_port, measure_pa, serve_command, serving_process

ROOT = Path(__file__).resolve().parents[2]
PA_TEMPLATE = ["{pa}", "-i", "grpc", "-m", "{model}", "-b", "1", "--max-trials", "3", "-s", "10"]
SPY_AT = 16  # the concurrency at which py-spy and nvidia-smi dmon look


@contextlib.contextmanager
def server(args: list[str], log: Path, timeout_s: float = 240.0) -> Iterator[tuple[int, int]]:
    """`kiln serve ARGS` on a free port until the block ends; yields (port, pid) once ready."""
    port = free_port()
    with serving_process(serve_command(port, "--no-metrics", *args), port, log, timeout_s=timeout_s) as proc:
        yield port, proc.pid


@contextlib.contextmanager
def watchers(pid: int, out: Path, tag: str, delay_s: float = 1.5) -> Iterator[None]:
    """For the block: `nvidia-smi dmon` in the background, and a py-spy dump of `pid` `delay_s`
    in (perf_analyzer is past its warm-up by then, so the dump shows the server under load)."""
    dmon = None
    if shutil.which("nvidia-smi"):
        dmon = subprocess.Popen(
            ["nvidia-smi", "dmon", "-s", "pucm", "-d", "1"], stdout=(out / f"dmon-{tag}.txt").open("w")
        )
    spy = threading.Timer(delay_s, _dump, (pid, out / f"pyspy-{tag}.txt"))
    spy.start()
    try:
        yield
    finally:
        spy.join()
        if dmon is not None:
            dmon.terminate()
            dmon.wait(timeout=10)


def _dump(pid: int, path: Path) -> None:
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    try:  # --native shows where a thread waits inside ONNX Runtime/CUDA; not every host unwinds it
        for extra in (["--native"], []):
            cmd = [spy, "dump", "--pid", str(pid), *extra]
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
            if done.returncode == 0:
                break
        path.write_text(" ".join(cmd) + "\n" + done.stdout + done.stderr)
    except (OSError, subprocess.TimeoutExpired) as exc:
        path.write_text(f"py-spy failed: {exc!r}\n")


def _measure_with_watchers(
    pa: str, port: int, pid: int, model: str, concurrency: int, out: Path, window_ms: int, tag: str
) -> dict:
    template = [a.replace("{pa}", pa) for a in PA_TEMPLATE]
    cpus = os.sched_getaffinity(0)
    if concurrency != SPY_AT:
        return asdict(measure_pa(template, port, model, concurrency, out, cpus, window_ms=window_ms))
    with watchers(pid, out, tag):
        return asdict(measure_pa(template, port, model, concurrency, out, cpus, window_ms=window_ms))


def sweep(
    pa: str, repo: Path, model: str, modes: dict[str, list[str]], concurrencies: list[int],
    out: Path, window_ms: int,
) -> Iterator[dict]:  # fmt: skip
    """One row per (mode, concurrency); a mode whose server fails is one row with the error."""
    for mode, extra in modes.items():
        tag = f"{model}-{mode}"
        try:
            args = ["--repo", str(repo), "--models", model, *extra]
            with server(args, out / f"server-{tag}.log") as (port, pid):
                for c in concurrencies:
                    row = _measure_with_watchers(pa, port, pid, model, c, out, window_ms, f"{tag}-c{c}")
                    yield {"model": model, "mode": mode, "concurrency": c, **row}
        except Exception as exc:  # report the mode, keep the others
            yield {"model": model, "mode": mode, "error": repr(exc)[:300]}
