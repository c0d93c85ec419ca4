"""Where a served request's time goes: `kiln serve`'s stages timed per request under perf_analyzer.

    .venv/bin/python benchmarks/serve_breakdown.py --repo benchmarks/out/serve-repo --model resnet20

Runs serving.grpc.server.Server in this process, on the event loop `kiln serve` picks (uvloop where
installed), with timing probes wrapped around the functions a ModelInfer passes through (no serving
code changes), drives it with perf_analyzer at each `--concurrency`, and prints per stage the
mean / p50 / p99 in microseconds:

  decode      handler entry -> inputs decoded (KServe tensors -> numpy, zero-copy for raw)
  submit      decoded -> queued (routing, requested outputs, inflight gauge, the batcher's input
              checks, the queue lock and the worker's wake-up call)
  queue       queued -> a batcher worker takes it into a batch (the worker waking, the GIL)
  hop_in      taken -> the worker starts computing the batch (the GIL, between the two)
  gather      worker start -> ORT called (np.concatenate of the batch, input checks)
  ort         ONNX Runtime session.run of the whole batch
  scatter     ORT done -> worker returns (output checks, per-request slices)
  hop_out     worker done -> the result callback runs on the event loop (the batch taps first:
              prediction metrics and the shadow sample; then call_soon_threadsafe)
  resume      callback -> the request's handler resumes (other handlers of the batch go first)
              (a request computed inline on the event loop, serving/runtime/solo.py: queue and
              hop_in ~0, hop_out = the batch taps, resume = back into the handler)
  response    resumed -> the response message made, up to encoding (inflight gauge)
  encode      numpy -> KServe response (raw_output_contents)
  record      statistics + Prometheus
  grpc+client the client's mean latency minus the server's mean total: HTTP/2, protobuf parse and
              serialise, grpc core's threads and the asyncio poller hop, and perf_analyzer itself

It also reports CPU per request of each thread group (from /proc): the event loop, the batcher's
worker, ONNX Runtime's pool threads and grpc core's threads. The probes add ~1 us per stage.
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import os
import re
import resource
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without install

from benchmarks.serve_bench_lib import DEFAULT_PA  # noqa: E402
from benchmarks.serve_throughput import input_data, model_files  # noqa: E402

STAGES = ("decode", "submit", "queue", "hop_in", "gather", "ort", "scatter", "hop_out", "resume",
          "response", "encode", "record")  # fmt: skip
_CURRENT: contextvars.ContextVar[tuple[int, dict[str, float]] | None] = contextvars.ContextVar(
    "probe", default=None
)
_BY_INPUTS: dict[int, dict[str, float]] = {}  # id(decoded inputs) -> the request's record
_DONE: list[dict[str, float]] = []
_ORT = threading.local()
_clock = time.perf_counter


def install_probes() -> None:
    """Wrap the functions on a ModelInfer's path with timestamping probes: those the request's
    handler runs on the event loop, and those the batcher's worker runs."""
    _probe_handler()
    _probe_batcher()


def _stamp(key: str) -> None:
    """Time `key` in the record of the request whose handler is running (none outside one)."""
    current = _CURRENT.get()
    if current is not None:
        current[1][key] = _clock()


def _stamp_requests(batch: Iterable[Any] | None, key: str) -> None:
    """Time `key`, once, in the record of every request of a batch (None: no batch)."""
    now = _clock()
    for req in batch or ():
        rec = _BY_INPUTS.get(id(req.inputs))
        if rec is not None:
            rec[key] = now


