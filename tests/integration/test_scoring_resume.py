"""Exactly-once under kill -9: a real `kiln score` process is SIGKILLed mid-run, then rerun."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from serving.scoring.job import ScoreConfig, run_score
from tests.integration.scoring_fixtures import BAD_NAMES, encode, make_images, publish_model
from tests.integration.test_scoring_local import read_output

ROOT = Path(__file__).resolve().parents[2]
COUNT = 600  # photo-sized JPEGs: ~1 ms each to decode, so one decode thread takes about a second
SHARD = 8


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("repo")
    publish_model(root, "tiny", seed=3)
    return root


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    make_images(folder, 0)  # just the bad files
    rng = np.random.default_rng(5)
    for i in range(COUNT):
        base = rng.integers(0, 256, size=(45, 60, 3), dtype=np.uint8)
        pixels = np.asarray(Image.fromarray(base).resize((480, 360), Image.Resampling.BILINEAR))
        (folder / f"photo{i:04d}.jpg").write_bytes(encode(pixels, "JPEG"))
    return folder


def _start(repo: Path, images: Path, out: Path) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "serving.dispatch", "score", "--repo", str(repo), "--model", "tiny",
            "--input", str(images), "--output", str(out), "--shard-size", str(SHARD), "--batch-size", "4",
            "--workers", "1", "--no-progress"]  # fmt: skip
    return subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _records(out: Path) -> list[Path]:
    ledger = out / "_ledger"
    return sorted(ledger.glob("part-*.json")) if ledger.is_dir() else []


def _kill_after_commits(proc: subprocess.Popen[bytes], out: Path, commits: int, timeout: float = 60) -> None:
    """SIGKILL `proc` as soon as `commits` shard records exist (polling every 2 ms)."""
    deadline = time.monotonic() + timeout
    while len(_records(out)) < commits:
        if proc.poll() is not None:
            _, err = proc.communicate()
            pytest.fail(f"kiln score ended (rc {proc.returncode}) before {commits} commits: {err.decode()}")
        if time.monotonic() > deadline:
            proc.kill()
            proc.communicate()
            pytest.fail("no shard was committed in time")
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)  # reaps it and closes the pipe
    assert proc.returncode == -signal.SIGKILL


def _shard_stats(out: Path, records: list[Path]) -> dict[str, tuple[int, int]]:
    stats = {}
    for record in records:
        shard = out / f"{record.stem}.parquet"
        info = shard.stat()
        stats[shard.name] = (info.st_ino, info.st_mtime_ns)
    return stats


def _check_exactly_once(out: Path, images: Path) -> None:
    ids = read_output(out).column("id").to_pylist()
    expected = sorted(p.name for p in images.iterdir())
    assert ids == expected  # sorted, each input once: no duplicates, none missing
    assert not list(out.rglob("*.tmp"))


def test_kill_9_after_the_first_commit_then_resume(repo: Path, images: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    total = -(-(COUNT + len(BAD_NAMES)) // SHARD)
    _kill_after_commits(_start(repo, images, out), out, commits=1)
    committed = _records(out)
    assert 1 <= len(committed) < total, "the kill must land mid-run"
    before = _shard_stats(out, committed)
    summary = run_score(ScoreConfig(repo=repo, model="tiny", inputs=str(images), output=out,
                                    shard_size=SHARD, batch_size=4, progress=False))  # fmt: skip
    assert summary.complete and summary.shards == total
    assert summary.shards_skipped == len(committed)
    assert summary.shards_written == total - len(committed)
    assert _shard_stats(out, committed) == before  # committed shards were not recomputed
    _check_exactly_once(out, images)
    assert summary.errors == len(BAD_NAMES)


def test_killed_again_and_again(repo: Path, images: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    for round_ in range(3):
        done = len(_records(out))
        _kill_after_commits(_start(repo, images, out), out, commits=done + 1 + round_)
    rerun = _start(repo, images, out)
    _, err = rerun.communicate(timeout=120)
    assert rerun.returncode == 0, err.decode()
    _check_exactly_once(out, images)
