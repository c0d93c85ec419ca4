"""kiln.json: round trip, strict validation (each error names its field), atomic write, sha256."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from serving.contract.manifest import (
    SCHEMA_VERSION,
    Artefact,
    ArtefactMismatch,
    InputSpec,
    Manifest,
    ManifestError,
    OutputSpec,
    ParityReport,
    Preprocessing,
    Provenance,
    TensorRTInfo,
    read_manifest,
    sha256_file,
    verify_artefacts,
    write_manifest,
)

LABELS = tuple(str(i) for i in range(10))


def make_parity(**overrides: Any) -> ParityReport:
    """A passing FP32 parity report."""
    values: dict[str, Any] = dict(
        reference="pytorch checkpoint.safetensors",
        samples=100,
        max_abs_err=1e-6,
        max_rel_err=2e-6,
        top1_agreement=1.0,
        accuracy=0.97,
        reference_accuracy=0.97,
        tolerances={"max_rel_err": 1e-4, "top1_agreement": 1.0},
    )
    return ParityReport(**(values | overrides))


def make_manifest(version_dir: Path, *, name: str = "digits", version: int = 1, **overrides: Any) -> Manifest:
    """A valid manifest whose model.onnx (written here if absent) lives in `version_dir`."""
    onnx = version_dir / "model.onnx"
    if not onnx.exists():
        onnx.write_bytes(b"fake onnx bytes " + name.encode())
    artefact = Artefact.from_file(
        version_dir, "model.onnx", format="onnx", precision="fp32", parity=make_parity()
    )
    values: dict[str, Any] = dict(
        name=name,
        version=version,
        architecture={"arch": "resnet", "depth": 20, "width": 16},
        labels=LABELS,
        input=InputSpec(
            name="input",
            datatype="FP32",
            layout="NCHW",
            shape=(-1, 1, 8, 8),
            preprocessing=Preprocessing(resize=8, crop=8, mean=(0.5,), std=(0.25,), channel_order="L"),
        ),
        outputs=(OutputSpec(name="logits", datatype="FP32", shape=(-1, 10)),),
        artefacts=(artefact,),
        max_batch_size=32,
        provenance=Provenance(
            run_id="run-1",
            dataset_fingerprint="ab" * 32,
            git_commit=None,
            created_at="2026-01-01T00:00:00Z",
            kiln_version="0.1.0",
            training_metrics={"best_val_acc": 0.97},
        ),
    )
    return Manifest(**(values | overrides))


@pytest.fixture
def manifest(tmp_path: Path) -> Manifest:
    return make_manifest(tmp_path)


def test_round_trip_dict_and_file(tmp_path: Path, manifest: Manifest) -> None:
    trt = TensorRTInfo(
        version="10.7.0", gpu_name="NVIDIA H100", compute_capability="9.0", batch_profile=(1, 8, 32)
    )
    (tmp_path / "model.plan").write_bytes(b"plan")
    plan = Artefact.from_file(tmp_path, "model.plan", format="tensorrt_plan", precision="fp16", tensorrt=trt)
    fp16 = Artefact(
        path="model.fp16.onnx", format="onnx", precision="fp16", sha256="0" * 64, size_bytes=3,
        io_datatypes={"input": "FP16", "logits": "FP16"},
        parity=make_parity(passed=False, forced=True, top1_agreement=0.99, note="forced"),
    )  # fmt: skip
    full = Manifest(**{**manifest.__dict__, "artefacts": (*manifest.artefacts, plan, fp16)})
    data = full.to_dict()
    assert data["schema_version"] == SCHEMA_VERSION
    assert Manifest.from_dict(json.loads(json.dumps(data))) == full
    write_manifest(full, tmp_path / "kiln.json")
    again = read_manifest(tmp_path / "kiln.json")
    assert again == full
    assert again.artefacts[1].tensorrt == trt
    assert again.datatype_of(again.artefacts[2], "input") == "FP16"
    assert again.datatype_of(again.artefacts[0], "input") == "FP32"
    assert again.find_artefact("tensorrt_plan", "fp16") == plan
    assert again.input.channels == 1 and again.input.height == 8


def test_lists_become_tuples(tmp_path: Path) -> None:
    built = make_manifest(tmp_path, labels=list(LABELS))
    assert isinstance(built.labels, tuple)
    assert built.input.preprocessing is not None and isinstance(built.input.preprocessing.mean, tuple)


def _mutate(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set (or with value=... delete) a nested key given as 'a.b[0].c'."""
    parts = dotted.replace("[", ".[").split(".")
    target: Any = data
    for part in parts[:-1]:
        target = target[int(part[1:-1])] if part.startswith("[") else target[part]
    last = parts[-1]
    if value is ...:
        del target[last]
    else:
        target[last] = value


