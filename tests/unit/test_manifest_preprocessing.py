"""kiln.json's one normalisation record: images and signals carry it alike, the record's type
follows the input's kind, and manifests written before signals had it keep loading."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from serving.contract.manifest import (
    InputSpec,
    Manifest,
    ManifestError,
    Normalisation,
    Preprocessing,
    read_manifest,
    write_manifest,
)

SHA = "ab" * 32


def _manifest_dict(input_spec: dict[str, Any], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """A kiln.json as an earlier export wrote it, around `input_spec` (keys in that export's order)."""
    channels = input_spec["shape"][1]
    return {
        "schema_version": 1,
        "name": "old",
        "version": 3,
        "architecture": {"arch": "mnist1d_cnn", "in_channels": channels},
        "labels": [str(i) for i in range(10)],
        "input": input_spec,
        "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 10], "kind": "logits"}],
        "artefacts": [
            {
                "path": "model.onnx",
                "format": "onnx",
                "precision": "fp32",
                "sha256": SHA,
                "size_bytes": 1234,
                "tensorrt": None,
                "parity": None,
                "io_datatypes": {},
            }
        ],
        "max_batch_size": 64,
        "provenance": {
            "run_id": "run-1",
            "dataset_fingerprint": "cd" * 32,
            "git_commit": None,
            "created_at": "2026-01-01T00:00:00Z",
            "kiln_version": "0.1.0",
            "training_metrics": {},
            "versions": {},
        },
        "notes": "",
        "extra": extra or {},
    }


# An image input as export has always written it: one flat record, geometry and normalisation.
OLD_IMAGE_INPUT = {
    "name": "input",
    "datatype": "UINT8",
    "layout": "NHWC",
    "shape": [-1, 32, 32, 3],
    "kind": "image",
    "preprocessing": {
        "resize": 32,
        "crop": 32,
        "mean": [0.4914, 0.4822, 0.4465],
        "std": [0.247, 0.2435, 0.2616],
        "scale": 1.0 / 255.0,
        "channel_order": "RGB",
        "interpolation": "bilinear",
        "in_graph": True,
    },
}
# A signal input before it carried the record: null, with the record in the extra section.
OLD_SIGNAL_INPUT = {
    "name": "input",
    "datatype": "FP32",
    "layout": "NCL",
    "shape": [-1, 2, 40],
    "kind": "signal",
    "preprocessing": None,
}
OLD_SIGNAL_EXTRA = {
    "held_out_split": "test",
    "signal_normalisation": {
        "in_graph": True,
        "formula": "(x * scale - mean[c]) / std[c] per channel c, float32",
        "scale": 1.0,
        "mean": [0.25, -1.5],
        "std": [0.5, 2.0],
    },
}


def test_old_image_manifest_loads_with_the_same_record(tmp_path: Path) -> None:
    path = tmp_path / "kiln.json"
    path.write_text(json.dumps(_manifest_dict(OLD_IMAGE_INPUT)))
    spec = read_manifest(path).input
    pre = spec.preprocessing
    assert isinstance(pre, Preprocessing) and spec.normalisation is pre
    assert (pre.resize, pre.crop, pre.channel_order, pre.in_graph) == (32, 32, "RGB", True)
    assert pre.mean == (0.4914, 0.4822, 0.4465) and pre.scale == 1.0 / 255.0
    assert spec.to_dict()["preprocessing"] == OLD_IMAGE_INPUT["preprocessing"]  # written as before


def test_old_signal_manifest_loads_its_record_from_extra(tmp_path: Path) -> None:
    path = tmp_path / "kiln.json"
    path.write_text(json.dumps(_manifest_dict(OLD_SIGNAL_INPUT, copy.deepcopy(OLD_SIGNAL_EXTRA))))
    manifest = read_manifest(path)
    assert manifest.input.preprocessing == Normalisation(
        mean=(0.25, -1.5), std=(0.5, 2.0), scale=1.0, in_graph=True
    )
    assert manifest.extra == {"held_out_split": "test"}  # one record, in one place
    write_manifest(manifest, tmp_path / "again.json")  # rewritten in today's form, read alike
    assert read_manifest(tmp_path / "again.json") == manifest


def test_old_signal_manifest_without_a_record_loads_without_one() -> None:
    manifest = Manifest.from_dict(_manifest_dict(OLD_SIGNAL_INPUT, {"held_out_split": "test"}))
    assert manifest.input.preprocessing is None and manifest.input.normalisation is None


def test_a_record_in_input_wins_over_a_stale_extra_copy() -> None:
    record = {"mean": [0.0, 0.0], "std": [1.0, 1.0], "scale": 2.0, "in_graph": True}
    data = _manifest_dict({**OLD_SIGNAL_INPUT, "preprocessing": record}, copy.deepcopy(OLD_SIGNAL_EXTRA))
    manifest = Manifest.from_dict(data)
    assert manifest.input.preprocessing == Normalisation(**record)
    assert "signal_normalisation" in manifest.extra  # left as written: nothing was moved


def test_signal_record_round_trip() -> None:
    spec = InputSpec(
        name="input",
        datatype="FP32",
        layout="NCL",
        kind="signal",
        shape=(-1, 2, 40),
        preprocessing=Normalisation(mean=(0.25, -1.5), std=(0.5, 2.0), in_graph=True),
    )
    data = spec.to_dict()
    assert data["preprocessing"] == {"mean": [0.25, -1.5], "std": [0.5, 2.0], "scale": 1.0, "in_graph": True}
    assert InputSpec.from_dict(json.loads(json.dumps(data))) == spec


@pytest.mark.parametrize(
    ("record", "field", "needle"),
    [
        ({"mean": [0.0], "std": [1.0], "resize": 8}, "preprocessing", "unknown key(s) ['resize']"),
        ({"mean": [0.0], "std": [1.0]}, "preprocessing.mean", "shape has 2 channel(s)"),
        ({"mean": [0.0, 0.0], "std": [1.0]}, "preprocessing.std", "expected 2 values"),
        ({"mean": [], "std": []}, "preprocessing.mean", "got none"),
        ({"mean": [0.0, 0.0], "std": [1.0, 1.0], "scale": 0}, "preprocessing.scale", ">= 1e-12"),
    ],
)
def test_bad_signal_records_are_named(record: dict[str, Any], field: str, needle: str) -> None:
    with pytest.raises(ManifestError) as caught:
        InputSpec.from_dict({**OLD_SIGNAL_INPUT, "preprocessing": record})
    assert caught.value.field == field and needle in caught.value.detail


def test_record_type_follows_the_kind() -> None:
    record = Normalisation(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    with pytest.raises(ManifestError, match="image inputs need Preprocessing, got Normalisation"):
        InputSpec(name="input", datatype="FP32", layout="NCHW", shape=(-1, 3, 8, 8), preprocessing=record)
    image = Preprocessing(resize=8, crop=8, mean=(0.5,), std=(0.25,), channel_order="L")
    with pytest.raises(ManifestError, match="signal inputs need Normalisation, got Preprocessing"):
        InputSpec(
            name="input", datatype="FP32", layout="NCL", kind="signal", shape=(-1, 1, 8), preprocessing=image
        )
