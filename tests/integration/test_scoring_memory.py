"""Memory stays flat whatever the input size: peak RSS for 20,000 inputs vs 1,000.

The large input is a manifest listing the same small files under 20,000 distinct ids, so no disk
is spent; the pipeline still reads, decodes and scores every row. What may grow with the input is
the input list itself (~100 bytes a row); the pipeline's buffers are bounded by the queue sizes
and the shard size.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.scoring_fixtures import make_images, publish_model

ROOT = Path(__file__).resolve().parents[2]
CHILD = """
import resource, sys
from serving.dispatch import main
code = main(sys.argv[1:])
print(code, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def _peak_rss_kib(repo: Path, manifest: Path, out: Path) -> int:
    argv = [sys.executable, "-c", CHILD, "score", "--repo", str(repo), "--model", "tiny", "--input",
            str(manifest), "--output", str(out), "--shard-size", "1000", "--no-progress"]  # fmt: skip
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    code, rss = done.stdout.strip().splitlines()[-1].split()
    assert code == "0"
    return int(rss)


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_the_input(tmp_path: Path) -> None:
    publish_model(tmp_path / "repo", "tiny")
    files = [p for p in make_images(tmp_path / "images", 50) if p.suffix == ".png" and p.stat().st_size]
    peaks = {}
    for rows in (1_000, 20_000):
        manifest = tmp_path / f"m{rows}.csv"
        lines = (f"{i:07d},{files[i % len(files)]}" for i in range(rows))
        manifest.write_text("id,path\n" + "\n".join(lines) + "\n", encoding="utf-8")
        peaks[rows] = _peak_rss_kib(tmp_path / "repo", manifest, tmp_path / f"out{rows}")
    growth_mib = (peaks[20_000] - peaks[1_000]) / 1024
    assert growth_mib < 24, f"peak RSS grew {growth_mib:.1f} MiB from 1k to 20k inputs: {peaks}"
