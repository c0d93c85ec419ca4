"""The artefact contract: ``kiln.json``, one per model version (schema_version 1).

Export writes it, the server validates it and refuses what does not match. Design choices:

- Frozen keyword-only dataclasses; every value is checked in ``__post_init__`` (so an invalid
  object cannot be built by code either) and lists are normalised to tuples.
- ``from_dict`` is strict: unknown keys, missing required keys, wrong types, an unsupported
  ``schema_version``, an artefact path escaping the version folder or a malformed sha256 raise
  ``ManifestError`` naming the field (``artefacts[1].sha256: ...``). Keys of fields that have a
  default may be omitted.
- The parity report lives on its artefact (``Artefact.parity``): one entry per file, nothing to
  keep in sync.
- ``InputSpec.preprocessing`` is the one normalisation record, for images and signals alike:
  ``Normalisation`` (scale, mean, std, in_graph) for a signal, ``Preprocessing`` (the same plus
  resize, crop, channel order, interpolation) for an image; layout and kind are the InputSpec's.
  A kiln.json written before signals had it (``preprocessing`` null and the record in
  ``extra.signal_normalisation``) is read as if it had been written today (``_upgraded``).
- ``Artefact.io_datatypes`` overrides a tensor's datatype for that file only (an FP16 model
  asked to keep FP16 inputs/outputs); ``Manifest.datatype_of`` resolves it.

Torch-free: stdlib only (the serving image has no torch).
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from serving.contract.fileio import atomic_write_text, sha256_file
from serving.contract.io_spec import (
    DATATYPES,
    NUMPY_DTYPES,
    InputSpec,
    Normalisation,
    OutputSpec,
    Preprocessing,
)
from serving.contract.manifest_types import (
    MANIFEST_FILENAME,
    MODEL_NAME_RE,
    Artefact,
    ParityReport,
    Provenance,
    TensorRTInfo,
    check_model_name,
)
from serving.contract.schema_checks import (
    JsonMixin,
    ManifestError,
    as_int,
    as_json_dict,
    as_str,
    as_tuple,
    check_keys,
    fail,
    parse_list,
    parse_nested,
    setattrs,
)

__all__ = [
    "DATATYPES",
    "MANIFEST_FILENAME",
    "MODEL_NAME_RE",
    "NUMPY_DTYPES",
    "SCHEMA_VERSION",
    "Artefact",
    "ArtefactMismatch",
    "InputSpec",
    "Manifest",
    "ManifestError",
    "Normalisation",
    "OutputSpec",
    "ParityReport",
    "Preprocessing",
    "Provenance",
    "TensorRTInfo",
    "read_manifest",
    "sha256_file",
    "verify_artefacts",
    "write_manifest",
]

SCHEMA_VERSION = 1
MAX_MANIFEST_BYTES = 16 * 1024 * 1024  # a kiln.json is a few KiB; refuse junk before parsing it


class ArtefactMismatch(ManifestError):
    """An artefact file is missing or its size/sha256 differs from kiln.json."""

    def __init__(self, path: str, what: str, expected: object, actual: object) -> None:
        self.path, self.what, self.expected, self.actual = path, what, expected, actual
        super().__init__(f"{what} mismatch: expected {expected}, got {actual}", field=f"artefact {path}")


@dataclass(frozen=True, kw_only=True)
class Manifest(JsonMixin):
    """The whole kiln.json of one model version."""

    name: str
    version: int
    architecture: dict[str, Any]
    labels: tuple[str, ...]
    input: InputSpec
    outputs: tuple[OutputSpec, ...]
    artefacts: tuple[Artefact, ...]
    max_batch_size: int
    provenance: Provenance
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_model_name(self.name, "name")
        as_int(self.version, "version", minimum=1)
        setattrs(self, architecture=as_json_dict(self.architecture, "architecture"))
        labels = as_tuple(self.labels, "labels", as_str)
        if not labels or len(set(labels)) != len(labels):
            fail("labels", "must be a non-empty list of distinct names")
        outputs = as_tuple(self.outputs, "outputs", _instance, cls=OutputSpec)
        artefacts = as_tuple(self.artefacts, "artefacts", _instance, cls=Artefact)
        setattrs(self, labels=labels, outputs=outputs, artefacts=artefacts)
        _instance(self.input, "input", cls=InputSpec)
        if not self.outputs:
            fail("outputs", "at least one output is required")
        for i, out in enumerate(self.outputs):
            if out.kind != "other" and out.shape[-1] != len(labels):
                fail(f"outputs[{i}].shape", f"last dim {out.shape[-1]} != {len(labels)} labels")
        _check_unique([o.name for o in self.outputs] + [self.input.name], "outputs", "tensor name")
        if not self.artefacts:
            fail("artefacts", "at least one artefact is required")
        for i, art in enumerate(self.artefacts):
            unknown = set(art.io_datatypes) - {self.input.name, *(o.name for o in self.outputs)}
            if unknown:
                fail(f"artefacts[{i}].io_datatypes", f"unknown tensor name(s) {sorted(unknown)}")
        _check_unique([a.path for a in self.artefacts], "artefacts", "path")
        as_int(self.max_batch_size, "max_batch_size", minimum=1)
        _instance(self.provenance, "provenance", cls=Provenance)
        as_str(self.notes, "notes", empty_ok=True)
        setattrs(self, extra=as_json_dict(self.extra, "extra"))

    @property
    def num_classes(self) -> int:
        """Number of class labels."""
        return len(self.labels)

    def artefact(self, path: str) -> Artefact:
        """The artefact entry for `path` (ManifestError if absent)."""
        for art in self.artefacts:
            if art.path == path:
                return art
        fail("artefacts", f"no artefact {path!r}; have {[a.path for a in self.artefacts]}")

    def find_artefact(self, format: str, precision: str) -> Artefact | None:
        """The first artefact with this format and precision, or None."""
        return next((a for a in self.artefacts if a.format == format and a.precision == precision), None)

    def datatype_of(self, artefact: Artefact, tensor: str) -> str:
        """The datatype `tensor` has in `artefact` (its override, else the manifest's spec)."""
        if tensor in artefact.io_datatypes:
            return artefact.io_datatypes[tensor]
        specs = {self.input.name: self.input.datatype} | {o.name: o.datatype for o in self.outputs}
        if tensor not in specs:
            fail("tensor", f"unknown tensor {tensor!r}; have {sorted(specs)}")
        return specs[tensor]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict, schema_version first."""
        return {"schema_version": SCHEMA_VERSION, **super().to_dict()}

    @classmethod
    def from_dict(cls, data: Any) -> Manifest:
        """Strict parse of a kiln.json object (see module docstring)."""
        if not isinstance(data, dict):
            fail("kiln.json", f"expected an object, got {type(data).__name__}")
        version = data.get("schema_version")
        if type(version) is not int or version != SCHEMA_VERSION:
            fail(
                "schema_version", f"unsupported schema_version {version!r} (this Kiln reads {SCHEMA_VERSION})"
            )
        check_keys(data, cls, extra=("schema_version",))
        data = _upgraded(data)
        parsed = {k: v for k, v in data.items() if k != "schema_version"}
        parsed["outputs"] = parse_list(data, "outputs", OutputSpec)
        parsed["artefacts"] = parse_list(data, "artefacts", Artefact)
        parsed["input"] = parse_nested(data, "input", InputSpec)
        parsed["provenance"] = parse_nested(data, "provenance", Provenance)
        return cls(**parsed)


def _upgraded(data: dict[str, Any]) -> dict[str, Any]:
    """A kiln.json from before signal inputs carried their normalisation record: exports then
    wrote `preprocessing: null` and the record (with a prose "formula") in
    extra.signal_normalisation. Move it to input.preprocessing; anything else is returned as is."""
    spec, extra = data.get("input"), data.get("extra")
    if not (isinstance(spec, dict) and isinstance(extra, dict)) or spec.get("kind") != "signal":
        return data
    legacy = extra.get("signal_normalisation")
    if spec.get("preprocessing") is not None or not isinstance(legacy, dict):
        return data
    record = {k: legacy[k] for k in ("mean", "std", "scale", "in_graph") if k in legacy}
    rest = {k: v for k, v in extra.items() if k != "signal_normalisation"}
    return data | {"input": spec | {"preprocessing": record}, "extra": rest}


def _instance(value: Any, field_name: str, *, cls: type) -> Any:
    if not isinstance(value, cls):
        fail(field_name, f"expected {cls.__name__}, got {type(value).__name__}")
    return value


def _check_unique(values: list[str], field_name: str, what: str) -> None:
    dupes = sorted({v for v in values if values.count(v) > 1})
    if dupes:
        fail(field_name, f"duplicate {what}(s) {dupes}")


def read_manifest(path: str | os.PathLike[str]) -> Manifest:
    """Read and strictly validate a kiln.json file (ManifestError naming the file and field)."""
    source = Path(path)
    try:
        size = source.stat().st_size
        if size > MAX_MANIFEST_BYTES:
            raise ManifestError(f"{size} bytes is too large for a manifest", source=str(source))
        data = json.loads(source.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ManifestError("manifest not found", source=str(source)) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"unreadable manifest: {exc}", source=str(source)) from None
    try:
        return Manifest.from_dict(data)
    except ManifestError as exc:
        raise ManifestError(exc.detail, field=exc.field, source=str(source)) from None


def write_manifest(manifest: Manifest, path: str | os.PathLike[str]) -> None:
    """Write kiln.json atomically (temp file + os.replace), pretty-printed, no NaN."""
    text = json.dumps(manifest.to_dict(), indent=2, allow_nan=False) + "\n"
    atomic_write_text(path, text)


def verify_artefacts(
    manifest: Manifest, version_dir: str | os.PathLike[str], only: Collection[str] | None = None
) -> None:
    """Check every artefact (or those in `only`) exists with the recorded size and sha256.

    Raises ArtefactMismatch naming the file with the expected and actual value. The size is
    checked first: it is free and catches truncated copies without hashing.
    """
    root = Path(version_dir)
    wanted = manifest.artefacts if only is None else tuple(manifest.artefact(p) for p in only)
    for art in wanted:
        full = root / art.path
        if not full.is_file():
            raise ArtefactMismatch(art.path, "file", "present", f"missing ({full})")
        size = full.stat().st_size
        if size != art.size_bytes:
            raise ArtefactMismatch(art.path, "size", art.size_bytes, size)
        digest = sha256_file(full)
        if digest != art.sha256:
            raise ArtefactMismatch(art.path, "sha256", art.sha256, digest)
