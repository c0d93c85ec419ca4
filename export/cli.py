"""`kiln export RUN_DIR --repo DIR ...`: fold, export, prove and publish a trained run.

Exit codes: 0 published; 1 an artefact failed verification (parity gate, fold or ONNX check;
nothing published); 2 bad input (missing/corrupt checkpoint, unknown architecture, repo path
that is a file, bad precision name, existing version). Heavy imports happen inside `run`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

__all__ = ["add_arguments", "parity_table", "run"]

_PRECISIONS = ("fp32", "fp16", "int8")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register `kiln export`'s arguments."""
    parser.add_argument(
        "run_dir", type=Path, help="training run directory (run.json + checkpoint.safetensors)"
    )
    parser.add_argument(
        "--repo", type=Path, required=True, help="model repository folder (created if absent)"
    )
    parser.add_argument("--name", help="model name in the repository (default: the run id)")
    parser.add_argument("--version", type=int, help="version number (default: latest + 1)")
    parser.add_argument(
        "--precision", default="fp32", help="comma-separated precisions: fp32,fp16,int8 (default: fp32)"
    )
    _add_input_arguments(parser)
    parser.add_argument("--probabilities", action="store_true", help="add a softmax 'probabilities' output")
    parser.add_argument("--max-batch", type=int, default=64, help="largest batch served (default: 64)")
    parser.add_argument(
        "--calibration-samples",
        type=int,
        default=256,
        help="train samples for INT8 calibration (default: 256)",
    )
    parser.add_argument(
        "--parity-samples",
        type=int,
        default=2000,
        help="held-out samples for the parity gate (default: 2000)",
    )
    parser.add_argument("--which", choices=("best", "last"), default="best", help="checkpoint to export")
    parser.add_argument("--tensorrt", action="store_true", help="also build TensorRT plans (needs a GPU)")
    parser.add_argument("--timing-cache", type=Path, help="TensorRT timing cache file (read and updated)")
    parser.add_argument("--ort-optimized", action="store_true", help="also save ORT's offline-optimised copy")
    parser.add_argument("--force", action="store_true", help="publish artefacts that miss their tolerance")
    parser.add_argument(
        "--fp16-range-margin",
        type=float,
        default=4.0,
        help="FP16: nodes whose FP32 activations exceed 65504 / this on the calibration and held-out "
        "data stay FP32 (default: 4, i.e. 16376)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress display")


