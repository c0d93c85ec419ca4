"""`kiln export`'s default image input (uint8 NHWC, preprocessing in the graph) through every client.

One untrained 3-channel ResNet exported twice from the same run: by default ("img": uint8
[N, H, W, C], 4x fewer bytes on the wire) and with `--fp32-input` ("f32": normalised float32
[N, C, H, W]). Served by the real server, the uint8 model answers tritonclient with the logits
ONNX Runtime computes in-process, the same logits (1e-4) as the FP32-input model fed the host
normalisation, and Classify, `kiln classify`, `kiln score`, `kiln bench` and perf_analyzer work
on it unchanged.
"""

from __future__ import annotations

import io
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from serving.clients.client import KilnClient
from serving.contract.manifest import read_manifest
from serving.dispatch import main
from serving.grpc.config import ServeConfig
from tests.integration.server_fixtures import ServerThread, reference_logits
from training.checkpoint import BEST_WEIGHTS, save_weights
from training.data import DataSpec, load_dataset
from training.models import build_model, preset
from training.run_record import input_record, write_run_json

grpcclient = pytest.importorskip("tritonclient.grpc", reason="tritonclient not installed")

SIZE = 16


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seeded untrained 3-channel run, exported by default ("img") and with --fp32-input ("f32")."""
    spec = DataSpec(name="synthetic", image_size=SIZE, channels=3, num_samples=200)
    bundle = load_dataset(spec)
    config = preset("resnet20", depth=8, width=4, in_channels=3, num_classes=len(bundle.class_names))
    torch.manual_seed(0)
    run = tmp_path_factory.mktemp("runs") / "rgb"
    run.mkdir()
    save_weights(build_model(config), run / BEST_WEIGHTS)
    record = input_record(channels=3, size=SIZE, channel_order="RGB", mean=bundle.mean, std=bundle.std)
    write_run_json(run, run_id=run.name, model=config.to_dict(), class_names=bundle.class_names,
                   input_spec=record, data=spec.to_dict(), dataset_fingerprint=bundle.fingerprint,
                   train={}, metrics={}, seed=0)  # fmt: skip
    root = tmp_path_factory.mktemp("repo")
    base = ["export", str(run), "--repo", str(root), "--no-progress", "--parity-samples", "32"]
    assert main([*base, "--name", "img", "--max-batch", "8"]) == 0
    assert main([*base, "--name", "f32", "--max-batch", "8", "--fp32-input"]) == 0
    return root


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[ServerThread]:
    thread = ServerThread(ServeConfig(repo=repo, host="127.0.0.1", port=0, metrics_port=None)).start()
    yield thread
    thread.stop()


def _pixels(count: int) -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, size=(count, SIZE, SIZE, 3), dtype=np.uint8)


def _infer(address: str, model: str, batch: np.ndarray, datatype: str) -> np.ndarray:
    triton = grpcclient.InferenceServerClient(address)
    try:
        item = grpcclient.InferInput("input", list(batch.shape), datatype)
        item.set_data_from_numpy(batch)
        return triton.infer(model, [item]).as_numpy("logits")
    finally:
        triton.close()


def test_default_is_uint8_nhwc_and_the_flag_keeps_fp32(repo: Path, server: ServerThread) -> None:
    img = read_manifest(repo / "img" / "1" / "kiln.json").input
    f32 = read_manifest(repo / "f32" / "1" / "kiln.json").input
    assert (img.datatype, img.layout, img.shape) == ("UINT8", "NHWC", (-1, SIZE, SIZE, 3))
    assert (f32.datatype, f32.layout, f32.shape) == ("FP32", "NCHW", (-1, 3, SIZE, SIZE))
    assert img.preprocessing is not None and img.preprocessing.in_graph
    assert f32.preprocessing is not None and not f32.preprocessing.in_graph
    triton = grpcclient.InferenceServerClient(server.address)
    try:
        meta = triton.get_model_metadata("img")
        assert [(t.datatype, list(t.shape)) for t in meta.inputs] == [("UINT8", [-1, SIZE, SIZE, 3])]
    finally:
        triton.close()


def test_tritonclient_uint8_matches_fp32_input(repo: Path, server: ServerThread) -> None:
    pixels = _pixels(5)
    served = _infer(server.address, "img", pixels, "UINT8")
    np.testing.assert_allclose(served, reference_logits(repo / "img" / "1" / "model.onnx", pixels), atol=1e-5)
    pre = read_manifest(repo / "f32" / "1" / "kiln.json").input.preprocessing
    assert pre is not None
    mean, std = np.float32(pre.mean).reshape(1, 3, 1, 1), np.float32(pre.std).reshape(1, 3, 1, 1)
    host = (pixels.transpose(0, 3, 1, 2).astype(np.float32) * np.float32(pre.scale) - mean) / std
    fp32 = _infer(server.address, "f32", np.ascontiguousarray(host), "FP32")
    np.testing.assert_allclose(served, fp32, rtol=1e-4, atol=1e-4 * float(np.abs(fp32).max()))


def _png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def test_classify_and_kiln_classify(repo: Path, server: ServerThread, tmp_path: Path) -> None:
    pixels = _pixels(3)
    expected = reference_logits(repo / "img" / "1" / "model.onnx", pixels).argmax(1)
    with KilnClient(server.address) as client:
        response = client.classify("img", [_png(p) for p in pixels], top_k=1)
    assert [r.predictions[0].index for r in response.results] == expected.tolist()
    path = tmp_path / "one.png"
    path.write_bytes(_png(pixels[0]))
    assert main(["classify", str(path), "--server", server.address, "--model", "img"]) == 0


def test_kiln_score_and_bench(repo: Path, server: ServerThread, tmp_path: Path) -> None:
    pixels = _pixels(4)
    for i, p in enumerate(pixels):
        (tmp_path / f"{i}.png").write_bytes(_png(p))
    out = tmp_path / "out"
    argv = ["score", "--repo", str(repo), "--model", "img", "--input", str(tmp_path / "*.png"),
            "--output", str(out), "--top-k", "1", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    table = pq.read_table(sorted(out.glob("part-*.parquet"))).to_pydict()
    top1 = dict(zip(table["path"], (i[0] for i in table["indices"]), strict=True))
    expected = reference_logits(repo / "img" / "1" / "model.onnx", pixels).argmax(1)
    assert [top1[str(tmp_path / f"{i}.png")] for i in range(4)] == expected.tolist()
    bench = ["bench", "--server", server.address, "--model", "img", "--concurrency", "2", "--seconds", "0.3"]
    assert main(bench) == 0


@pytest.mark.slow
def test_perf_analyzer_on_the_uint8_model(server: ServerThread) -> None:
    from tests.integration.test_server_perf_analyzer import PERF_ANALYZER

    if PERF_ANALYZER is None:
        pytest.skip("perf_analyzer not found")
    cmd = [PERF_ANALYZER, "-i", "grpc", "-u", server.address, "-m", "img", "--concurrency-range", "2",
           "--measurement-mode", "count_windows", "--measurement-request-count", "100",
           "--max-trials", "5", "--stability-percentage", "999"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "infer/sec" in done.stdout, done.stdout + done.stderr
