"""benchmarks/train_mnist1d.py --quick: each recipe trains through the real loop; the report is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.train_mnist1d import PUBLISHED, main, recipes


def test_quick_run_trains_every_recipe_and_appends_a_section(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    results = tmp_path / "RESULTS.md"
    argv = ["--quick", "--seeds", "3", "--runs-dir", str(tmp_path / "runs"), "--results", str(results)]
    assert main(argv) == 0
    assert main([*argv, "--models", "chapter-fc"]) == 0  # appends a second section, one header
    text = results.read_text(encoding="utf-8")
    assert text.count("# MNIST-1D benchmark") == 1 and text.count("\n## ") == 2
    assert "except 500 samples" in text and "360 train / 40 val" in text and "100 test signals" in text
    for recipe in recipes():
        assert recipe.label in text
        record = json.loads((tmp_path / "runs" / f"{recipe.key}-seed3" / "run.json").read_text())
        assert record["seed"] == 3 and 0.0 <= record["metrics"]["test_acc"] <= 1.0
        assert record["data"]["name"] == "mnist1d" and record["data"]["augment"] == recipe.augment
    for name, acc in PUBLISHED:
        assert f"| {name} (published, not run here) |" in text and f"{acc:.0f} %" in text
    assert "| seed 3 |" in text and "last epoch's test" in text and "appended to" in capsys.readouterr().out


def test_unknown_model_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--quick", "--models", "nosuch"])
    assert "unknown --models nosuch" in capsys.readouterr().err