def _probe_handler() -> None:
    """Probes of the handler's stages: decode, queued, resumed, encode, record."""
    from serving.grpc import inference as gi
    from serving.runtime.batcher import DynamicBatcher

    decode, encode, record = gi.decode_inputs, gi.encode_outputs, gi.record_outcome
    enqueue, submit, inline = DynamicBatcher._enqueue, DynamicBatcher.submit, DynamicBatcher._inline

    def decode_probe(request):
        rec = {"start": _clock()}
        inputs = decode(request)
        rec["decoded"] = _clock()
        _CURRENT.set((id(inputs), rec))
        _BY_INPUTS[id(inputs)] = rec
        return inputs

    def enqueue_probe(self, *args):
        future = enqueue(self, *args)
        current = _CURRENT.get()
        if current is not None and "queued" not in current[1]:  # not computed inline
            _stamp("queued")
        return future

    def inline_probe(self, request):
        """A request computed on the event loop: queued = dispatched = when its compute began."""
        rec = _BY_INPUTS.get(id(request.inputs))
        if rec is not None:
            rec["queued"] = rec["dispatched"] = _clock()
        done = inline(self, request)
        if not done and rec is not None:
            del rec["queued"], rec["dispatched"]
        return done

    async def submit_probe(self, *args, **kwargs):
        served = await submit(self, *args, **kwargs)
        _stamp("resumed")
        return served

    def encode_probe(response, outputs, wanted, labels=()):
        _stamp("encode")
        encode(response, outputs, wanted, labels)
        _stamp("encoded")

    def record_probe(metrics, loaded, rows, start, exc):
        record(metrics, loaded, rows, start, exc)
        current = _CURRENT.get()
        if current is not None:
            _BY_INPUTS.pop(current[0], None)
            if exc is None:
                current[1]["end"] = _clock()
                _DONE.append(current[1])

    gi.decode_inputs, gi.encode_outputs, gi.record_outcome = decode_probe, encode_probe, record_probe
    DynamicBatcher._enqueue, DynamicBatcher.submit = enqueue_probe, submit_probe
    DynamicBatcher._inline = inline_probe


def _probe_batcher() -> None:
    """Probes of the batcher worker's stages: batch taken, computed (ONNX Runtime's span inside), finished."""
    from serving.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
    from serving.runtime.batcher import DynamicBatcher

    take, finish, compute = DynamicBatcher._next_batch, DynamicBatcher._finish, DynamicBatcher._compute
    infer = OnnxRuntimeBackend.infer

    def take_probe(self):
        batch = take(self)
        _stamp_requests(batch, "dispatched")
        return batch

    def compute_probe(self, inputs, rows, *rest):
        start = _clock()
        result = compute(self, inputs, rows, *rest)
        end = _clock()
        for item in inputs:
            rec = _BY_INPUTS.get(id(item))
            if rec is not None:
                rec.update(worker=start, ort_in=_ORT.span[0], ort_out=_ORT.span[1], worker_end=end)
        return result

    def infer_probe(self, inputs):
        start = _clock()
        out = infer(self, inputs)
        _ORT.span = (start, _clock())
        return out

    def finish_probe(self, batch, *rest):
        _stamp_requests(batch, "finished")
        return finish(self, batch, *rest)

    DynamicBatcher._next_batch, DynamicBatcher._finish = take_probe, finish_probe
    DynamicBatcher._compute = compute_probe
    OnnxRuntimeBackend.infer = infer_probe


def stage_table(records: list[dict[str, float]]) -> dict[str, np.ndarray]:
    """Per-stage durations (µs) of complete records."""
    keys = ("start", "decoded", "queued", "dispatched", "worker", "ort_in", "ort_out", "worker_end",
            "finished", "resumed", "encode", "encoded", "end")  # fmt: skip
    rows = np.array([[r[k] for k in keys] for r in records if all(k in r for k in keys)])
    spans = np.diff(rows, axis=1) * 1e6
    table = {name: spans[:, i] for i, name in enumerate(STAGES)}
    table["server total"] = (rows[:, -1] - rows[:, 0]) * 1e6
    return table


