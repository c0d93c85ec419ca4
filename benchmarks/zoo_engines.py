"""Engine table for the classic CNN zoo on CPU: PyTorch eager vs ONNX Runtime fused FP32 vs INT8.

    .venv/bin/python benchmarks/zoo_engines.py                  # the full table (224², batch 8)
    .venv/bin/python benchmarks/zoo_engines.py --quick          # a smoke run (64², 2 models)

Each network is its preset at 1000 classes with random weights (seed 0; BN running statistics
randomised, see engine_lib.random_model), in eval mode. Engines:
- eager NCHW / eager CL: the unfolded model in ``torch.inference_mode``, FP32, contiguous NCHW
  and channels_last (input converted inside the timed call); "eager" below is the faster one.
- ort-fp32: BN folded (export.fold) → ONNX (export.onnx_export) → ORT CPU, graph optimisation
  level ALL (ORT's own Conv+activation fusions on top of the folding).
- ort-int8: export.int8.quantize_int8 of that graph with int8_settings("cpu"): quant_pre_process,
  static QDQ, U8 activations, S8 per-channel weights, MinMax calibration on `--calibration`
  random N(0, 1) images (the scale of normalised images; random weights make real images no
  more meaningful), `--calibration-batch` at a time (its memory grows with the batch: with 32 at
  224², all networks in one process, ResNet-200's calibration was killed for memory at 24 GiB).

Speed: batch `--batch`, `--warmup` calls per engine, then `--iters` rounds with one timed call
of each engine per round (interleaved, so a load change hits all columns alike); images/s =
batch / median latency; torch and ORT both use `--threads` threads. Numerics: the logits of each
engine on `--check` other random images against eager NCHW: max |Δlogit|, that over the row's
largest |logit| (relative), and top-1 agreement. With random weights the logits of a 1000-way
head are close together, so top-1 agreement is a harsher test than on a trained model.
Each network is measured in its own worker process, so its memory is returned to the OS before
the next one. The FP32 and INT8 ONNX files are kept under `--work` (git-ignored benchmarks/out/zoo).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime as dt
import multiprocessing
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from benchmarks.engine_lib import OtherCpu, interleaved_latencies, load_average, ort_session, random_model
from benchmarks.machine import describe_cpu

MODELS = ("alexnet", "vgg16", "googlenet", "densenet121", "resnet50", "preact_resnet200")
QUICK_MODELS = ("alexnet", "densenet121")
ENGINES = ("eager-nchw", "eager-cl", "ort-fp32", "ort-int8")
Engine = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True, kw_only=True)
class Parity:
    """One engine's logits against eager NCHW on the check images."""

    max_abs: float
    max_rel: float
    agreement: float


@dataclass(frozen=True, kw_only=True)
class Built:
    """One network's engines and facts about building them."""

    engines: dict[str, Engine]
    params: int
    fold: str  # export.fold's summary
    onnx_mb: dict[str, float]
    build_s: float  # fold + export + quantize


