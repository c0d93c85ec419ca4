"""`kiln train` from the command line: help, bad arguments (one clear line, exit 2), a real short run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
