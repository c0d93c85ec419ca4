"""Leaf types of kiln.json (see serving.contract.manifest, which re-exports them): artefacts,
their parity and TensorRT records, provenance. The tensor specs are in serving/contract/io_spec.py.

Each frozen keyword-only dataclass checks its values in __post_init__ (lists become tuples), so an
invalid object cannot be built by code either; from_dict adds strict key checks on top.
"""

from __future__ import annotations

import itertools
import os
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar

from serving.contract.fileio import sha256_file
from serving.contract.io_spec import DATATYPES
from serving.contract.io_spec import NUMPY_DTYPES as NUMPY_DTYPES  # re-exported (backends read it)
from serving.contract.schema_checks import (
    JsonMixin,
    as_bool,
    as_choice,
    as_float,
    as_int,
    as_json_dict,
    as_optional,
    as_str,
    as_tuple,
    fail,
    setattrs,
)

MANIFEST_FILENAME = "kiln.json"
MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_CC_RE = re.compile(r"^\d+\.\d+$")

FORMATS = ("onnx", "tensorrt_plan")
PRECISIONS = ("fp32", "fp16", "int8")


def check_model_name(value: Any, field_name: str) -> str:
    """A model name that is safe as a folder name (no path traversal)."""
    name = as_str(value, field_name)
    if not MODEL_NAME_RE.match(name) or ".." in name:
        fail(field_name, f"invalid model name {name!r} (allowed: {MODEL_NAME_RE.pattern}, no '..')")
    return name


def _check_relpath(value: Any, field_name: str) -> str:
    """A relative POSIX path that stays inside the version folder."""
    text = as_str(value, field_name)
    path = PurePosixPath(text)
    if "\\" in text or path.is_absolute() or ".." in path.parts or text.startswith("~"):
        fail(field_name, f"must be a relative path inside the version folder, got {text!r}")
    if path.name == MANIFEST_FILENAME or str(path) != text or text in ("", "."):
        fail(field_name, f"not a plain artefact file name, got {text!r}")
    return text


def _check_sha256(value: Any, field_name: str) -> str:
    text = as_str(value, field_name)
    if not _SHA256_RE.match(text):
        fail(field_name, f"expected 64 lowercase hex characters, got {text!r:.80}")
    return text


@dataclass(frozen=True, kw_only=True)
class TensorRTInfo(JsonMixin):
    """What a TensorRT plan was built for; engines are not portable across GPU/version."""

    version: str  # TensorRT version, e.g. "10.7.0"
    gpu_name: str  # e.g. "NVIDIA H100 80GB HBM3"
    compute_capability: str  # "major.minor", e.g. "9.0"
    tf32: bool | None = None
    batch_profile: tuple[int, int, int] | None = None  # (min, opt, max) of the batch dim

    def __post_init__(self) -> None:
        as_str(self.version, "version")
        as_str(self.gpu_name, "gpu_name")
        if not _CC_RE.match(as_str(self.compute_capability, "compute_capability")):
            fail("compute_capability", f"expected 'major.minor', got {self.compute_capability!r}")
        as_optional(self.tf32, "tf32", as_bool)
        if self.batch_profile is not None:
            prof = as_tuple(self.batch_profile, "batch_profile", as_int, minimum=1)
            if len(prof) != 3 or not prof[0] <= prof[1] <= prof[2]:
                fail("batch_profile", f"expected [min, opt, max] with min<=opt<=max, got {list(prof)}")
            setattrs(self, batch_profile=prof)


@dataclass(frozen=True, kw_only=True)
class PredictionDistribution(JsonMixin):
    """What the artefact predicts on the held-out split: the reference the server's drift gauge
    compares live traffic with (export measures it on the FP32 artefact in the parity gate)."""

    samples: int
    class_frequencies: tuple[float, ...]  # share of rows per top-1 class, in label order
    confidence_edges: tuple[float, ...]  # upper bounds of the top-1 probability bins, last 1.0
    confidence_frequencies: tuple[float, ...]  # share of rows per bin

    def __post_init__(self) -> None:
        as_int(self.samples, "samples", minimum=1)
        for name in ("class_frequencies", "confidence_edges", "confidence_frequencies"):
            setattrs(self, **{name: as_tuple(getattr(self, name), name, as_float, minimum=0.0, maximum=1.0)})
        edges = self.confidence_edges
        if not edges or edges[-1] != 1.0 or any(b <= a for a, b in itertools.pairwise(edges)):
            fail("confidence_edges", f"expected increasing upper bounds ending at 1.0, got {list(edges)}")
        if len(self.confidence_frequencies) != len(edges):
            fail("confidence_frequencies", f"expected {len(edges)} values (one per bin)")
        for name in ("class_frequencies", "confidence_frequencies"):
            if abs(sum(getattr(self, name)) - 1.0) > 1e-4:
                fail(name, "the shares must sum to 1")