@pytest.mark.parametrize(
    ("dotted", "value", "field", "needle"),
    [
        ("schema_version", 2, "schema_version", "unsupported"),
        ("schema_version", "1", "schema_version", "unsupported"),
        ("schema_version", ..., "schema_version", "unsupported"),
        ("surprise", 1, None, "unknown key(s) ['surprise']"),
        ("labels", ..., None, "missing required key(s) ['labels']"),
        ("name", "../evil", "name", "invalid model name"),
        ("version", "1", "version", "expected an integer"),
        ("version", 0, "version", ">= 1"),
        ("labels", ["a", "a"], "labels", "distinct"),
        ("max_batch_size", True, "max_batch_size", "expected an integer"),
        ("input.datatype", "float32", "input.datatype", "expected one of"),
        ("input.layout", "CHW", "input.layout", "expected one of"),
        ("input.shape", [1, 1, 8, 8], "input.shape", "dynamic batch first"),
        ("input.shape", [-1, 1, 8], "input.shape", "needs 4 dims"),
        ("input.preprocessing.mean", [0.5, 0.5, 0.5], "input.preprocessing.mean", "expected 1 values"),
        ("input.preprocessing.std", [0.0], "input.preprocessing.std[0]", ">= 1e-12"),
        ("input.preprocessing.in_graph", 1, "input.preprocessing.in_graph", "true/false"),
        ("input.preprocessing.extra", 1, "input.preprocessing", "unknown key(s) ['extra']"),
        ("outputs[0].shape", [-1, 9], "outputs[0].shape", "!= 10 labels"),
        ("outputs", {}, "outputs", "expected a list"),
        ("artefacts", [], "artefacts", "at least one"),
        ("artefacts[0].path", "../model.onnx", "artefacts[0].path", "inside the version folder"),
        ("artefacts[0].path", "/etc/passwd", "artefacts[0].path", "inside the version folder"),
        ("artefacts[0].path", "./model.onnx", "artefacts[0].path", "not a plain"),
        ("artefacts[0].path", "kiln.json", "artefacts[0].path", "not a plain"),
        ("artefacts[0].sha256", "ABC", "artefacts[0].sha256", "64 lowercase hex"),
        ("artefacts[0].sha256", "A" * 64, "artefacts[0].sha256", "64 lowercase hex"),
        ("artefacts[0].size_bytes", -1, "artefacts[0].size_bytes", ">= 0"),
        ("artefacts[0].format", "pt", "artefacts[0].format", "expected one of"),
        ("artefacts[0].precision", "bf16", "artefacts[0].precision", "expected one of"),
        ("artefacts[0].tensorrt", {"version": "10", "gpu_name": "x", "compute_capability": "9"},
         "artefacts[0].tensorrt.compute_capability", "major.minor"),
        ("artefacts[0].io_datatypes", {"nope": "FP16"}, "artefacts[0].io_datatypes", "unknown tensor"),
        ("artefacts[0].parity.top1_agreement", 1.5, "artefacts[0].parity.top1_agreement", "<= 1.0"),
        ("artefacts[0].parity.samples", 0, "artefacts[0].parity.samples", ">= 1"),
        ("artefacts[0].parity.forced", True, "artefacts[0].parity.forced", "did not pass"),
        ("provenance.run_id", 5, "provenance.run_id", "expected a string"),
        ("provenance.kiln_version", ..., "provenance", "missing required key(s) ['kiln_version']"),
        ("architecture", [], "architecture", "expected an object"),
    ],
)  # fmt: skip
def test_validation_errors_name_the_field(
    manifest: Manifest, dotted: str, value: Any, field: str | None, needle: str
) -> None:
    data = manifest.to_dict()
    _mutate(data, dotted, value)
    with pytest.raises(ManifestError) as info:
        Manifest.from_dict(data)
    assert info.value.field == field
    assert needle in str(info.value)