@dataclass(frozen=True, kw_only=True)
class ZooRow:
    """Everything measured for one network."""

    name: str
    params: int
    load1: float
    others: float | None  # cores used by other processes while timing
    steal: float | None  # cores stolen by the hypervisor while timing
    speeds: dict[str, float]  # images/s per engine
    parity: dict[str, Parity]  # per engine except eager-nchw (the reference)
    logit_scale: float  # largest |logit| of the reference on the check images
    fold: str  # export.fold's summary
    onnx_mb: dict[str, float]
    build_s: float
    peak_rss_gb: float = 0.0  # of the process that measured this network

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ZooRow:
        """Inverse of dataclasses.asdict (rows come back from a worker process as plain dicts)."""
        parity = {key: Parity(**value) for key, value in data["parity"].items()}
        return cls(**{**data, "parity": parity})

    @property
    def eager(self) -> tuple[str, float]:
        """(layout, images/s) of the faster eager layout."""
        key = max(("eager-nchw", "eager-cl"), key=self.speeds.__getitem__)
        return ("NCHW" if key == "eager-nchw" else "CL"), self.speeds[key]


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def build_engines(name: str, args: argparse.Namespace) -> Built:
    """One logits function per engine for preset `name`, and facts about the build."""
    import torch

    from export.fold import fold_batchnorms
    from export.int8 import int8_settings, quantize_int8
    from export.onnx_export import export_onnx, save_onnx
    from training.models import count_parameters

    start = time.perf_counter()
    model = random_model(name, num_classes=1000)
    model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    shape = (3, args.size, args.size)
    folded, report = fold_batchnorms(model)
    core = export_onnx(folded, shape)
    del folded
    stem = args.work / (name if args.size == 224 else f"{name}-{args.size}")
    fp32 = save_onnx(core, stem.with_suffix(".fp32.onnx"))
    _log(f"  {name}: exported ({report.summary()}) in {time.perf_counter() - start:.0f} s")
    calibration = np.random.default_rng(1).standard_normal((args.calibration, *shape), dtype=np.float32)
    settings = int8_settings("cpu", calibration_samples=args.calibration)
    quantized = quantize_int8(core, calibration, settings, batch_size=args.calibration_batch)
    int8 = save_onnx(quantized, stem.with_suffix(".int8.onnx"))
    del core, calibration, quantized
    build_s = time.perf_counter() - start
    _log(f"  {name}: quantized ({args.calibration} calibration images) at {build_s:.0f} s")

    def eager(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(x)).numpy()

    def eager_cl(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model_cl(torch.from_numpy(x).contiguous(memory_format=torch.channels_last)).numpy()

    engines: dict[str, Engine] = {"eager-nchw": eager, "eager-cl": eager_cl}
    for key, path in (("ort-fp32", fp32), ("ort-int8", int8)):
        session = ort_session(path, args.threads)
        engines[key] = lambda x, s=session: s.run(["logits"], {"input": x})[0]
    return Built(
        engines=engines,
        params=count_parameters(model),
        fold=report.summary(),
        onnx_mb={"ort-fp32": fp32.stat().st_size / 1e6, "ort-int8": int8.stat().st_size / 1e6},
        build_s=build_s,
    )


def measure_model(name: str, args: argparse.Namespace) -> ZooRow:
    """Build, check numerics, then time the engines of one network (interleaved)."""
    from export.parity import Tolerance, compare_outputs, run_batched

    built = build_engines(name, args)
    engines = built.engines
    check = np.random.default_rng(2).standard_normal((args.check, 3, args.size, args.size), dtype=np.float32)
    logits = {key: run_batched(fn, check, args.batch) for key, fn in engines.items()}
    reference = logits["eager-nchw"]
    parity = {}
    for key in ENGINES[1:]:
        result = compare_outputs(
            reference, logits[key], reference.argmax(axis=1), Tolerance(), artefact=key, precision=""
        )
        parity[key] = Parity(
            max_abs=result.max_abs_err, max_rel=result.max_rel_err, agreement=result.top1_agreement
        )
    x = np.ascontiguousarray(check[: args.batch])
    load1 = load_average()
    calls = {key: (lambda f=fn: f(x)) for key, fn in engines.items()}
    with OtherCpu() as other:
        times = interleaved_latencies(calls, args.iters, args.warmup)
    speeds = {key: args.batch / statistics.median(t) for key, t in times.items()}
    spread = ", ".join(f"{k} {min(t) * 1e3:.0f}-{max(t) * 1e3:.0f} ms" for k, t in times.items())
    rates = ", ".join(f"{k} {v:.1f}" for k, v in speeds.items())
    _log(f"  {name}: load {load1:.2f}, others {_cores(other.others)}, steal {_cores(other.steal)}; {rates}")
    _log(f"  {name}: latency range {spread}")
    _log(f"  {name}: vs eager NCHW " + "; ".join(f"{k} {_parity_cell(p)}" for k, p in parity.items()))
    return ZooRow(
        name=name,
        params=built.params,
        load1=load1,
        others=other.others,
        steal=other.steal,
        speeds=speeds,
        parity=parity,
        logit_scale=float(np.abs(reference).max()),
        fold=built.fold,
        onnx_mb=built.onnx_mb,
        build_s=built.build_s,
    )


def _measure_in_child(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """measure_model in a fresh worker process, as a plain dict (with the worker's peak RSS)."""
    import torch

    torch.set_num_threads(args.threads)
    row = measure_model(name, args)
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    return {**dataclasses.asdict(row), "peak_rss_gb": peak_gb}


def _run_in_worker(name: str, args: argparse.Namespace) -> ZooRow | str:
    """The row of one network measured in a fresh process, or why that failed."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        try:
            return ZooRow.from_dict(pool.submit(_measure_in_child, name, args).result())
        except BrokenProcessPool:
            return f"{name}: the worker process died (killed for memory? see dmesg)"
        except Exception as exc:  # one network failing to export or quantize is a finding
            return f"{name}: {type(exc).__name__}: {exc}"


def measure_all(args: argparse.Namespace) -> tuple[list[ZooRow], list[str]]:
    """(rows, failures): each network in its own process, so all its memory (weights, ORT arenas,
    glibc's retained heap; VGG-16's worker peaks at ~6.5 GiB) goes back to the OS before the next."""
    rows, failures = [], []
    for name in args.models:
        _log(f"{name}: load {load_average():.2f}")
        result = _run_in_worker(name, args)
        if isinstance(result, str):
            failures.append(result)
            _log(result)
        else:
            rows.append(result)
            _log(f"{name}: done; worker peak RSS {result.peak_rss_gb:.1f} GiB")
    return rows, failures


def _cores(value: float | None) -> str:
    return "?" if value is None else f"{value:.2f}"


def _parity_cell(p: Parity) -> str:
    return f"{p.max_abs:.2g} ({p.max_rel:.1e}) / {p.agreement:.0%}"


def markdown(rows: list[ZooRow], args: argparse.Namespace, started: dt.datetime) -> str:
    """Speed and numerics tables with their context (machine, date, versions, command)."""
    import onnxruntime
    import torch

    lines = [
        f"## Classic CNN zoo: engines on CPU ({args.size}², batch {args.batch}, random weights)",
        "",
        f"- machine: {describe_cpu()}; torch and ORT at {args.threads} threads",
        f"- date: {started:%Y-%m-%d %H:%M} UTC",
        f"- torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, "
        f"python {platform.python_version()}",
        f"- command: `{' '.join(sys.argv)}`",
        f"- images/s = batch / median of {args.iters} interleaved timed calls after {args.warmup} warm-up; "
        f"INT8 calibrated on {args.calibration} random N(0, 1) images; load = 1-minute load average "
        "when the model's timing started (it counts this benchmark too); others = CPU cores used by "
        "other processes during the timing (/proc/stat minus this process)",
        "",
        "| model | params | load | others | eager NCHW | eager CL | ORT FP32 | ORT INT8 | ORT FP32 / eager | "
        "INT8 / FP32 | INT8 / eager |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        s = row.speeds
        _, eager = row.eager
        fp32, int8 = s["ort-fp32"], s["ort-int8"]
        lines.append(
            f"| {row.name} | {row.params / 1e6:.1f} M | {row.load1:.2f} | {_cores(row.others)} | "
            f"{s['eager-nchw']:.1f} | {s['eager-cl']:.1f} | {fp32:.1f} | {int8:.1f} | "
            f"{fp32 / eager:.2f}x | {int8 / fp32:.2f}x | {int8 / eager:.2f}x |"
        )
    lines += [
        "",
        "Ratios to eager use the faster eager layout. Numerics against eager NCHW on "
        f"{args.check} other random images: max |Δlogit| (relative to the row's largest |logit|) / "
        "top-1 agreement.",
        "",
        "| model | max \\|logit\\| | eager CL | ORT FP32 | ORT INT8 | BN folding | ONNX MB FP32 / INT8 | "
        "peak RSS |",
        "|---|---:|---:|---:|---:|---|---:|---:|",
    ]
    for row in rows:
        p = row.parity
        lines.append(
            f"| {row.name} | {row.logit_scale:.3g} | {_parity_cell(p['eager-cl'])} | "
            f"{_parity_cell(p['ort-fp32'])} | {_parity_cell(p['ort-int8'])} | {row.fold} | "
            f"{row.onnx_mb['ort-fp32']:.0f} / {row.onnx_mb['ort-int8']:.0f} | {row.peak_rss_gb:.1f} GiB |"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Flags; `--quick` changes the defaults of the flags not given."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--models", nargs="+", help=f"presets (default: {' '.join(MODELS)})")
    parser.add_argument("--quick", action="store_true", help="smoke run: 64², 2 models, few runs")
    parser.add_argument("--size", type=int, help="input side (default 224; quick 64)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--iters", type=int, help="timed rounds (default 10; quick 3)")
    parser.add_argument("--warmup", type=int, help="untimed calls per engine (default 2; quick 1)")
    parser.add_argument("--calibration", type=int, help="INT8 calibration images (default 256; quick 16)")
    parser.add_argument("--calibration-batch", type=int, default=8, help="images per calibration run")
    parser.add_argument("--check", type=int, help="images for the numerics check (default 32; quick 8)")
    parser.add_argument("--threads", type=int, default=2, help="torch and ORT intra-op threads")
    parser.add_argument("--work", type=Path, default=Path(__file__).parent / "out" / "zoo")
    parser.add_argument("--output", type=Path, help="also write the tables to this file")
    args = parser.parse_args(argv)
    quick = args.quick
    defaults = {
        "models": list(QUICK_MODELS if quick else MODELS),
        "size": 64 if quick else 224,
        "iters": 3 if quick else 10,
        "warmup": 1 if quick else 2,
        "calibration": 16 if quick else 256,
        "check": 8 if quick else 32,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key in ("size", "batch", "iters", "warmup", "calibration", "calibration_batch", "check", "threads"):
        if getattr(args, key) < (0 if key == "warmup" else 1):
            parser.error(f"--{key.replace('_', '-')} must be positive, got {getattr(args, key)}")
    if args.check < args.batch:
        parser.error(f"--check ({args.check}) must be at least --batch ({args.batch})")
    return args


def main(argv: list[str] | None = None) -> int:
    """Measure each network in its own process, print (and optionally write) the markdown tables."""

    args = parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    started = dt.datetime.now(dt.UTC)
    rows, failures = measure_all(args)
    table = markdown(rows, args, started) + "".join(f"\nFailed: {line}\n" for line in failures)
    print(table)
    if args.output:
        args.output.write_text(table, encoding="utf-8")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
