"""`kiln export` through the real dispatcher: a happy path and one clear line + exit 2 per bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from export.tensorrt_build import tensorrt_missing
from serving.dispatch import main
from training.checkpoint import BEST_WEIGHTS, RUN_JSON, save_weights
from training.data import DataSpec, load_dataset
from training.models import build_model, preset
from training.run_record import input_record, write_run_json


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory with untrained (seeded) weights: enough for the FP32 gate and the errors."""
    spec = DataSpec(name="digits", image_size=16)
    bundle = load_dataset(spec)
    config = preset("resnet20", depth=8, width=4, in_channels=1, num_classes=len(bundle.class_names))
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("runs") / "untrained"
    path.mkdir()
    save_weights(build_model(config), path / BEST_WEIGHTS)
    write_run_json(
        path,
        run_id=path.name,
        model=config.to_dict(),
        class_names=bundle.class_names,
        input_spec=input_record(channels=1, size=16, channel_order="L", mean=bundle.mean, std=bundle.std),
        data=spec.to_dict(),
        dataset_fingerprint=bundle.fingerprint,
        train={},
        metrics={},
        seed=0,
    )
    return path


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("kiln export: error: ")
    return lines[0]


def _export(*args: str | Path) -> int:
    return main(["export", *map(str, args), "--no-progress", "--parity-samples", "64"])


def test_export_publishes_and_prints_the_table(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _export(run_dir, "--repo", tmp_path / "repo", "--max-batch", "8") == 0
    out = capsys.readouterr().out
    assert "parity vs PyTorch" in out and "pass" in out and "published" in out
    assert (tmp_path / "repo" / "untrained" / "1" / "kiln.json").is_file()
    assert _export(run_dir, "--repo", tmp_path / "repo", "--version", "1") == 2
    assert "already exists" in _one_error_line(capsys)


def test_missing_checkpoint(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    broken = shutil.copytree(run_dir, tmp_path / "run")
    (broken / BEST_WEIGHTS).unlink()
    assert _export(broken, "--repo", tmp_path / "repo") == 2
    assert BEST_WEIGHTS in _one_error_line(capsys)


def test_corrupt_checkpoint(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    broken = shutil.copytree(run_dir, tmp_path / "run")
    (broken / BEST_WEIGHTS).write_bytes(b"\x00garbage, not safetensors")
    assert _export(broken, "--repo", tmp_path / "repo") == 2
    assert "safetensors" in _one_error_line(capsys)
    assert not (tmp_path / "repo").exists()


def test_unknown_architecture(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    broken = shutil.copytree(run_dir, tmp_path / "run")
    record = json.loads((broken / RUN_JSON).read_text())
    record["model"]["arch"] = "transformer"
    (broken / RUN_JSON).write_text(json.dumps(record))
    assert _export(broken, "--repo", tmp_path / "repo") == 2
    assert "transformer" in _one_error_line(capsys)


def test_repo_path_that_is_a_file(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "repo.txt"
    target.write_text("not a folder")
    assert _export(run_dir, "--repo", target) == 2
    assert "is a file" in _one_error_line(capsys)


@pytest.mark.parametrize("value", ["fp32,int9", "FP64", ","])
def test_bad_precision_name(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], value: str
) -> None:
    assert _export(run_dir, "--repo", tmp_path, "--precision", value) == 2
    assert "--precision" in _one_error_line(capsys)


def test_missing_run_dir_and_bad_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _export(tmp_path / "nope", "--repo", tmp_path / "repo") == 2
    assert "does not exist" in _one_error_line(capsys)
    assert _export(tmp_path, "--repo", tmp_path / "repo", "--name", "../escape") == 2
    assert "--name" in _one_error_line(capsys)


@pytest.mark.skipif(
    tensorrt_missing() is None, reason="tensorrt is installed: the missing-package error cannot occur"
)
def test_tensorrt_requested_without_tensorrt(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _export(run_dir, "--repo", tmp_path / "repo", "--tensorrt") == 2
    assert "TensorRT" in _one_error_line(capsys)
