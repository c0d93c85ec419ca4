"""`kiln score` on the local engine against a real ONNX model repository and real image files."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pytest

from serving.contract.repository import ModelRepository
from serving.dispatch import main
from serving.runtime.backends import load_backend
from serving.runtime.preprocess import Preprocessor
from serving.runtime.topk import class_scores, top_k
from serving.scoring.job import ScoreConfig, run_score
from tests.integration.scoring_fixtures import BAD_NAMES, LABELS, make_images, publish_model

GOOD = 300


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("repo")
    publish_model(root, "tiny", seed=1)
    return root


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    make_images(folder, GOOD)
    return folder


def read_output(out: Path) -> pa.Table:
    """All committed shards (pyarrow skips the _ledger, _kiln_score.json and temp files)."""
    return pads.dataset(out, format="parquet").to_table().replace_schema_metadata(None)


def reference(repo: Path, paths: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(class probabilities, raw logits) per image, one image per backend call, no scoring code."""
    resolved = ModelRepository(repo).resolve("tiny", 1)
    manifest = resolved.manifest
    backend = load_backend(manifest, manifest.artefacts[0], version_dir=resolved.path)
    pre = Preprocessor(manifest.input)
    logits = np.concatenate(
        [backend.infer({"input": pre.preprocess(Path(p).read_bytes())[None]})["logits"] for p in paths]
    )
    backend.close()
    return class_scores(logits, "logits"), logits


def _config(repo: Path, inputs: Path | str, out: Path, **extra: object) -> ScoreConfig:
    return ScoreConfig(repo=repo, model="tiny", inputs=str(inputs), output=out, progress=False, **extra)


def test_one_row_per_input_and_error_rows(repo: Path, images: Path, tmp_path: Path) -> None:
    summary = run_score(_config(repo, images, tmp_path / "out", shard_size=64, batch_size=16))
    table = read_output(tmp_path / "out")
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == GOOD + len(BAD_NAMES) == summary.rows
    assert ids == sorted(ids)
    errors = {r["id"]: r["error"] for r in table.to_pylist() if r["error"] is not None}
    assert sorted(errors) == sorted(BAD_NAMES)
    assert errors["empty.png"] == "empty image: 0 bytes"
    assert "cannot decode image" in errors["notes.txt"] and "truncated" in errors["truncated.jpg"]
    assert (summary.errors, summary.shards, summary.shards_written, summary.complete) == (5, 5, 5, True)
    good = table.filter(pa.compute.is_null(table.column("error")))
    assert good.column("labels").null_count == 0 and len(good.column("labels")[0]) == 5
    assert set(table.column("sha256").to_pylist()) == {
        ModelRepository(repo).resolve("tiny", 1).manifest.artefacts[0].sha256
    }


def test_numbers_match_the_in_process_path(repo: Path, images: Path, tmp_path: Path) -> None:
    run_score(_config(repo, images, tmp_path / "out", top_k=3, logits=True, workers=3, batch_size=7))
    table = read_output(tmp_path / "out")
    good = table.filter(pa.compute.is_null(table.column("error")))
    probs, logits = reference(repo, good.column("path").to_pylist())
    expected_idx, expected_scores = top_k(probs, 3)
    assert good.column("indices").to_pylist() == expected_idx.tolist()
    np.testing.assert_allclose(np.array(good.column("scores").to_pylist()), expected_scores, atol=1e-5)
    np.testing.assert_allclose(np.array(good.column("logits").to_pylist()), logits, rtol=1e-6, atol=1e-6)
    assert good.column("labels").to_pylist() == [[LABELS[i] for i in row] for row in expected_idx]


def test_manifest_with_missing_files(repo: Path, images: Path, tmp_path: Path) -> None:
    manifest = tmp_path / "list.csv"
    present = sorted(p for p in images.rglob("img*.png"))[:3]
    lines = [f"k{i},{p}" for i, p in enumerate(present)] + ["gone,does/not/exist.png"]
    manifest.write_text("id,path\n" + "\n".join(lines) + "\n", encoding="utf-8")
    run_score(_config(repo, manifest, tmp_path / "out"))
    rows = {r["id"]: r for r in read_output(tmp_path / "out").to_pylist()}
    assert sorted(rows) == ["gone", "k0", "k1", "k2"]
    assert rows["gone"]["error"] == "cannot read file: No such file or directory"
    assert rows["gone"]["path"] == str(tmp_path / "does/not/exist.png")  # relative to the manifest
    assert all(rows[k]["error"] is None for k in ("k0", "k1", "k2"))


