"""kiln.json for an export, built from serving.contract.manifest's types (serving defines the contract)."""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from export.inputs import Preprocess
from export.onnx_export import LOGITS_NAME, PROBABILITIES_NAME
from export.parity import ParityResult
from export.variants import Candidate
from serving.contract.manifest import (
    MODEL_NAME_RE,
    Artefact,
    Manifest,
    OutputSpec,
    ParityReport,
    Provenance,
)
from serving.contract.manifest_types import Fp16Range

__all__ = ["artefact_entry", "build_manifest", "fp16_range", "model_name_from", "parity_report", "provenance"]

REFERENCE = "PyTorch checkpoint ({which} weights, float32, CPU, unfolded) on the held-out {split} split"
_TRAINING_METRICS = ("best_val_acc", "best_epoch", "test_acc", "test_loss", "epochs_completed")


def model_name_from(text: str) -> str:
    """A repository-safe model name from a run id (unsafe characters become '-')."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-.") or "model"
    name = name.replace("..", ".")
    if not MODEL_NAME_RE.match(name):
        name = f"m-{name}"
    return name


# ParityReport's fields that parity_report sets itself; every other one is what the ParityResult
# measured, under the same name.
_REPORT_ONLY = {"reference", "tolerances", "passed", "forced", "note"}
_MEASURED = tuple(f.name for f in dataclasses.fields(ParityReport) if f.name not in _REPORT_ONLY)


def parity_report(result: ParityResult, *, reference: str, forced: bool) -> ParityReport:
    """serving's ParityReport from a measured result (`forced` only matters when it failed)."""
    return ParityReport(
        **{name: getattr(result, name) for name in _MEASURED},
        reference=reference,
        tolerances=result.tolerance.to_dict(),
        passed=result.passed,
        forced=forced and not result.passed,
        note="; ".join(x for x in (result.note, *result.failures) if x),
    )


def fp16_range(candidate: Candidate) -> Fp16Range | None:
    """kiln.json's FP16 range proof of a candidate: margin, largest FP32 activation, nodes kept
    in FP32 (None when it is not FP16 or no range was measured)."""
    report = candidate.fp16
    if report is None or report.ranges is None:
        return None
    tensor, largest = report.ranges.largest()
    return Fp16Range(
        margin=report.ranges.margin,
        max_abs_activation=largest,
        max_activation_tensor=tensor,
        samples=report.ranges.samples,
        kept_fp32_nodes=report.kept_fp32_nodes,
    )


def artefact_entry(version_dir: Path, candidate: Candidate, parity: ParityReport) -> Artefact:
    """The Artefact for a candidate already copied into `version_dir` (sha256 computed here)."""
    return Artefact.from_file(
        version_dir,
        candidate.filename,
        format=candidate.format,
        precision=candidate.precision,
        tensorrt=candidate.tensorrt,
        parity=parity,
        fp16_range=fp16_range(candidate),
    )


def provenance(run: Any, *, created_at: str, versions: Mapping[str, Any]) -> Provenance:
    """Provenance from a training RunInfo (run id, dataset fingerprint, the run's git commit)."""
    from training.provenance import package_version

    metrics = {k: run.metrics[k] for k in _TRAINING_METRICS if k in run.metrics}
    commit = run.git_commit if run.git_commit and run.git_commit != "unknown" else None
    return Provenance(
        run_id=run.run_id,
        dataset_fingerprint=run.dataset_fingerprint or "unknown",
        git_commit=commit,
        created_at=created_at,
        kiln_version=package_version("kiln-serve") or "unknown (not installed)",
        training_metrics=json.loads(json.dumps(metrics)),
        versions=dict(versions),
    )


def build_manifest(
    *,
    name: str,
    version: int,
    run: Any,
    pre: Preprocess,
    in_graph: bool,
    probabilities: bool,
    max_batch: int,
    artefacts: Sequence[Artefact],
    provenance: Provenance,
    extra: Mapping[str, Any],
) -> Manifest:
    """The whole kiln.json of one version."""
    classes = len(run.class_names)
    outputs = [OutputSpec(name=LOGITS_NAME, datatype="FP32", shape=(-1, classes), kind="logits")]
    if probabilities:
        outputs.append(
            OutputSpec(name=PROBABILITIES_NAME, datatype="FP32", shape=(-1, classes), kind="probabilities")
        )
    return Manifest(
        name=name,
        version=version,
        architecture=json.loads(json.dumps(run.model_config.to_dict())),
        labels=tuple(run.class_names),
        input=pre.input_spec(in_graph),
        outputs=tuple(outputs),
        artefacts=tuple(artefacts),
        max_batch_size=max_batch,
        provenance=provenance,
        extra=json.loads(json.dumps(dict(extra))),
    )
