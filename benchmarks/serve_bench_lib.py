"""Helpers of the served benchmarks (serve_throughput.py and its kin): `kiln serve` commands and
server processes pinned to CPUs, perf_analyzer runs and their CSV, the in-process ONNX Runtime
reference figures, and the machine/version summary.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import csv
import datetime as dt
import os
import platform
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
DEFAULT_PA = ROOT / ".tools-venv" / "bin" / "kiln-perf-analyzer"
# E counts at least this many batches of 16: ResNet-50's 2 s were ~5 batches, and one disturbed
# batch moved E by ~10 % between spinning on and off in one measurement
MIN_BATCHES = 12
FLAGS_OF_NOTE = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "avx_vnni")


@dataclass(frozen=True, kw_only=True)
class Measure:
    """One perf_analyzer measurement (latencies in ms; server split from ModelStatistics)."""

    throughput: float
    p50_ms: float
    p99_ms: float
    queue_ms: float
    compute_ms: float
    stable: bool
    load: str
    # established connections per server process while it ran, most first ("2+1": with workers,
    # SO_REUSEPORT hashes each connection to one worker); "" where `ss` could not tell
    connections: str = ""


def load_average() -> str:
    """The 1-minute load average (the box is shared: a high one flags a noisy figure)."""
    return Path("/proc/loadavg").read_text().split()[0]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pin(cpus: set[int] | None):
    """preexec_fn pinning a child to `cpus`; None: no preexec_fn at all. A preexec_fn runs between
    fork and exec, which can deadlock a parent that has other threads (a gRPC channel's): pass
    None when the children may use every CPU anyway."""
    return None if cpus is None else (lambda: os.sched_setaffinity(0, cpus))


def _ready(port: int) -> bool:
    import grpc

    from protos.inference import grpc_service_pb2 as pb
    from protos.inference import grpc_service_pb2_grpc as pb_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            return stub.ServerReady(pb.ServerReadyRequest(), timeout=1.0).ready
        except grpc.RpcError:
            return False


def serve_command(port: int, *flags: str) -> list[str]:
    """The argv of `kiln serve FLAGS` on 127.0.0.1:`port`, logging warnings only."""
    return [PYTHON, "-m", "serving.dispatch", "serve", "--host", "127.0.0.1", "--port", str(port),
            "--log-level", "warning", *flags]  # fmt: skip


@contextlib.contextmanager
def serving_process(
    cmd: Sequence[str],
    port: int,
    log: Path,
    *,
    cpus: set[int] | None = None,
    timeout_s: float = 300.0,
    cwd: Path = ROOT,
) -> Iterator[subprocess.Popen]:
    """Run a server (pinned to `cpus` where given; output to `log`; from `cwd`, e.g. another
    checkout's tree) until the block ends; yields the process once its ServerReady answers true.
    At the end: SIGTERM, a minute to drain, kill."""
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, preexec_fn=_pin(cpus))
        try:
            deadline = time.monotonic() + timeout_s
            while not _ready(port):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"server did not become ready: {' '.join(cmd)} (log {log.name})")
                time.sleep(0.5)
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()


@contextlib.contextmanager
def running(
    cmd: Sequence[str], port: int, cpus: set[int] | None, log_dir: Path, timeout_s: float = 300.0
) -> Iterator[None]:
    """`serving_process` logging to `log_dir`/server-PORT.log, for blocks that need only the port."""
    with serving_process(cmd, port, log_dir / f"server-{port}.log", cpus=cpus, timeout_s=timeout_s):
        yield


def measure_pa(
    template: Sequence[str],
    port: int,
    model: str,
    concurrency: int,
    work: Path,
    cpus: set[int],
    *,
    window_ms: int,
    request_rate: int | None = None,
) -> Measure:
    """perf_analyzer at one concurrency (closed loop), or at `request_rate` requests a second
    (open loop, `concurrency` ignored); retried once accepting unstable windows if it must be.

    A failed measurement comes back with NaN figures (the run carries on to the other rows).
    """
    mode = ["--concurrency-range", str(concurrency)]
    if request_rate is not None:
        mode = ["--request-rate-range", str(request_rate)]
    csv_path = work / f"pa-{model}-{port}-{mode[0].strip('-')}{mode[1]}.csv"
    cmd = [a.replace("{model}", model) for a in template]
    cmd += ["-u", f"127.0.0.1:{port}", *mode, "-f", str(csv_path)]
    cmd += ["-p", str(window_ms)]
    load = load_average()
    for stable in (True, False):
        if not stable:  # -s 999: the first three windows count as stable
            cmd[cmd.index("-s") + 1] = "999"
        done, spread = _run_sampling_connections(cmd, cpus, port)
        if done.returncode == 0:
            return _parse_csv(csv_path, stable=stable, load=load, connections=spread)
    print(f"perf_analyzer failed: {' '.join(cmd)}\n{done.stdout[-800:]}{done.stderr[-800:]}", file=sys.stderr)
    nan = float("nan")
    return Measure(
        throughput=nan, p50_ms=nan, p99_ms=nan, queue_ms=nan, compute_ms=nan, stable=False, load=load
    )


def _run_sampling_connections(
    cmd: Sequence[str], cpus: set[int], port: int, after_s: float = 2.0
) -> tuple[subprocess.CompletedProcess, str]:
    """Run perf_analyzer; `after_s` into the run (its channels are connected by then) read which
    server process holds each of its connections."""
    with subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_pin(cpus)
    ) as proc:
        spread = ""
        try:
            proc.wait(timeout=after_s)
        except subprocess.TimeoutExpired:
            spread = "+".join(map(str, connections_per_process(port)))
        try:
            out, err = proc.communicate(timeout=900)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err), spread


def connections_per_process(port: int) -> list[int]:
    """Established TCP connections to local `port` per owning process, most first (`ss -tnp`);
    empty where ss is missing or shows no owner."""
    try:
        out = subprocess.run(
            ["ss", "-tnpH", "state", "established", f"( sport = :{port} )"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return []
    counts = collections.Counter(re.findall(r"pid=(\d+)", out))
    return sorted(counts.values(), reverse=True)


def _parse_csv(path: Path, *, stable: bool, load: str, connections: str = "") -> Measure:
    with path.open(newline="") as f:
        row = next(csv.DictReader(f))
    us = lambda key: float(row.get(key) or 0.0) / 1000.0  # noqa: E731 - µs columns to ms
    return Measure(
        throughput=float(row["Inferences/Second"]),
        p50_ms=us("p50 latency"),
        p99_ms=us("p99 latency"),
        queue_ms=us("Server Queue"),
        compute_ms=us("Server Compute Infer"),
        stable=stable,
        load=load,
        connections=connections,
    )


def engine_session(onnx: Path, spin: str):
    """The session E and E1 are measured on: 2 intra-op threads, spinning "0" (off) or "1" (on)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = 2, 1
    so.add_session_config_entry("session.intra_op.allow_spinning", spin)
    return ort.InferenceSession(str(onnx), sess_options=so, providers=["CPUExecutionProvider"])


def _throughput(run: Callable[[], None], batch: int, seconds: float) -> float:
    """Rows/s over at least `seconds` and MIN_BATCHES runs."""
    count, start = 0, time.perf_counter()
    while count < MIN_BATCHES or time.perf_counter() - start < seconds:
        run()
        count += 1
    return count * batch / (time.perf_counter() - start)


def _latencies(run: Callable[[], None], seconds: float) -> np.ndarray:
    """Seconds per call over at least `seconds` and 30 calls."""
    times, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 30:
        tick = time.perf_counter()
        run()
        times.append(time.perf_counter() - tick)
    return np.asarray(times)


class Engine:
    """In-process ONNX Runtime on the served file: 2 intra-op threads, spinning off ("0") and on ("1").

    `measure()` is quick, so the served rows can be bracketed by engine figures taken just
    before and just after them (the box is shared: load drifts within minutes).
    """

    def __init__(self, onnx: Path, shape: tuple[int, ...], input_name: str) -> None:
        rng = np.random.default_rng(0)
        self._x16 = rng.standard_normal((16, *shape)).clip(-2.5, 2.5).astype(np.float32)
        self._name = input_name
        self._sessions = {spin: engine_session(onnx, spin) for spin in ("0", "1")}
        for session in self._sessions.values():
            for _ in range(3):
                session.run(None, {input_name: self._x16})

    def _one(self, spin: str, seconds: float) -> tuple[float, float, float]:
        session, x16, name = self._sessions[spin], self._x16, self._name

        def run16() -> None:
            session.run(None, {name: x16})

        def run1() -> None:
            session.run(None, {name: x16[:1]})

        rate = _throughput(run16, 16, seconds=seconds)
        lat = _latencies(run1, seconds=seconds) * 1e3
        return rate, float(np.percentile(lat, 50)), float(np.percentile(lat, 99))

    def measure(self, seconds: float = 2.0) -> dict:
        """E (batch-16 rows/s, the better spinning) and E1 (batch-1 p50/p99 ms of the better p99)."""
        load = load_average()
        figures = {spin: self._one(spin, seconds) for spin in self._sessions}
        best = min(figures.values(), key=lambda f: f[2])
        return {
            "load": load,
            "E_by_spin": {spin: f[0] for spin, f in figures.items()},
            "E": max(f[0] for f in figures.values()),
            "E1_p50_ms": best[1],
            "E1_p99_ms": best[2],
        }


def bracket(before: dict, after: dict) -> dict:
    """The mean of two engine measurements taken around a block of served measurements."""
    keys = ("E", "E1_p50_ms", "E1_p99_ms")
    merged = {k: (before[k] + after[k]) / 2 for k in keys}
    merged["load"] = f"{before['load']}/{after['load']}"
    return merged


def cpu_summary() -> str:
    """lscpu model name, CPU count and the SIMD flags that matter for ONNX Runtime."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return platform.processor() or platform.machine()
    info = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    info = {k.strip(): v.strip() for k, v in info.items()}
    flags = set(info.get("Flags", "").split())
    have = [f for f in FLAGS_OF_NOTE if f in flags]
    return (
        f"{info.get('Model name', '?')} (family {info.get('CPU family', '?')} model "
        f"{info.get('Model', '?')}), {info.get('CPU(s)', '?')} CPUs, "
        f"{info.get('Hypervisor vendor', 'bare metal')} guest; flags: {' '.join(have) or 'none of note'}"
    )


def versions(perf_analyzer: Path | None) -> str:
    """Python and the packages on the measured path, plus perf_analyzer's version (if one ran)."""
    from importlib import metadata

    names = ("onnxruntime", "grpcio", "protobuf", "numpy", "prometheus-client")
    parts = [f"Python {platform.python_version()}"]
    for name in names:
        with contextlib.suppress(metadata.PackageNotFoundError):
            parts.append(f"{name} {metadata.version(name)}")
    if perf_analyzer is not None:
        try:
            out = subprocess.run(
                [str(perf_analyzer), "--version"], capture_output=True, text=True, timeout=30
            )
            parts.append((out.stdout + out.stderr).strip().splitlines()[0])
        except (OSError, subprocess.SubprocessError, IndexError):
            parts.append("perf_analyzer ?")
    return ", ".join(parts) + f"; kernel {platform.release()}; {sys.platform}"


def pin_to(cpus: str | None) -> set[int]:
    """Pin this process (and so the servers and clients it starts) to `cpus` ("0,1"; None: every
    CPU it may use now) and return the set."""
    chosen = {int(c) for c in cpus.split(",")} if cpus else os.sched_getaffinity(0)
    os.sched_setaffinity(0, chosen)
    return chosen


def report(section: str, results: Path, *, append: bool) -> None:
    """Print a results section and, with `append`, add it to the `results` markdown file."""
    print(section)
    if append:
        with results.open("a", encoding="utf-8") as out:
            out.write("\n" + section)


def bench_parser(doc: str | None, work: str | None) -> argparse.ArgumentParser:
    """The options every served benchmark takes: --repo, --work (benchmarks/out/`work`),
    --perf-analyzer, --results and --no-append; the script adds its own. `work` None: a benchmark
    that runs in process (no work folder, no perf_analyzer)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repo", type=Path, default=ROOT / "benchmarks" / "out" / "tuning-repo")
    if work is not None:
        p.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "out" / work)
        p.add_argument("--perf-analyzer", type=Path, default=DEFAULT_PA)
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "RESULTS-serving.md")
    p.add_argument("--no-append", action="store_true", help="print only")
    return p


def has_model(repo: Path, model: str) -> bool:
    """Whether `repo` holds `model`; if not, says how to build it (on stderr)."""
    if (repo / model).is_dir():
        return True
    print(f"no {model} in {repo}: run benchmarks/serve_throughput.py once to build it", file=sys.stderr)
    return False


def section_head(title: str, script: str, flags: str, cpus: str, perf_analyzer: Path | None) -> list[str]:
    """A results section's first lines: `## <now> UTC: title (benchmarks/script)`, then the machine
    (with `cpus`, where client and servers ran), the versions and the command (`flags` after it)."""
    now = dt.datetime.now(dt.UTC)
    return [
        f"## {now:%Y-%m-%d %H:%M} UTC: {title} (benchmarks/{script})",
        "",
        f"- Machine: {cpu_summary()}; {cpus}",
        f"- Versions: {versions(perf_analyzer)}",
        f"- Command: `python benchmarks/{script} {flags}`",
    ]


def table_head(caption: str, columns: Sequence[str]) -> list[str]:
    """A markdown table's opening inside a section: a blank line, `caption`, a blank line, the
    header row of `columns` and its rule."""
    return ["", caption, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