def test_tensorrt_info_required_for_plans_only(manifest: Manifest) -> None:
    art = manifest.artefacts[0]
    with pytest.raises(ManifestError, match="tensorrt"):
        Artefact(**{**art.__dict__, "format": "tensorrt_plan"})
    info = TensorRTInfo(version="10.7", gpu_name="g", compute_capability="8.9")
    with pytest.raises(ManifestError, match="tensorrt"):
        Artefact(**{**art.__dict__, "tensorrt": info})


def test_duplicate_artefact_paths_refused(manifest: Manifest) -> None:
    with pytest.raises(ManifestError, match="duplicate path"):
        Manifest(**{**manifest.__dict__, "artefacts": manifest.artefacts * 2})


def test_non_finite_numbers_refused() -> None:
    with pytest.raises(ManifestError, match="max_abs_err: must be finite"):
        make_parity(max_abs_err=float("nan"))


def test_read_manifest_errors_name_the_file(tmp_path: Path, manifest: Manifest) -> None:
    path = tmp_path / "kiln.json"
    with pytest.raises(ManifestError, match="manifest not found"):
        read_manifest(path)
    path.write_text("{not json")
    with pytest.raises(ManifestError, match="unreadable manifest") as info:
        read_manifest(path)
    assert str(path) in str(info.value)
    data = manifest.to_dict()
    data["artefacts"][0]["sha256"] = "bad"
    path.write_text(json.dumps(data))
    with pytest.raises(ManifestError) as info:
        read_manifest(path)
    assert info.value.source == str(path) and info.value.field == "artefacts[0].sha256"


def test_write_is_atomic(tmp_path: Path, manifest: Manifest, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "kiln.json"
    write_manifest(manifest, path)
    before = path.read_bytes()

    def broken_replace(src: str, dst: str) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", broken_replace)
    changed = Manifest(**{**manifest.__dict__, "notes": "second write"})
    with pytest.raises(OSError, match="disk gone"):
        write_manifest(changed, path)
    assert path.read_bytes() == before  # old content intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kiln.json", "model.onnx"]  # no temp left


def test_sha256_file_streams(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    path.write_bytes(b"abc" * 1000)
    import hashlib

    assert sha256_file(path, chunk_size=7) == hashlib.sha256(b"abc" * 1000).hexdigest()


def test_verify_artefacts_refuses_mismatch(tmp_path: Path, manifest: Manifest) -> None:
    verify_artefacts(manifest, tmp_path)
    onnx = tmp_path / "model.onnx"
    original = onnx.read_bytes()
    onnx.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))  # same size, one bit flipped
    with pytest.raises(ArtefactMismatch) as info:
        verify_artefacts(manifest, tmp_path)
    assert info.value.what == "sha256" and info.value.path == "model.onnx"
    assert info.value.expected == manifest.artefacts[0].sha256 and info.value.actual == sha256_file(onnx)
    onnx.write_bytes(original + b"x")
    with pytest.raises(ArtefactMismatch, match="size mismatch: expected"):
        verify_artefacts(manifest, tmp_path)
    onnx.unlink()
    with pytest.raises(ArtefactMismatch, match="missing"):
        verify_artefacts(manifest, tmp_path)


def test_from_file_refuses_escaping_path(tmp_path: Path) -> None:
    (tmp_path / "outside.onnx").write_bytes(b"x")
    inner = tmp_path / "v"
    inner.mkdir()
    with pytest.raises(ManifestError, match="inside the version folder"):
        Artefact.from_file(inner, "../outside.onnx", format="onnx", precision="fp32")


def test_manifest_and_repository_import_without_torch() -> None:
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'training', 'export'):\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import serving.contract.manifest, serving.contract.repository\n"
        "import serving.contract.publish, serving.contract.triton_config\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