def thread_cpu() -> dict[str, float]:
    """CPU seconds so far by thread group (event loop, batcher worker, ORT pool, grpc core, other)."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    tick = os.sysconf("SC_CLK_TCK")
    groups: dict[str, float] = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
            comm = Path(f"/proc/self/task/{tid}/comm").read_text().strip()
        except OSError:
            continue
        name = names.get(int(tid), comm)
        group = (
            "event loop" if name == "MainThread"
            else "batcher worker" if name.startswith("kiln-")
            else "grpc poller" if "_poll_wrapper" in name
            else "grpc core" if comm.startswith(("event_engine", "grpc"))
            else "ORT pool" if int(tid) not in names
            else "other"
        )  # fmt: skip
        groups[group] = groups.get(group, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return groups


def _system_ticks() -> list[int]:
    """/proc/stat's aggregate cpu line: user nice system idle iowait irq softirq steal."""
    return [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


async def drive(cmd: list[str]) -> tuple[float, float]:
    """Run perf_analyzer; returns (throughput, client mean latency µs)."""
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out = (await proc.communicate())[0].decode()
    if proc.returncode != 0:
        raise RuntimeError(f"perf_analyzer failed:\n{out[-2000:]}")
    throughput = float(re.findall(r"Throughput: ([0-9.]+) infer/sec", out)[-1])
    latency = float(re.findall(r"Avg latency: ([0-9]+) usec", out)[-1])
    return throughput, latency


def report(
    concurrency: int, throughput: float, client_us: float, table: dict, cpu: dict, seconds: float
) -> str:
    """One markdown block: stage table + CPU per request by thread group."""
    lines = [
        f"#### concurrency {concurrency}: {throughput:.0f} inf/s, client mean {client_us:.0f} us, "
        f"{len(table['ort'])} requests probed",
        "",
        "| stage | mean us | p50 us | p99 us |",
        "|---|---|---|---|",
    ]
    for name, v in table.items():
        lines.append(f"| {name} | {v.mean():.0f} | {np.percentile(v, 50):.0f} | {np.percentile(v, 99):.0f} |")
    rest = client_us - table["server total"].mean()
    lines.append(f"| grpc+client (client mean - server mean) | {rest:.0f} | | |")
    per_req = sorted(
        ((k, v / seconds / throughput * 1e6) for k, v in cpu.items() if v > 0), key=lambda kv: -kv[1]
    )
    total = sum(v for _, v in per_req)
    text = ", ".join(f"{k} {v:.0f}" for k, v in per_req)
    return "\n".join([*lines, "", f"CPU per request (us) by thread: {text}; total {total:.0f}", ""])


async def amain(args: argparse.Namespace) -> None:
    """Start the probed server, measure each concurrency, print the blocks."""
    from serving.grpc.server import Server

    install_probes()
    _, input_name, shape, _ = model_files(args.repo, args.model)
    args.work.mkdir(parents=True, exist_ok=True)
    data = input_data(args.work / f"{args.model}-input.json", input_name, shape)
    config = serve_config(args)
    server = Server(config)
    await server.start()
    try:
        for c in args.concurrency:
            cmd = [str(args.perf_analyzer), "-i", "grpc", "-u", f"127.0.0.1:{server.port}", "-m", args.model,
                   "--input-data", str(data), "--concurrency-range", str(c), "-p", str(args.measurement_ms),
                   "--max-trials", "4", "-s", "999"]  # fmt: skip
            print(await measure(c, cmd), flush=True)
    finally:
        await server.shutdown(1.0)


def serve_config(args: argparse.Namespace):
    """The server's settings: kiln serve's defaults but for the flags given (one process)."""
    from serving.grpc.config import ServeConfig

    return ServeConfig(
        repo=args.repo, models=(args.model,), host="127.0.0.1", port=0, metrics_port=0,
        instances=args.instances, intra_op_threads=args.intra_op_threads,
        intra_op_spinning=args.allow_spinning, workers=1, precision=args.precision,
    )  # fmt: skip


async def measure(concurrency: int, cmd: list[str]) -> str:
    """One perf_analyzer run with the probes and the CPU counters read around it."""
    _DONE.clear()
    before, start, child, ticks = thread_cpu(), time.monotonic(), _children_cpu(), _system_ticks()
    throughput, client_us = await drive(cmd)
    spent = [b - a for a, b in zip(ticks, _system_ticks(), strict=True)]
    idle = 100 * (spent[3] + spent[4]) / max(1, sum(spent))
    seconds = time.monotonic() - start
    after = thread_cpu()
    cpu = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    cpu["perf_analyzer (client)"] = _children_cpu() - child
    load = Path("/proc/loadavg").read_text().split()[0]
    return (
        report(concurrency, throughput, client_us, stage_table(_DONE), cpu, seconds)
        + f"(load {load}, machine idle {idle:.0f} % during the run)\n"
    )


def main(argv: list[str] | None = None) -> int:
    """Flags, then run."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repo", type=Path, default=ROOT / "benchmarks" / "out" / "serve-repo")
    p.add_argument("--model", default="resnet20")
    p.add_argument("--concurrency", default="1,16")
    p.add_argument("--measurement-ms", type=int, default=3000)
    p.add_argument("--instances", type=int, default=1, help="kiln serve --instances")
    p.add_argument("--precision", default="auto", help="kiln serve --precision (serve_throughput: fp32)")
    p.add_argument("--allow-spinning", action="store_true", help="ORT intra-op spinning on")
    p.add_argument("--intra-op-threads", type=int, default=None, help="kiln serve --intra-op-threads")
    p.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "out" / "serve-work")
    pa = Path(os.environ.get("KILN_PERF_ANALYZER", DEFAULT_PA))
    p.add_argument("--perf-analyzer", type=Path, default=pa)
    args = p.parse_args(argv)
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c]
    from serving.cli import loop_factory

    with asyncio.Runner(loop_factory=loop_factory(serve_config(args))) as runner:
        runner.run(amain(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