def test_rerun_skips_and_another_model_is_refused(
    repo: Path, images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    own = tmp_path / "repo"
    shutil.copytree(repo, own)
    out = tmp_path / "out"
    run_score(_config(own, images, out, shard_size=100))
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    again = run_score(_config(own, images, out, shard_size=100))
    assert (again.shards_skipped, again.shards_written, again.rows) == (4, 0, GOOD + len(BAD_NAMES))
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")} == before
    publish_model(own, "tiny", seed=2)  # version 2 becomes the newest
    code = main(["score", "--repo", str(own), "--model", "tiny", "--input", str(images), "--output", str(out),
                 "--shard-size", "100"])  # fmt: skip
    assert code == 2
    assert "holds results of a different job (version 1 != 2" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")} == before


def test_ray_engine_missing_is_a_clear_error(
    repo: Path,
    images: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    argv = ["score", "--repo", str(repo), "--model", "tiny", "--input", str(images), "--output",
            str(tmp_path / "out"), "--engine", "ray"]  # fmt: skip
    assert main(argv) == 2
    assert "--engine ray needs Ray Data (ray is not installed): pip install" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_file_name_that_is_not_utf8(repo: Path, images: Path, tmp_path: Path) -> None:
    folder = tmp_path / "odd"
    folder.mkdir()
    odd = folder / os.fsdecode(b"caf\xe9.png")  # Latin-1 bytes: not valid UTF-8
    odd.write_bytes(next(images.rglob("img*.png")).read_bytes())
    run_score(_config(repo, folder, tmp_path / "out"))
    (row,) = read_output(tmp_path / "out").to_pylist()
    assert row["error"] is None and row["id"] == "caf\\xe9.png"  # the bad byte escaped, not lost


def test_cli_happy_path_prints_the_summary(
    repo: Path, images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    code = main(["score", "--repo", str(repo), "--model", "tiny:1", "--input", str(images / "a" / "*.png"),
                 "--output", str(out), "--top-k", "2", "--no-progress"])  # fmt: skip
    assert code == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("complete: ") and " rows (0 errors) in 1 shards" in line and "images/s" in line
    assert read_output(out).column("indices").to_pylist()[0].__len__() == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--repo", "{tmp}/nope"], "model repository {tmp}/nope does not exist"),
        (["--model", "ghost"], "model 'ghost' not found"),
        (["--model", "tiny:9"], "model 'tiny' version 9 not available"),
        (["--model", "tiny:x"], "--model 'tiny:x': version must be a positive integer"),
        (["--input", "{tmp}/*.nothing"], "no inputs found in '{tmp}/*.nothing'"),
        (["--input", "{tmp}/bad.csv"], "has no 'path' column (columns: ['file'])"),
        (["--output", "{tmp}/a-file"], "output {tmp}/a-file is a file, not a directory"),
        (["--batch-size", "64"], "--batch-size 64 exceeds the model's max_batch_size 16"),
        (["--top-k", "0"], "top-k must be an integer >= 1, got 0"),
        (["--device", "tpu"], "device must be 'cpu', 'cuda' or 'cuda:N', got 'tpu'"),
        (["--artefact", "model.plan"], "has no artefact 'model.plan'"),
    ],
)
def test_cli_errors_are_one_line_and_exit_2(
    repo: Path,
    images: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    message: str,
) -> None:
    (tmp_path / "bad.csv").write_text("file\nx.png\n", encoding="utf-8")
    (tmp_path / "a-file").write_text("x", encoding="utf-8")
    base = {"--repo": str(repo), "--model": "tiny", "--input": str(images), "--output": str(tmp_path / "out")}
    extra = [a.format(tmp=tmp_path) for a in args]
    for flag, value in zip(extra[::2], extra[1::2], strict=True):
        base[flag] = value
    argv = ["score", *[x for pair in base.items() for x in pair], "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("kiln score: ")
    assert message.format(tmp=tmp_path) in err
