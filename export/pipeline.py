"""`export_run`: a training run → proven artefacts → one new version in a model repository.

Each step is followed by its check: fold → fold equivalence (float64 and float32), export →
full ONNX check and no BatchNormalization left, every artefact → parity against the unfolded
PyTorch checkpoint on held-out data. If any artefact misses its tolerance, nothing is published
(a version is one unit) unless `force`, which publishes it with the override recorded.

An image run exports, by default, a graph that takes uint8 NHWC pixels and does the
scale/normalise/transpose itself (a quarter of the FP32 bytes on the wire and over PCIe);
`preprocess_in_graph=False` keeps the float32 NCHW input. A signal run (run.json input kind
"signal", layout NCL) exports a graph that takes the raw float32 signal [N, C, L] and applies the
training normalisation at its front. Parity is always measured on what the graph takes (uint8
pixels, float32 NCHW, raw signals) against PyTorch on the normalised input.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from export.distribution import prediction_distribution
from export.fold import FoldReport, fold_batchnorms, verify_fold
from export.fp16 import Fp16Report
from export.fp16_range import DEFAULT_FP16_RANGE_MARGIN, ActivationRanges, measure_activation_ranges
from export.inputs import ImageSet, Preprocess, preprocess_from_run_input, sample_split
from export.manifest_build import (
    REFERENCE,
    artefact_entry,
    build_manifest,
    model_name_from,
    parity_report,
    provenance,
)
from export.onnx_export import OPSET, export_onnx
from export.parity import (
    DEFAULT_TOLERANCES,
    FP16_CPU_NOTE,
    ParityResult,
    Tolerance,
    compare_outputs,
    onnx_runner,
    run_batched,
    torch_logits,
)
from export.variants import PRECISIONS, Candidate, GraphOptions, build_onnx_variants, build_plan_variants

__all__ = ["ExportError", "ExportRequest", "ExportResult", "ParityGateError", "export_run"]

Progress = Callable[[str], None]


class ExportError(ValueError):
    """The request cannot be carried out (bad run dir, checkpoint, data, repo path); exit 2."""


class ParityGateError(RuntimeError):
    """Artefacts missed their tolerance and were not forced: nothing was published."""

    def __init__(self, results: tuple[ParityResult, ...]) -> None:
        self.results = results
        failed = [r for r in results if not r.passed]
        super().__init__(
            "parity gate refused " + "; ".join(f"{r.artefact}: {', '.join(r.failures)}" for r in failed)
        )


@dataclass(frozen=True, kw_only=True)
class ExportRequest:
    """Everything `kiln export` was asked to do."""

    run_dir: Path
    repo: Path
    name: str | None = None
    version: int | None = None
    precisions: tuple[str, ...] = ("fp32",)
    # images: None or True = uint8 NHWC in, normalised in the graph (the default); False = FP32
    # NCHW in. Signals always normalise in the graph and refuse an explicit value.
    preprocess_in_graph: bool | None = None
    probabilities: bool = False
    max_batch: int = 64
    calibration_samples: int = 256
    parity_samples: int | None = 2000  # None = the whole held-out split
    tensorrt: bool = False
    timing_cache: Path | None = None
    ort_optimized: bool = False
    force: bool = False
    which: str = "best"
    opset: int = OPSET
    fp16_range_margin: float = DEFAULT_FP16_RANGE_MARGIN  # FP16 activations must stay <= 65504 / this
    tolerances: dict[str, Tolerance] = field(default_factory=lambda: dict(DEFAULT_TOLERANCES))

    def __post_init__(self) -> None:
        bad = [p for p in self.precisions if p not in PRECISIONS]
        if bad or not self.precisions or len(set(self.precisions)) != len(self.precisions):
            raise ExportError(
                f"bad precision list {list(self.precisions)}; choose from {', '.join(PRECISIONS)}"
            )
        for key in ("max_batch", "calibration_samples"):
            if getattr(self, key) < 1:
                raise ExportError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.parity_samples is not None and self.parity_samples < 1:
            raise ExportError(f"parity_samples must be >= 1, got {self.parity_samples}")
        if not 1.0 <= self.fp16_range_margin < float("inf"):
            raise ExportError(f"fp16_range_margin must be a finite number >= 1, got {self.fp16_range_margin}")
        if self.version is not None and self.version < 1:
            raise ExportError(f"version must be >= 1, got {self.version}")
        missing = [p for p in self.precisions if p not in self.tolerances]
        if missing:
            raise ExportError(f"no tolerance given for {missing}")


@dataclass(frozen=True, kw_only=True)
class ExportResult:
    """What happened: the published version (None if refused) and the evidence."""

    name: str
    version: int | None
    path: Path | None
    parity: tuple[ParityResult, ...]
    fold: FoldReport
    fold_errors: dict[str, float]
    forced: tuple[str, ...]
    fp16: Fp16Report | None = None  # the FP16 ONNX artefact's conversion report (range proof)


@dataclass(frozen=True, kw_only=True)
class _Loaded:
    model: Any
    run: Any
    pre: Preprocess
    held_out: ImageSet
    split: str
    calibration: np.ndarray | None

    def in_graph(self, request: ExportRequest) -> bool:
        """Whether the graph normalises its input: always for signals, by default for images."""
        return self.pre.is_signal or request.preprocess_in_graph is not False


def _load(request: ExportRequest) -> _Loaded:
    """Run, model and samples; every expected failure becomes one ExportError line."""
    from training.checkpoint import CheckpointError, load_model
    from training.data import DataError, load_dataset
    from training.models import ModelConfigError

    if request.repo.exists() and not request.repo.is_dir():
        raise ExportError(f"--repo {request.repo} is a file, not a directory")
    try:
        model, run = load_model(request.run_dir, which=request.which)
        pre = preprocess_from_run_input(run.input)
        if pre.is_signal and request.preprocess_in_graph is not None:
            raise ExportError(
                "--preprocess-in-graph/--fp32-input are for image models: a signal model always "
                "normalises in the graph (it takes raw float32 [N, C, L])"
            )
        bundle = load_dataset(run.data_spec)
    except (CheckpointError, ModelConfigError, DataError, ValueError) as exc:
        raise ExportError(str(exc)) from exc
    if bundle.is_signal != pre.is_signal or tuple(bundle.input_shape) != pre.input_shape:
        kind = "signal" if pre.is_signal else "image"
        raise ExportError(
            f"run.json describes a {kind} input of shape {list(pre.input_shape)} but its dataset "
            f"{run.data_spec.name!r} gives {'signals' if bundle.is_signal else 'images'} of shape "
            f"{list(bundle.input_shape)}"
        )
    split = "test" if len(bundle.test) else "val"
    held_out = sample_split(getattr(bundle, split), request.parity_samples)
    calibration = None
    if {"int8", "fp16"} & set(request.precisions):  # INT8 calibrates on it, FP16 proves its range
        calibration = pre(sample_split(bundle.train, request.calibration_samples, seed=1).images)
    return _Loaded(model=model, run=run, pre=pre, held_out=held_out, split=split, calibration=calibration)


def _runner(candidate: Candidate) -> tuple[Callable[[np.ndarray], np.ndarray], str]:
    if candidate.format == "tensorrt_plan":
        from export.tensorrt_build import plan_runner

        return plan_runner(candidate.path)
    return onnx_runner(candidate.path)


def _verify(
    candidates: list[Candidate], loaded: _Loaded, request: ExportRequest, progress: Progress
) -> tuple[ParityResult, ...]:
    """Parity of every candidate against the unfolded PyTorch model on the held-out samples."""
    held = loaded.held_out
    reference = torch_logits(loaded.model, loaded.pre(held.images))
    if loaded.pre.is_signal:
        inputs = held.images  # raw float32 [N, C, L]: the graph normalises
    elif loaded.in_graph(request):
        inputs = held.nhwc()  # uint8 pixels: the graph scales, normalises and transposes
    else:
        inputs = loaded.pre(held.images)
    results = []
    for cand in candidates:
        progress(f"parity {cand.filename}")
        run, runtime = _runner(cand)
        outputs = run_batched(run, inputs, request.max_batch)
        on_cpu_fp16 = cand.precision == "fp16" and cand.format == "onnx"
        result = compare_outputs(
            reference,
            outputs,
            held.labels,
            request.tolerances[cand.precision],
            artefact=cand.filename,
            precision=cand.precision,
            runtime=runtime,
            note=FP16_CPU_NOTE if on_cpu_fp16 else "",
        )
        if cand.precision == "fp32" and cand.format == "onnx":  # the server's drift reference
            result = dataclasses.replace(result, distribution=prediction_distribution(outputs))
        results.append(result)
    return tuple(results)


def _fp16_ranges(core: Any, loaded: _Loaded, request: ExportRequest) -> ActivationRanges | None:
    """FP16's range proof: the FP32 core graph's activation ranges on the calibration and held-out
    inputs, so nodes past 65504 / `fp16_range_margin` stay FP32 (the CPU parity gate cannot see
    FP16 overflow: ORT's CPU provider computes FP16 graphs in FP32)."""
    if "fp16" not in request.precisions:
        return None
    inputs = [loaded.pre(loaded.held_out.images)]
    if loaded.calibration is not None:
        inputs.insert(0, loaded.calibration)
    return measure_activation_ranges(
        core, inputs, margin=request.fp16_range_margin, batch_size=request.max_batch
    )


def _build(
    core: Any, loaded: _Loaded, request: ExportRequest, work: Path, progress: Progress
) -> list[Candidate]:
    options = GraphOptions(
        preprocess=loaded.pre if loaded.in_graph(request) else None, probabilities=request.probabilities
    )
    if "fp16" in request.precisions:
        progress("fp16 range proof")
    common = {
        "options": options,
        "calibration": loaded.calibration,
        "calibration_samples": request.calibration_samples,
        "fp16_ranges": _fp16_ranges(core, loaded, request),
    }
    progress("precision variants")
    candidates = build_onnx_variants(
        core, request.precisions, work, ort_optimized=request.ort_optimized, **common
    )
    if request.tensorrt:
        progress("tensorrt engines")
        candidates += build_plan_variants(
            core,
            request.precisions,
            work,
            max_batch=request.max_batch,
            timing_cache=request.timing_cache,
            **common,
        )
    return candidates


def _versions(tensorrt: bool) -> dict[str, Any]:
    from training.provenance import git_commit, versions

    found: dict[str, Any] = dict(versions("torch", "onnx", "onnxruntime", "onnxscript", "numpy"))
    if tensorrt:
        found["tensorrt"] = __import__("tensorrt").__version__
    found["export_git_commit"] = git_commit()
    return found


def _publish(
    request: ExportRequest,
    loaded: _Loaded,
    candidates: list[Candidate],
    results: tuple[ParityResult, ...],
    extra: dict[str, Any],
) -> tuple[str, Any]:
    from serving.contract.repository import publish_version
    from training.provenance import utc_now

    name = _model_name(request, loaded)
    reference = REFERENCE.format(which=request.which, split=loaded.split)
    prov = provenance(loaded.run, created_at=utc_now(), versions=_versions(request.tensorrt))

    def populate(tmp: Path, version: int) -> Any:
        entries = []
        for cand, result in zip(candidates, results, strict=True):
            shutil.copyfile(cand.path, tmp / cand.filename)
            entries.append(
                artefact_entry(tmp, cand, parity_report(result, reference=reference, forced=request.force))
            )
        return build_manifest(
            name=name,
            version=version,
            run=loaded.run,
            pre=loaded.pre,
            in_graph=loaded.in_graph(request),
            probabilities=request.probabilities,
            max_batch=request.max_batch,
            artefacts=entries,
            provenance=prov,
            extra=extra,
        )

    return name, publish_version(request.repo, name, populate, version=request.version)


def _model_name(request: ExportRequest, loaded: _Loaded) -> str:
    return request.name or model_name_from(loaded.run.run_id)


def export_run(request: ExportRequest, progress: Progress | None = None) -> ExportResult:
    """Export, prove and publish one run. Raises ExportError (bad input) or ParityGateError."""
    say = progress or (lambda _step: None)
    if request.tensorrt:
        from export.tensorrt_build import tensorrt_missing

        if reason := tensorrt_missing():
            raise ExportError(reason)
    say("load checkpoint and data")
    loaded = _load(request)
    if (
        request.version is not None
        and (request.repo / _model_name(request, loaded) / str(request.version)).exists()
    ):
        raise ExportError(
            f"version {request.version} of {_model_name(request, loaded)} already exists in {request.repo}"
        )
    say("fold batchnorm")
    folded, report = fold_batchnorms(loaded.model)
    fold_errors = verify_fold(loaded.model, folded, loaded.pre.input_shape)
    say("export onnx")
    core = export_onnx(folded, loaded.pre.input_shape, opset=request.opset)
    with tempfile.TemporaryDirectory(prefix="kiln-export-") as tmp:
        candidates = _build(core, loaded, request, Path(tmp), say)
        results = _verify(candidates, loaded, request, say)
        failed = tuple(r.artefact for r in results if not r.passed)
        if failed and not request.force:
            raise ParityGateError(results)
        say("publish")
        extra = {
            "fold": {"family": loaded.run.model_config.arch, **report.to_dict(), "max_rel_err": fold_errors},
            "onnx": {"opset": request.opset, "exporter": "torch.onnx.export(dynamo=True)"},
            "artefact_details": {c.filename: c.details for c in candidates},
            "held_out_split": loaded.split,
        }
        name, published = _publish(request, loaded, candidates, results, extra)
    return ExportResult(
        name=name,
        version=published.version,
        path=published.path,
        parity=results,
        fold=report,
        fold_errors=fold_errors,
        forced=failed,
        fp16=next((c.fp16 for c in candidates if c.fp16 is not None and c.format == "onnx"), None),
    )
