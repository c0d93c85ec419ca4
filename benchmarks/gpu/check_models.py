"""The models of the GPU check: one `kiln train` epoch on synthetic images, then `kiln export`
twice (uint8 NHWC input, the default, and `--fp32-input`), exactly as a user would type them.

The weights are not trained to anything: the figures are about speed. `--force` publishes an
artefact that misses its parity tolerance (an FP16 file of a barely trained ResNet-50 can), and
the export's own report says so in kiln.json; the check records that in its results.
"""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class ModelSpec:
    """One model of the check: preset, image size, precisions to export, largest batch."""

    name: str
    preset: str
    size: int
    precisions: tuple[str, ...]
    max_batch: int
    samples: int


GPU_MODELS = (
    ModelSpec("resnet20", "resnet20", 32, ("fp32", "fp16"), 256, 256),
    ModelSpec("resnet50", "resnet50", 224, ("fp32", "fp16"), 256, 128),
)
CPU_MODELS = (ModelSpec("resnet20", "resnet20", 16, ("fp32",), 8, 64),)
INPUTS = ("uint8", "fp32")  # the repository model `<name>-<input>` takes that input


def repo_name(spec: ModelSpec, kind: str) -> str:
    """The repository model name of `spec` exported with input `kind`."""
    return f"{spec.name}-{kind}"


def _kiln(args: list[str], log: Path) -> float:
    """Run `kiln ARGS`; return the seconds it took (RuntimeError with the output's tail if it fails)."""
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "serving.dispatch", *args], cwd=ROOT, capture_output=True, text=True
    )
    log.write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise RuntimeError(f"kiln {' '.join(args[:3])} ... exited {done.returncode}:\n{tail}")
    return time.perf_counter() - start


def prepare(spec: ModelSpec, device: str, work: Path, repo: Path) -> dict[str, float]:
    """Train (one epoch) and export both inputs into `repo` unless already there; seconds per step."""
    runs, timings = work / "runs", {}
    if not (runs / spec.name / "checkpoint.safetensors").is_file():
        train = ["train", "--model", spec.preset, "--data", "synthetic", "--channels", "3",
                 "--image-size", str(spec.size), "--num-samples", str(spec.samples), "--num-classes", "10",
                 "--epochs", "1", "--batch-size", "32", "--device", device, "--runs-dir", str(runs),
                 "--name", spec.name, "--no-progress"]  # fmt: skip
        timings["train"] = _kiln(train, work / f"train-{spec.name}.log")
    for kind in INPUTS:
        name = repo_name(spec, kind)
        if (repo / name).is_dir():
            continue
        export = ["export", str(runs / spec.name), "--repo", str(repo), "--name", name,
                  "--precision", ",".join(spec.precisions), "--max-batch", str(spec.max_batch),
                  "--parity-samples", "64", "--force", "--no-progress"]  # fmt: skip
        if kind == "fp32":
            export.append("--fp32-input")
        timings[f"export-{kind}"] = _kiln(export, work / f"export-{name}.log")
    return timings
