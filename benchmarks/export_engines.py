"""Engine table on this CPU: PyTorch eager vs ONNX Runtime (unfused, fused, FP16, INT8).

    .venv/bin/python benchmarks/export_engines.py                      # the full table (minutes)
    .venv/bin/python benchmarks/export_engines.py --models resnet18 --size 32 --width 8 \\
        --iters 3 --warmup 1                                           # a smoke run (seconds)

Engines (each a separate model object on the same random input):
- pytorch: the unfolded model in eval mode, ``torch.inference_mode``.
- ort-unfused: the unfolded model exported as traced (BatchNormalization nodes kept), ORT graph
  optimizations disabled: what running a graph with nothing fused costs.
- ort-fused: the BN-folded model (export.fold) with ORT's default optimizations (ENABLE_ALL).
- ort-fp16: the folded graph converted to FP16 (FP32 I/O). ORT's CPU provider has no FP16 kernels
  for most ops, so this measures casts around FP32 compute, not FP16 arithmetic.
- ort-int8: static QDQ INT8 (U8 activations, S8 per-channel weights) calibrated on random inputs.

Weights are random (untrained; BN statistics randomised): speed does not depend on them, and
no accuracy is claimed here. Throughput is batch / median latency over `--iters` timed runs
after `--warmup` runs; torch and ORT use the same thread count. Prints a markdown table with the
machine, date, versions and command.
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from benchmarks.engine_lib import ort_session, random_model, throughput
from benchmarks.machine import describe_cpu

ENGINES = ("pytorch", "ort-unfused", "ort-fused", "ort-fp16", "ort-int8")


def build_engines(
    name: str, args: argparse.Namespace, work: Path
) -> dict[str, Callable[[np.ndarray], object]]:
    """One callable per engine for model preset `name` (random weights)."""
    import torch

    from export.fold import fold_batchnorms
    from export.fp16 import convert_fp16
    from export.int8 import int8_settings, quantize_int8
    from export.onnx_export import export_onnx, save_onnx

    overrides = {"width": args.width} if args.width else {}
    model = random_model(name, **overrides)
    shape = (3, args.size, args.size)
    folded = fold_batchnorms(model)[0]
    core = export_onnx(folded, shape)
    calibration = np.random.default_rng(0).standard_normal((16, *shape)).astype(np.float32)
    files = {
        "ort-unfused": save_onnx(export_onnx(model, shape, optimize=False), work / f"{name}.unfused.onnx"),
        "ort-fused": save_onnx(core, work / f"{name}.onnx"),
        "ort-fp16": save_onnx(convert_fp16(core)[0], work / f"{name}.fp16.onnx"),
        "ort-int8": save_onnx(
            quantize_int8(core, calibration, int8_settings("cpu")), work / f"{name}.int8.onnx"
        ),
    }
    threads = torch.get_num_threads()
    engines: dict[str, Callable[[np.ndarray], object]] = {}

    def eager(x: np.ndarray) -> object:
        with torch.inference_mode():
            return model(torch.from_numpy(x))

    engines["pytorch"] = eager
    for key, path in files.items():
        session = ort_session(path, threads, optimize=key != "ort-unfused")
        engines[key] = lambda x, s=session: s.run(None, {"input": x})
    return engines


def measure(args: argparse.Namespace, work: Path) -> list[tuple[str, int, dict[str, float]]]:
    """Rows of (model, batch, {engine: images/s})."""
    rows = []
    for name in args.models:
        engines = build_engines(name, args, work)
        for batch in args.batches:
            x = (
                np.random.default_rng(batch)
                .standard_normal((batch, 3, args.size, args.size))
                .astype(np.float32)
            )
            speeds = {
                key: throughput(lambda f=fn, x=x: f(x), batch, args.iters, args.warmup)
                for key, fn in engines.items()
            }
            rows.append((name, batch, speeds))
            print(
                f"  {name} batch {batch}: " + ", ".join(f"{k} {v:.1f}" for k, v in speeds.items()),
                file=sys.stderr,
            )
    return rows


def markdown(rows: list[tuple[str, int, dict[str, float]]], args: argparse.Namespace) -> str:
    """The results table with its context (machine, date, versions, command)."""
    import onnxruntime
    import torch

    lines = [
        f"## Export engines on CPU ({args.size}x{args.size}, random weights)",
        "",
        f"- machine: {describe_cpu()}, {torch.get_num_threads()} threads",
        f"- date: {dt.date.today().isoformat()}",
        f"- torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, "
        f"python {platform.python_version()}",
        f"- command: `{' '.join(sys.argv)}`; median of {args.iters} runs after {args.warmup} warm-up",
        "- images/s (ratio to PyTorch eager); ort-fp16 on CPU measures casts around FP32 compute",
        "",
        "| model | batch | " + " | ".join(ENGINES) + " |",
        "|---|---:|" + "---:|" * len(ENGINES),
    ]
    for name, batch, speeds in rows:
        base = speeds["pytorch"]
        cells = [f"{speeds[e]:.1f} ({speeds[e] / base:.2f}x)" for e in ENGINES]
        lines.append(f"| {name} | {batch} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, measure, print (and optionally write) the markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "resnet50"], help="model presets")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--size", type=int, default=224, help="input side (default 224)")
    parser.add_argument("--width", type=int, default=None, help="override the first-stage width (smoke runs)")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--output", type=Path, help="also write the table to this file")
    args = parser.parse_args(argv)
    import tempfile

    with tempfile.TemporaryDirectory(prefix="kiln-bench-") as tmp:
        table = markdown(measure(args, Path(tmp)), args)
    print(table)
    if args.output:
        args.output.write_text(table, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
