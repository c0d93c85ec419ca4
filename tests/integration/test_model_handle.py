"""The model handle on a real repository and real ONNX Runtime: its head gives the reference
numbers, a damaged artefact never loads, and the server reads kiln.json once per load."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

import serving.contract.repository as repository_module
from serving.contract.manifest import Manifest
from serving.contract.repository import ModelRepository
from serving.contract.version_policy import VersionPolicy
from serving.errors import ModelUnavailableError
from serving.grpc.config import ServeConfig
from serving.grpc.model_manager import ModelManager
from serving.runtime.backends import BackendOptions
from serving.runtime.model_handle import ArtefactChoice, ModelHandle, resolve
from serving.runtime.topk import softmax
from tests.integration.server_fixtures import LABELS, publish_tiny_model, reference_logits


def _open(repo: Path) -> ModelHandle:
    resolved = resolve(ModelRepository(repo), "tiny", None, policy=VersionPolicy.all())
    return ModelHandle.open(resolved, ArtefactChoice(), options=BackendOptions())


def test_the_handle_warms_up_and_its_head_gives_the_reference_numbers(tmp_path: Path) -> None:
    version_dir = publish_tiny_model(tmp_path, seed=3)
    batch = np.random.default_rng(0).normal(size=(5, 3, 8, 8)).astype(np.float32)
    handle = _open(tmp_path)
    try:
        assert (handle.model, handle.version, handle.artefact.path) == ("tiny", 1, "model.onnx")
        handle.warm_up([1, 8])
        outputs = handle.backend.infer({"input": batch})[handle.head.output]
        scores = handle.head.scores(outputs)
        indices, _ = handle.head.top_k(scores, 10)
    finally:
        handle.close()
    expected = softmax(reference_logits(version_dir / "model.onnx", batch))
    np.testing.assert_allclose(scores, expected, rtol=1e-6)
    assert indices.shape == (5, len(LABELS))  # k clamped to the labels
    assert indices[:, 0].tolist() == expected.argmax(axis=1).tolist()


def test_a_damaged_artefact_is_refused_before_loading(tmp_path: Path) -> None:
    model_file = publish_tiny_model(tmp_path) / "model.onnx"
    data = bytearray(model_file.read_bytes())
    data[-40] ^= 1  # same size: the sha256, not the size check, must catch it
    model_file.write_bytes(bytes(data))
    with pytest.raises(ModelUnavailableError, match=r"'tiny' version 1: .*model.onnx: sha256 mismatch"):
        _open(tmp_path)


def test_the_server_reads_kiln_json_once_per_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    publish_tiny_model(tmp_path)
    reads: list[Path] = []
    real = repository_module.read_manifest

    def counted(path: Path) -> Manifest:
        reads.append(Path(path))
        return real(path)

    monkeypatch.setattr(repository_module, "read_manifest", counted)

    async def load() -> str:
        manager = ModelManager(ServeConfig(repo=tmp_path))
        await manager.load_all()
        try:
            return manager.get("tiny").artefact.path
        finally:
            await manager.close()

    assert asyncio.run(load()) == "model.onnx"
    assert reads == [tmp_path / "tiny" / "1" / "kiln.json"]
