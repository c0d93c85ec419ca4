"""`kiln score --engine ray` on a local Ray (2 CPUs): same rows, same schema as the local engine."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from serving.scoring.job import ScoreConfig, run_score
from serving.scoring.writer import OUTPUT_SCHEMA
from tests.integration.scoring_fixtures import BAD_NAMES, make_images, publish_model
from tests.integration.test_scoring_local import read_output

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("ray") is None, reason="ray is not installed (pip install 'kiln-serve[ray]')"
    ),
]


def test_ray_engine_equals_local_engine(tmp_path: Path) -> None:
    repo, images = tmp_path / "repo", tmp_path / "images"
    publish_model(repo, "tiny", seed=4)
    make_images(images, 200)
    odd = images / os.fsdecode(b"not-utf8-\xff.png")  # Linux file names are bytes
    odd.write_bytes(next(images.rglob("img*.png")).read_bytes())
    local, ray_out = tmp_path / "local", tmp_path / "ray"
    common = dict(
        repo=repo, model="tiny", inputs=str(images), top_k=3, logits=True, shard_size=64, progress=False
    )
    run_score(ScoreConfig(output=local, batch_size=16, **common))  # type: ignore[arg-type]
    # A separate process: Ray's workers, threads and logging stay out of the test process.
    argv = [sys.executable, "-m", "serving.dispatch", "score", "--engine", "ray", "--repo", str(repo),
            "--model", "tiny", "--input", str(images), "--output", str(ray_out), "--top-k", "3", "--logits",
            "--shard-size", "64", "--batch-size", "10", "--actors", "1", "--no-progress"]  # fmt: skip
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "engine ray" in done.stdout
    ours, theirs = read_output(local), read_output(ray_out)
    assert theirs.schema == ours.schema == OUTPUT_SCHEMA
    assert theirs.num_rows == 200 + len(BAD_NAMES) + 1
    assert theirs.equals(ours)  # every column, every row, bit for bit
    assert sorted(p.name for p in ray_out.glob("part-*")) == sorted(p.name for p in local.glob("part-*"))
    # and the same summary of what the job predicted
    summary = (ray_out / "_predictions.json").read_text(encoding="utf-8")
    assert summary == (local / "_predictions.json").read_text(encoding="utf-8")
    assert '"rows": 201' in summary
