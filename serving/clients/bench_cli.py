"""`kiln bench`: quick throughput/latency figures for a model, in-process or through a server.

    kiln bench --repo DIR --model NAME [--precision fp32,int8] [--batch-sizes 1,8,16]    # engine only
    kiln bench --server HOST:PORT --model NAME [--concurrency 1,4,16] [--batch 1]         # served

The served mode drives ModelInfer from Python threads, so it is a smoke figure, bounded by the
client's own GIL; for serious served numbers use perf_analyzer (see benchmarks/).
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections.abc import Callable, Sequence

import numpy as np
from rich.console import Console
from rich.table import Table

from serving.runtime.backends import BackendOptions, load_backend, numpy_dtype


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `kiln bench`."""
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--repo", help="model repository: benchmark the engine in-process")
    where.add_argument(
        "--server", help="HOST:PORT of a running kiln/Triton server: benchmark served requests"
    )
    parser.add_argument("--model", required=True)
    parser.add_argument("--version", type=int, help="model version (default: the latest)")
    parser.add_argument(
        "--precision",
        default="fp32",
        help="engine mode: comma-separated artefact precisions, or 'auto': the measurement "
        "`precision: auto` chooses from (the server's cached table when it has measured)",
    )
    parser.add_argument("--batch-sizes", default="1,8,16", help="engine mode: comma-separated batch sizes")
    parser.add_argument(
        "--threads", type=int, default=0, help="engine mode: intra-op threads (0 = all cores)"
    )
    parser.add_argument("--concurrency", default="1,4,16", help="served mode: comma-separated client threads")
    parser.add_argument("--batch", type=int, default=1, help="served mode: rows per request")
    parser.add_argument(
        "--connections",
        type=int,
        default=0,
        help="served mode: HTTP/2 connections the client threads share round-robin (0 = one per "
        "thread of the largest --concurrency, up to 16); a server with workers > 1 places "
        "connections, not requests, on its workers",
    )
    parser.add_argument("--seconds", type=float, default=3.0, help="measurement time per row of the table")


def _ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise ValueError(f"{flag} must be comma-separated positive integers, got {text!r}")
    return values