def _add_input_arguments(parser: argparse.ArgumentParser) -> None:
    """Image models take uint8 NHWC pixels by default (4x fewer bytes than FP32 on the wire);
    the FP32 NCHW input is one flag away. Signal models take raw float32 and refuse both flags."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--preprocess-in-graph",
        dest="preprocess_in_graph",
        action="store_const",
        const=True,
        default=None,
        help="image models: take uint8 NHWC pixels, scale/normalise/transpose in the graph (the default)",
    )
    group.add_argument(
        "--no-preprocess-in-graph",
        "--fp32-input",
        dest="preprocess_in_graph",
        action="store_const",
        const=False,
        help="image models: take normalised float32 NCHW instead (the client preprocesses); "
        "signal models always take raw float32 [N, C, L] and normalise in the graph",
    )


def _fail(message: str, code: int = 2) -> int:
    print(f"kiln export: error: {message}", file=sys.stderr)
    return code


def _precisions(text: str) -> tuple[str, ...]:
    parts = tuple(p.strip().lower() for p in text.split(",") if p.strip())
    bad = [p for p in parts if p not in _PRECISIONS]
    if bad or not parts:
        raise ValueError(
            f"bad --precision {text!r}: unknown {bad or 'empty list'}; choose from fp32,fp16,int8"
        )
    return tuple(dict.fromkeys(parts))


def _request(args: argparse.Namespace) -> Any:
    from export.pipeline import ExportRequest
    from serving.contract.manifest import MODEL_NAME_RE

    if args.name is not None and (not MODEL_NAME_RE.match(args.name) or ".." in args.name):
        raise ValueError(f"bad --name {args.name!r}: use letters, digits, '_', '.', '-' (no '..')")
    if not args.run_dir.is_dir():
        raise ValueError(f"run directory {args.run_dir} does not exist")
    if args.repo.exists() and not args.repo.is_dir():
        raise ValueError(f"--repo {args.repo} is a file, not a directory")
    # Every option is named as the request field it sets; --precision is parsed into `precisions`.
    fields = {f.name for f in dataclasses.fields(ExportRequest)}
    options = {key: value for key, value in vars(args).items() if key in fields}
    return ExportRequest(**options, precisions=_precisions(args.precision))


def parity_table(results: Any, title: str) -> Table:
    """A rich table of parity results: which artefact passed, failed (by how much) or was forced."""
    table = Table(title=title)
    table.add_column("artefact", no_wrap=True)
    table.add_column("prec")
    for column in ("n", "max abs", "max rel", "agree", "acc (ref)"):
        table.add_column(column, justify="right")
    table.add_column("verdict")
    for r in results:
        verdict = "[green]pass[/]" if r.passed else "[red]FAIL[/] " + "; ".join(r.failures)
        table.add_row(
            r.artefact,
            r.precision,
            str(r.samples),
            f"{r.max_abs_err:.2g}",
            f"{r.max_rel_err:.2g}",
            f"{r.top1_agreement:.1%}",
            f"{r.accuracy:.1%} ({r.reference_accuracy:.1%})",
            verdict,
        )
    return table


def _export(request: Any, console: Console, show: bool) -> Any:
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from export.pipeline import export_run

    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(*columns, console=console, disable=not show, transient=True) as progress:
        task = progress.add_task("starting", total=None)
        started = [time.perf_counter(), ""]

        def step(name: str) -> None:
            if started[1] and show:
                console.print(f"[green]✓[/] {started[1]} ({time.perf_counter() - started[0]:.1f}s)")
            started[:] = [time.perf_counter(), name]
            progress.update(task, description=name)

        result = export_run(request, progress=step)
        step("")
    return result


def run(args: argparse.Namespace) -> int:
    """Entry point of `kiln export`; returns the exit code (see the module docstring)."""
    console = Console(stderr=True)
    try:
        request = _request(args)
    except ValueError as exc:
        return _fail(str(exc))
    from export.fold import FoldError
    from export.fp16 import Fp16Error
    from export.onnx_export import OnnxExportError
    from export.pipeline import ExportError, ParityGateError
    from export.tensorrt_build import TensorRTError
    from serving.contract.manifest import ManifestError
    from serving.contract.repository import RepositoryError

    try:
        result = _export(request, console, show=not args.no_progress)
    except ParityGateError as exc:
        console.print(
            parity_table(exc.results, "parity gate: REFUSED (nothing published; --force overrides)")
        )
        failed = [r.artefact for r in exc.results if not r.passed]
        return _fail(f"{len(failed)} artefact(s) failed the parity gate: {', '.join(failed)}", 1)
    except (ExportError, RepositoryError, ManifestError) as exc:
        return _fail(str(exc))
    except (FoldError, OnnxExportError, Fp16Error, TensorRTError) as exc:
        return _fail(str(exc), 1)
    out = Console()
    out.print(parity_table(result.parity, f"{result.name} v{result.version}: parity vs PyTorch"))
    errors = ", ".join(f"{k} {v:.2g}" for k, v in result.fold_errors.items())
    out.print(f"fold: {result.fold.summary()}; max rel err vs unfolded: {errors}")
    for group in result.fold.kept_by_cause():
        out.print(f"  {group['count']} kept as affine (Mul+Add), {group['cause']}: {group['why']}")
    if result.fp16 is not None and result.fp16.ranges is not None:
        tensor, largest = result.fp16.ranges.largest()
        out.print(
            f"fp16 range: largest FP32 activation {largest:.3g} ({tensor}), limit "
            f"{result.fp16.ranges.limit:g}; {len(result.fp16.kept_fp32_nodes)} node(s) kept in FP32"
        )
    if result.forced:
        out.print(f"[yellow]forced past tolerance (recorded in kiln.json): {', '.join(result.forced)}[/]")
    out.print(f"published {result.path}")
    return 0
