"""Train -> export -> serve for a 1-D model, through the real CLIs and the real clients.

`kiln train --data mnist1d` (a small generated set, one epoch: the point is the chain, not the
accuracy), `kiln export` (FP32), then a server on 127.0.0.1: tritonclient sees the input as
[-1, 1, 40] FP32 and gets the numbers ONNX Runtime computes in-process on the exported file, and
Classify with raw signals ranks the classes the same way.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from serving.clients.client import KilnClient
from serving.contract.manifest import read_manifest
from serving.dispatch import main
from serving.grpc.config import ServeConfig
from tests.integration.server_fixtures import ServerThread, reference_logits

grpcclient = pytest.importorskip("tritonclient.grpc", reason="tritonclient not installed")

TRAIN = [
    "train", "--data", "mnist1d", "--mnist1d-samples", "400", "--model", "mnist1d_cnn",
    "--optimizer", "adamw", "--lr", "0.01", "--epochs", "1", "--batch-size", "32",
    "--threads", "1", "--no-progress",
]  # fmt: skip


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    runs, root = tmp_path_factory.mktemp("runs"), tmp_path_factory.mktemp("repo")
    assert main([*TRAIN, "--runs-dir", str(runs), "--name", "m1d"]) == 0
    assert main(["export", str(runs / "m1d"), "--repo", str(root), "--name", "m1d", "--no-progress"]) == 0
    return root


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[ServerThread]:
    config = ServeConfig(repo=repo, host="127.0.0.1", port=0, metrics_port=None)
    thread = ServerThread(config).start()
    yield thread
    thread.stop()


def test_trained_signal_model_is_served_and_classified(server: ServerThread, repo: Path) -> None:
    batch = np.random.default_rng(0).normal(size=(5, 1, 40)).astype(np.float32)  # raw values
    triton = grpcclient.InferenceServerClient(server.address)
    try:
        meta = triton.get_model_metadata("m1d")
        assert [(t.datatype, list(t.shape)) for t in meta.inputs] == [("FP32", [-1, 1, 40])]
        assert [list(d.dims) for d in triton.get_model_config("m1d").config.input] == [[1, 40]]
        item = grpcclient.InferInput(meta.inputs[0].name, list(batch.shape), "FP32")
        item.set_data_from_numpy(batch)
        served = triton.infer("m1d", [item]).as_numpy(meta.outputs[0].name)
    finally:
        triton.close()
    expected = reference_logits(repo / "m1d" / "1" / "model.onnx", batch)
    np.testing.assert_allclose(served, expected, rtol=1e-5, atol=1e-5)
    with KilnClient(server.address) as client:
        response = client.classify_signals("m1d", batch, top_k=3)
    ranked = np.argsort(-expected, axis=1, kind="stable")[:, :3]
    assert [[p.index for p in r.predictions] for r in response.results] == ranked.tolist()
    labels = read_manifest(repo / "m1d" / "1" / "kiln.json").labels
    assert [r.predictions[0].label for r in response.results] == [labels[i] for i in ranked[:, 0]]