def _measure(call: Callable[[], None], seconds: float, workers: int = 1) -> tuple[int, float, np.ndarray]:
    """Run `call` from `workers` threads for `seconds`; returns (calls, wall s, latencies s)."""
    latencies: list[float] = []
    lock = threading.Lock()
    stop_at = time.perf_counter() + seconds

    def loop() -> None:
        own = []
        while time.perf_counter() < stop_at:
            tick = time.perf_counter()
            call()
            own.append(time.perf_counter() - tick)
        with lock:
            latencies.extend(own)

    call()  # warm-up outside the window
    started = time.perf_counter()
    threads = [threading.Thread(target=loop) for _ in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return len(latencies), time.perf_counter() - started, np.asarray(latencies)


def _row(
    table: Table, label: Sequence[str], rows_per_call: int, measured: tuple[int, float, np.ndarray]
) -> None:
    calls, wall, lat = measured
    p50, p99 = (np.percentile(lat, [50, 99]) * 1e3) if lat.size else (float("nan"), float("nan"))
    table.add_row(*label, f"{calls * rows_per_call / wall:,.0f}", f"{p50:.2f}", f"{p99:.2f}")


def _sample_inputs(specs: Sequence, rows: int) -> dict[str, np.ndarray]:
    """Finite, realistic values (never NaN/denormal garbage that slows the math)."""
    rng = np.random.default_rng(0)
    out = {}
    for spec in specs:
        shape = (rows, *(d if d > 0 else 1 for d in spec.shape[1:]))
        dtype = numpy_dtype(spec.datatype)
        if np.issubdtype(dtype, np.integer):
            out[spec.name] = rng.integers(0, 255, size=shape).astype(dtype)
        else:
            out[spec.name] = rng.standard_normal(shape).astype(dtype)
    return out


def bench_engine(args: argparse.Namespace, table: Table) -> None:
    from serving.contract.repository import ModelRepository

    resolved = ModelRepository(args.repo).resolve(args.model, args.version)
    for precision in args.precision.split(","):
        artefact = resolved.manifest.find_artefact("onnx", precision.strip())
        if artefact is None:
            raise ValueError(
                f"{args.model} v{resolved.version} has no ONNX artefact of precision {precision!r}"
            )
        backend = load_backend(
            resolved.manifest,
            artefact,
            version_dir=resolved.path,
            options=BackendOptions(intra_op_threads=args.threads),
        )
        try:
            for batch in _ints(args.batch_sizes, "--batch-sizes"):
                inputs = _sample_inputs(backend.inputs, batch)
                _row(
                    table,
                    (artefact.path, str(batch)),
                    batch,
                    _measure(lambda i=inputs, b=backend: b.infer(i), args.seconds),
                )
        finally:
            backend.close()


def bench_auto(args: argparse.Namespace) -> Table:
    """The table `precision: auto` chooses from, as the server measures (and caches) it."""
    from serving.contract.repository import ModelRepository
    from serving.runtime.tuning import batch_sizes_for, tune

    resolved = ModelRepository(args.repo).resolve(args.model, args.version)
    sizes = batch_sizes_for(resolved.manifest.max_batch_size)
    choice = tune(resolved.manifest, resolved.path, batch_sizes=sizes, threads=args.threads or None)
    table = Table(
        title=f"kiln bench: {args.model} v{resolved.version}, precision auto", caption=choice.reason
    )
    for column in ("artefact", "precision", "threads x instances", *(f"batch {b} img/s" for b in sizes)):
        table.add_column(column)
    table.add_column("score", justify="right")
    for trial in sorted(choice.trials, key=lambda t: -t.score):
        chosen = trial.path == choice.path and trial.layout == choice.layout
        rates = [f"{trial.images_per_s[b]:,.0f}" for b in sizes]
        layout = f"{trial.layout.threads} x {trial.layout.instances}"
        mark = f"{trial.score:,.0f}" + (" (chosen)" if chosen else "")
        table.add_row(trial.path, trial.precision, layout, *rates, mark)
    if choice.cached:
        table.caption = f"{choice.reason} (cached)"
    return table


def bench_server(args: argparse.Namespace, table: Table) -> None:
    from serving.clients.client import KilnClient

    concurrency = _ints(args.concurrency, "--concurrency")
    if args.connections < 0:
        raise ValueError(f"--connections must be >= 0, got {args.connections}")
    connections = args.connections or min(max(concurrency), 16)
    with KilnClient(args.server, connections=connections) as client:
        metadata = client.model_metadata(args.model)
        inputs = _sample_inputs(metadata.inputs, args.batch)
        for workers in concurrency:
            measured = _measure(lambda: client.infer(args.model, inputs), args.seconds, workers)
            _row(table, (args.server, str(workers)), args.batch, measured)


def run(args: argparse.Namespace) -> int:
    """Entry point of `kiln bench`."""
    import grpc

    from serving.contract.repository import RepositoryError

    engine = args.repo is not None
    table = Table(
        title=f"kiln bench: {args.model} ({'engine, in-process' if engine else 'served, ModelInfer'})"
    )
    for column in ("artefact" if engine else "server", "batch" if engine else "concurrency"):
        table.add_column(column)
    for column in ("items/s", "p50 ms", "p99 ms"):
        table.add_column(column, justify="right")
    try:
        if engine and args.precision.strip() == "auto":
            table = bench_auto(args)
        else:
            (bench_engine if engine else bench_server)(args, table)
    except (ValueError, RepositoryError) as exc:
        print(f"kiln bench: error: {exc}", file=sys.stderr)
        return 2
    except grpc.RpcError as exc:
        print(f"kiln bench: error: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    Console().print(table)
    return 0
