"""FP16 range proof through `export_run` and `kiln export`: real runs, real ORT sessions.

A seeded (untrained) digits ResNet exports as is (nothing kept in FP32), and a copy whose last
stage's BN scale is 2e4 (folded weights still fit FP16, activations reach ~1e5) exports with
the out-of-range nodes kept in FP32 and recorded in kiln.json. "Truly in FP16" is onnx's
reference evaluator, which computes at the graph's own dtypes (ORT's CPU provider does not).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx.reference import ReferenceEvaluator

from export.fp16 import FP16_MAX, convert_fp16
from export.inputs import preprocess_from_run_input, sample_split
from export.pipeline import ExportRequest, ExportResult, export_run
from serving.contract.manifest import read_manifest
from serving.contract.repository import ModelRepository
from serving.dispatch import main
from training.checkpoint import BEST_WEIGHTS, load_run, save_weights
from training.data import DataSpec, load_dataset
from training.models import build_model, preset
from training.run_record import input_record, write_run_json

SPEC = DataSpec(name="digits", image_size=16)


def _run_dir(root: Path, name: str, last_stage_scale: float) -> Path:
    bundle = load_dataset(SPEC)
    config = preset("resnet20", depth=8, width=4, in_channels=1, num_classes=len(bundle.class_names))
    torch.manual_seed(0)
    model = build_model(config)
    with torch.no_grad():
        model.layer3[0].bn2.weight.mul_(last_stage_scale)
    path = root / name
    path.mkdir()
    save_weights(model, path / BEST_WEIGHTS)
    write_run_json(
        path,
        run_id=name,
        model=config.to_dict(),
        class_names=bundle.class_names,
        input_spec=input_record(channels=1, size=16, channel_order="L", mean=bundle.mean, std=bundle.std),
        data=SPEC.to_dict(),
        dataset_fingerprint=bundle.fingerprint,
        train={},
        metrics={},
        seed=0,
    )
    return path


def _export(run_dir: Path, repo: Path) -> ExportResult:
    request = ExportRequest(
        run_dir=run_dir,
        repo=repo,
        precisions=("fp32", "fp16"),
        preprocess_in_graph=False,  # float NCHW in: the reference evaluator below feeds it directly
        max_batch=16,
        parity_samples=200,
        calibration_samples=64,
    )
    return export_run(request)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    return {"normal": _run_dir(root, "normal", 1.0), "hot": _run_dir(root, "hot", 2e4)}


@pytest.fixture(scope="module")
def held_out(runs: dict[str, Path]) -> np.ndarray:
    pre = preprocess_from_run_input(load_run(runs["hot"]).input)
    return pre(sample_split(load_dataset(SPEC).test, 48).images)


def _in_fp16(path: Path | onnx.ModelProto, x: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Logits computed at the graph's own dtypes, and numpy's warnings on the way."""
    model = onnx.load(str(path)) if isinstance(path, Path) else path
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = ReferenceEvaluator(model).run(["logits"], {"input": x})[0]
    return np.asarray(out), [str(w.message) for w in caught]


def test_a_normal_model_keeps_nothing_in_fp32(runs: dict[str, Path], tmp_path: Path) -> None:
    result = _export(runs["normal"], tmp_path)
    assert all(r.passed for r in result.parity)
    manifest = read_manifest(result.path / "kiln.json")
    proof = manifest.artefact("model.fp16.onnx").fp16_range
    assert proof is not None and proof.margin == 4.0 and proof.kept_fp32_nodes == ()
    assert 0 < proof.max_abs_activation < FP16_MAX / 4 and proof.samples == 200 + 64
    assert manifest.artefact("model.onnx").fp16_range is None
    ModelRepository(tmp_path).resolve(manifest.name)  # the server's reader accepts it


def test_an_overflowing_model_keeps_its_hot_nodes_in_fp32(
    runs: dict[str, Path], held_out: np.ndarray, tmp_path: Path
) -> None:
    result = _export(runs["hot"], tmp_path)
    assert all(r.passed for r in result.parity), [r.failures for r in result.parity]
    version = result.path
    raw = json.loads((version / "kiln.json").read_text())
    entry = next(a for a in raw["artefacts"] if a["path"] == "model.fp16.onnx")
    proof = entry["fp16_range"]
    assert proof["margin"] == 4.0 and proof["max_abs_activation"] > FP16_MAX
    assert proof["kept_fp32_nodes"] and proof["max_activation_tensor"]
    details = raw["extra"]["artefact_details"]["model.fp16.onnx"]["fp16"]["range"]
    assert details["limit"] == FP16_MAX / 4 and details["tensors_over_limit"]
    fp16 = onnx.load(str(version / "model.fp16.onnx"))
    kept = {n.name for n in fp16.graph.node} & set(proof["kept_fp32_nodes"])
    assert kept == set(proof["kept_fp32_nodes"])  # the nodes are there, by name
    # Truly computed in FP16: finite with no overflow on the way, close to FP32.
    reference, _ = _in_fp16(version / "model.onnx", held_out)
    logits, messages = _in_fp16(version / "model.fp16.onnx", held_out)
    assert np.isfinite(logits).all() and not [m for m in messages if "overflow" in m], messages
    assert np.abs(logits - reference).max() <= 1e-2 * np.abs(reference).max()
    assert (logits.argmax(1) == reference.argmax(1)).mean() >= 0.99
    # Without the range proof, the same conversion passes CPU parity yet overflows in FP16.
    unproven, report = convert_fp16(onnx.load(str(version / "model.onnx")))
    assert report.kept_fp32_nodes == ()
    logits, messages = _in_fp16(unproven, held_out)
    assert any("overflow" in m for m in messages) and not np.isfinite(logits).all()


def test_cli_margin_flag(runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["export", str(runs["hot"]), "--repo", str(tmp_path), "--no-progress", "--parity-samples", "64"]
    assert main([*base, "--precision", "fp16", "--fp16-range-margin", "0.5"]) == 2
    assert "fp16_range_margin must be a finite number >= 1" in capsys.readouterr().err
    assert main([*base, "--precision", "fp32,fp16", "--fp16-range-margin", "2", "--max-batch", "8"]) == 0
    out = capsys.readouterr().out
    assert "fp16 range: largest FP32 activation" in out and "limit 32752" in out
    manifest = read_manifest(next(tmp_path.glob("*/1/kiln.json")))
    assert manifest.artefact("model.fp16.onnx").fp16_range.margin == 2.0
