"""`kiln train` from the command line: help, bad arguments (one clear line, exit 2), a real short run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from serving.dispatch import main

REPO = Path(__file__).resolve().parents[2]


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse's own usage errors
        code = int(exc.code or 0)
    return code, capsys.readouterr().err.strip()


def test_help_documents_the_options() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "serving.dispatch", "train", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    for flag in (
        "--model",
        "--depth",
        "--shortcut",
        "--data-path",
        "--schedule",
        "--label-smoothing",
        "--resume",
    ):
        assert flag in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "resnet7"], "unknown model preset 'resnet7'"),
        (["--depth", "21"], "21"),
        (["--data", "imagefolder", "--data-path", "/nonexistent/kiln-images"], "/nonexistent/kiln-images"),
        (["--data", "nosuchset"], "unknown dataset name 'nosuchset'"),
        (["--epochs", "0"], "epochs must be >= 1, got 0"),
        (["--resume", "/nonexistent/run"], "does not exist"),
    ],
)
def test_bad_arguments_give_one_clear_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, argv: list[str], message: str
) -> None:
    code, err = run_cli(capsys, "train", "--runs-dir", str(tmp_path), "--no-progress", *argv)
    assert code == 2
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("kiln train: error:"), err
    assert message in lines[0]


@pytest.mark.parametrize(
    ("data", "model", "kind"),
    [
        (["--data", "signals", "--signal-file", "ecg.npz"], ["--model", "resnet20"], "signals"),
        (["--data", "cifar10", "--data-path", "."], ["--spatial-dims", "1"], "images"),
    ],
    ids=["2d-net-on-signals", "1d-net-on-images"],
)
def test_a_bad_model_config_fails_before_the_data_loads(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, data: list[str], model: list[str], kind: str
) -> None:
    """The data named here cannot load (an .npz of junk, a folder without CIFAR batches): the
    model's error, not the data's, proves the config was checked first."""
    (tmp_path / "ecg.npz").write_bytes(b"not a zip archive")
    data = [str(tmp_path / a) if a in ("ecg.npz", ".") else a for a in data]
    code, err = run_cli(capsys, "train", *data, *model, "--runs-dir", str(tmp_path), "--no-progress")
    assert code == 2 and err.count("\n") == 0, err
    assert f"holds {kind}" in err and "spatial_dims" in err, err


def test_empty_class_folder_is_named(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    root = tmp_path / "images"
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
    for index in range(3):
        Image.new("RGB", (20, 20), (index * 40, 10, 10)).save(root / "cat" / f"{index}.png")
    code, err = run_cli(
        capsys,
        "train",
        "--data",
        "imagefolder",
        "--data-path",
        str(root),
        "--runs-dir",
        str(tmp_path / "runs"),
        "--no-progress",
    )
    assert code == 2 and "dog" in err and len(err.splitlines()) == 1


def test_invalid_choice_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run_cli(capsys, "train", "--shortcut", "D")
    assert code == 2 and "invalid choice: 'D'" in err


def test_unknown_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run_cli(capsys, "bake")
    assert code == 2 and "unknown subcommand 'bake'" in err


def test_short_run_then_resume_extends_nothing(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    common = [
        "--model",
        "resnet20",
        "--depth",
        "8",
        "--width",
        "8",
        "--data",
        "synthetic",
        "--image-size",
        "12",
        "--num-samples",
        "120",
        "--num-classes",
        "3",
        "--epochs",
        "1",
        "--threads",
        "1",
        "--no-progress",
    ]
    code, _ = run_cli(capsys, "train", *common, "--runs-dir", str(tmp_path), "--name", "r1")
    assert code == 0
    record = json.loads((tmp_path / "r1" / "run.json").read_text())
    assert record["metrics"]["epochs_completed"] == 1 and record["model"]["depth"] == 8
    code, err = run_cli(capsys, "train", *common, "--runs-dir", str(tmp_path), "--name", "r1")
    assert code == 2 and "already holds a run" in err
    code, err = run_cli(capsys, "train", "--resume", str(tmp_path / "r1"), "--epochs", "2", "--no-progress")
    assert code == 2 and "epochs: 1 -> 2" in err


def _signal_npz(path: Path, *, n: int = 90, channels: int = 2, length: int = 24) -> Path:
    """Three classes of noisy sines at different frequencies: learnable in one epoch or two."""
    rng = np.random.default_rng(0)
    labels = np.arange(n) % 3
    t = np.linspace(0, 1, length, dtype=np.float32)
    x = np.stack([np.sin(2 * np.pi * (k + 1) * 2 * t + c) for k in labels for c in range(channels)])
    x = x.reshape(n, channels, length) * 5 + 10 + rng.normal(0, 0.3, (n, channels, length))
    np.savez(path, x=x.astype(np.float32), y=np.asarray(["low", "mid", "high"])[labels])
    return path


def test_help_documents_the_signal_options() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "serving.dispatch", "train", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    for flag in ("--signal-file", "--mnist1d-samples", "--label-column", "--spatial-dims", "--preset"):
        assert flag in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--data", "signals"], "--data signals needs --signal-file PATH"),
        (
            ["--data", "signals", "--signal-file", "/nonexistent/kiln.npz"],
            "/nonexistent/kiln.npz does not exist",
        ),
        (["--data", "signals", "--signal-file", "a.npz", "--data-path", "a.npz"], "not both"),
        (
            ["--data", "digits", "--mnist1d-samples", "200"],
            "--mnist1d-samples only applies to --data mnist1d",
        ),
        (["--data", "mnist1d", "--label-column", "y"], "--label-column only applies to --data signals"),
        (["--signal-file", "a.npz"], "--signal-file only applies to --data signals, not --data digits"),
        (["--data", "mnist1d", "--image-size", "16"], "--image-size does not apply to signal data"),
        (["--data", "mnist1d", "--mnist1d-samples", "15"], "mnist1d_samples=15"),
        (["--data", "mnist1d", "--augment", "cifar"], "unknown augment policy 'cifar' for dataset 'mnist1d'"),
        (["--data", "digits", "--augment", "shift"], "unknown augment policy 'shift' for dataset 'digits'"),
        (["--data", "digits", "--channels", "2"], "channels=2 must be 1, 3 or None"),
        (["--data", "mnist1d", "--mnist1d-samples", "100", "--model", "resnet20"], "spatial_dims=2"),
        (["--data", "mnist1d", "--mnist1d-samples", "100", "--model", "densenet121"], "--spatial-dims 1"),
        (["--data", "digits", "--model", "mnist1d_cnn"], "holds images [N, C, H, W]"),
    ],
)
def test_bad_signal_arguments_give_one_clear_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, argv: list[str], message: str
) -> None:
    code, err = run_cli(capsys, "train", "--runs-dir", str(tmp_path), "--no-progress", *argv)
    assert code == 2
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("kiln train: error:"), err
    assert message in lines[0]


def test_signal_file_run_records_a_signal_input_and_writes_signal_samples(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from tests.integration.signal_fixtures import read_signal_sample
    from training.samples import write_samples

    npz = _signal_npz(tmp_path / "sines.npz")
    argv = ["--data", "signals", "--signal-file", str(npz), "--preset", "resnet20", "--spatial-dims", "1"]
    argv += ["--width", "4", "--epochs", "1", "--threads", "1", "--no-progress"]
    code, err = run_cli(capsys, "train", *argv, "--runs-dir", str(tmp_path), "--name", "sig")
    assert code == 0, err
    record = json.loads((tmp_path / "sig" / "run.json").read_text())
    assert record["input"]["kind"] == "signal" and record["input"]["layout"] == "NCL"
    assert (record["input"]["channels"], record["input"]["length"]) == (2, 24)
    assert record["model"]["spatial_dims"] == 1 and record["model"]["in_channels"] == 2
    assert record["class_names"] == ["high", "low", "mid"] and record["data"]["path"] == str(npz)
    assert 9 < record["input"]["mean"][0] < 11  # raw scale: the stats are not of normalised data

    from training.checkpoint import load_run
    from training.data import load_dataset

    test_split = load_dataset(load_run(tmp_path / "sig").data_spec).test
    for fmt in ("npy", "csv"):
        paths = write_samples(tmp_path / "sig", tmp_path / fmt, count=3, signal_format=fmt)
        assert [p.suffix for p in paths] == [f".{fmt}"] * 3
        signal, label = test_split[0]
        assert paths[0].name == f"test-0000-{record['class_names'][label]}.{fmt}"
        np.testing.assert_array_equal(read_signal_sample(paths[0]), signal.numpy())  # raw, exact


def test_signals_default_to_the_1d_seed_model(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    npz = _signal_npz(tmp_path / "sines.npz", channels=1, length=40)
    argv = [
        "--data",
        "signals",
        "--signal-file",
        str(npz),
        "--epochs",
        "1",
        "--threads",
        "1",
        "--no-progress",
    ]
    code, err = run_cli(capsys, "train", *argv, "--runs-dir", str(tmp_path / "runs"))
    assert code == 0, err
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert run_dir.name.startswith("mnist1d_cnn-signals-")
    record = json.loads((run_dir / "run.json").read_text())
    assert record["model"]["arch"] == "plain_cnn" and record["model"]["channels"] == [15, 15, 15]