@dataclass(frozen=True, kw_only=True)
class ParityReport(JsonMixin):
    """The artefact measured against the PyTorch checkpoint on held-out data."""

    reference: str  # e.g. "pytorch checkpoint.safetensors (float32, CPU)"
    samples: int
    max_abs_err: float
    max_rel_err: float
    top1_agreement: float  # fraction in [0, 1]
    accuracy: float | None = None  # fraction in [0, 1]
    reference_accuracy: float | None = None
    tolerances: dict[str, float] = field(default_factory=dict)
    passed: bool = True
    forced: bool = False  # published past its tolerance with --force
    runtime: str = ""  # e.g. "onnxruntime 1.20 CPUExecutionProvider"
    note: str = ""
    distribution: PredictionDistribution | None = None  # absent in exports made before drift

    _nested: ClassVar[dict[str, type]] = {"distribution": PredictionDistribution}

    def __post_init__(self) -> None:
        as_str(self.reference, "reference")
        as_int(self.samples, "samples", minimum=1)
        setattrs(
            self,
            max_abs_err=as_float(self.max_abs_err, "max_abs_err", minimum=0.0),
            max_rel_err=as_float(self.max_rel_err, "max_rel_err", minimum=0.0),
            top1_agreement=as_float(self.top1_agreement, "top1_agreement", minimum=0.0, maximum=1.0),
            accuracy=as_optional(self.accuracy, "accuracy", as_float, minimum=0.0, maximum=1.0),
            reference_accuracy=as_optional(
                self.reference_accuracy, "reference_accuracy", as_float, minimum=0.0, maximum=1.0
            ),
        )
        tol = as_json_dict(self.tolerances, "tolerances")
        setattrs(self, tolerances={k: as_float(v, f"tolerances.{k}") for k, v in tol.items()})
        as_bool(self.passed, "passed")
        as_bool(self.forced, "forced")
        as_str(self.runtime, "runtime", empty_ok=True)
        as_str(self.note, "note", empty_ok=True)
        if self.forced and self.passed:
            fail("forced", "only a report that did not pass can be forced")
        self._check_nested()


@dataclass(frozen=True, kw_only=True)
class Fp16Range(JsonMixin):
    """FP16 range proof: the FP32 graph's largest |activation| on calibration + held-out data.

    Nodes whose activations passed 65504 / margin were kept in FP32, because a CPU parity check
    cannot see FP16 overflow (ONNX Runtime's CPU provider computes FP16 graphs in FP32).
    """

    margin: float  # activations above 65504 / margin may not run in FP16
    max_abs_activation: float  # largest |value| of any tensor of the FP32 graph
    max_activation_tensor: str = ""
    samples: int = 1  # inputs measured
    kept_fp32_nodes: tuple[str, ...] = ()  # nodes left in FP32 (activations or weights past FP16)

    def __post_init__(self) -> None:
        setattrs(
            self,
            margin=as_float(self.margin, "margin", minimum=1.0),
            max_abs_activation=as_float(self.max_abs_activation, "max_abs_activation", minimum=0.0),
            kept_fp32_nodes=as_tuple(self.kept_fp32_nodes, "kept_fp32_nodes", as_str),
        )
        as_str(self.max_activation_tensor, "max_activation_tensor", empty_ok=True)
        as_int(self.samples, "samples", minimum=1)


@dataclass(frozen=True, kw_only=True)
class Artefact(JsonMixin):
    """One file of the version folder, with its checksum and (once measured) its parity report."""

    path: str  # relative to the version folder, e.g. "model.onnx"
    format: str  # "onnx" | "tensorrt_plan"
    precision: str  # "fp32" | "fp16" | "int8"
    sha256: str
    size_bytes: int
    tensorrt: TensorRTInfo | None = None  # required for tensorrt_plan, forbidden otherwise
    parity: ParityReport | None = None
    io_datatypes: dict[str, str] = field(default_factory=dict)  # tensor name -> datatype override
    fp16_range: Fp16Range | None = None  # FP16 artefacts exported with the range proof

    _nested: ClassVar[dict[str, type]] = {
        "tensorrt": TensorRTInfo,
        "parity": ParityReport,
        "fp16_range": Fp16Range,
    }

    def __post_init__(self) -> None:
        _check_relpath(self.path, "path")
        as_choice(self.format, "format", FORMATS)
        as_choice(self.precision, "precision", PRECISIONS)
        _check_sha256(self.sha256, "sha256")
        as_int(self.size_bytes, "size_bytes", minimum=0)
        if (self.format == "tensorrt_plan") != (self.tensorrt is not None):
            fail("tensorrt", f"must be set exactly for tensorrt_plan artefacts (format is {self.format})")
        self._check_nested()
        types = as_json_dict(self.io_datatypes, "io_datatypes")
        for name, dtype in types.items():
            as_choice(dtype, f"io_datatypes.{name}", DATATYPES)
        setattrs(self, io_datatypes=types)
        if self.fp16_range is not None and self.precision != "fp16":
            fail("fp16_range", f"only an fp16 artefact has one (precision is {self.precision})")

    @property
    def publishable(self) -> bool:
        """True when parity passed or was forced (or was not measured, e.g. an unverified plan)."""
        return self.parity is None or self.parity.passed or self.parity.forced

    @classmethod
    def from_file(
        cls, version_dir: str | os.PathLike[str], path: str, *, format: str, precision: str, **extra: Any
    ) -> Artefact:
        """Describe an existing file of `version_dir`: computes its sha256 and size."""
        rel = _check_relpath(path, "path")
        full = Path(version_dir) / rel
        if not full.is_file():
            fail("path", f"no such artefact file: {full}")
        return cls(
            path=rel,
            format=format,
            precision=precision,
            sha256=sha256_file(full),
            size_bytes=full.stat().st_size,
            **extra,
        )


@dataclass(frozen=True, kw_only=True)
class Provenance(JsonMixin):
    """Where the weights came from."""

    run_id: str
    dataset_fingerprint: str
    git_commit: str | None
    created_at: str  # ISO 8601, UTC
    kiln_version: str
    training_metrics: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, Any] = field(default_factory=dict)  # torch / onnx / onnxruntime / tensorrt

    def __post_init__(self) -> None:
        as_str(self.run_id, "run_id")
        as_str(self.dataset_fingerprint, "dataset_fingerprint")
        as_optional(self.git_commit, "git_commit", as_str)
        as_str(self.created_at, "created_at")
        as_str(self.kiln_version, "kiln_version")
        setattrs(
            self,
            training_metrics=as_json_dict(self.training_metrics, "training_metrics"),
            versions=as_json_dict(self.versions, "versions"),
        )
