"""Classify over gRPC with PNG, JPEG and raw pixels, checked against ONNX Runtime in-process."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from protos.kiln.classify.v1 import classify_pb2 as cpb
from serving.clients.client import KilnClient, image_message
from serving.grpc.config import ServeConfig
from tests.integration.server_fixtures import (
    LABELS,
    ServerThread,
    normalise,
    publish_tiny_model,
    reference_logits,
)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("repo")
    publish_tiny_model(root, "tiny", seed=2, max_batch_size=4)
    return root


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[ServerThread]:
    config = ServeConfig(repo=repo, host="127.0.0.1", port=0, metrics_port=None, default_top_k=3)
    thread = ServerThread(config).start()
    yield thread
    thread.stop()


def _pixels(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 8, 8, 3), dtype=np.uint8)


def _encode(pixels: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, quality=95)
    return buffer.getvalue()


def _expected_probs(repo: Path, pixels: np.ndarray) -> np.ndarray:
    logits = reference_logits(repo / "tiny" / "1" / "model.onnx", normalise(pixels)).astype(np.float64)
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


def _check(response: cpb.ClassifyResponse, probs: np.ndarray, k: int) -> None:
    assert response.model == "tiny" and response.version == "1" and len(response.results) == len(probs)
    for result, row in zip(response.results, probs, strict=True):
        order = np.argsort(-row, kind="stable")[:k]
        assert [p.index for p in result.predictions] == order.tolist()
        assert [p.label for p in result.predictions] == [LABELS[i] for i in order]
        np.testing.assert_allclose([p.score for p in result.predictions], row[order], rtol=1e-4, atol=1e-6)


def test_png_is_exact(client: KilnClient, repo: Path) -> None:
    pixels = _pixels(3)
    response = client.classify("tiny", [_encode(p, "PNG") for p in pixels], top_k=2, request_id="png-1")
    _check(response, _expected_probs(repo, pixels), 2)
    assert response.request_id == "png-1"
    t = response.timings
    assert t.total_us >= t.preprocess_us and t.total_us > 0 and t.compute_us > 0


def test_jpeg_matches_its_decoded_pixels(client: KilnClient, repo: Path) -> None:
    pixels = _pixels(2, seed=1)
    encoded = [_encode(p, "JPEG") for p in pixels]
    decoded = np.stack([np.asarray(Image.open(io.BytesIO(e)).convert("RGB")) for e in encoded])
    _check(client.classify("tiny", encoded), _expected_probs(repo, decoded), 3)  # default_top_k = 3


def test_raw_pixels_and_more_images_than_max_batch(client: KilnClient, repo: Path) -> None:
    pixels = _pixels(10, seed=2)  # 10 images > max_batch_size 4: split into batches server-side
    response = client.classify("tiny", list(pixels), top_k=10)
    _check(response, _expected_probs(repo, pixels), len(LABELS))  # top_k capped at the class count


def test_greyscale_raw_and_rgba_png_are_converted(client: KilnClient, repo: Path) -> None:
    grey = _pixels(1, seed=3)[0, :, :, 0]
    rgba = np.dstack([_pixels(1, seed=4)[0], np.full((8, 8), 255, np.uint8)])
    response = client.classify("tiny", [grey, _encode(rgba, "PNG")], top_k=1)
    expected = _expected_probs(repo, np.stack([np.dstack([grey] * 3), rgba[:, :, :3]]))
    _check(response, expected, 1)


def test_stream_answers_in_order_and_survives_a_bad_request(client: KilnClient, repo: Path) -> None:
    pixels = _pixels(4, seed=5)
    requests = [
        cpb.ClassifyRequest(model="tiny", images=[image_message(p)], top_k=1, request_id=f"r{i}")
        for i, p in enumerate(pixels)
    ]
    requests.insert(
        2, cpb.ClassifyRequest(model="tiny", images=[cpb.Image(encoded=b"junk")], request_id="bad")
    )
    replies = list(client.classify_stream(requests, timeout=30))
    assert [r.request_id for r in replies] == ["r0", "r1", "bad", "r2", "r3"]
    assert replies[2].WhichOneof("result") == "error" and replies[2].error.code == 3  # INVALID_ARGUMENT
    assert "cannot decode image" in replies[2].error.message
    probs = _expected_probs(repo, pixels)
    for reply, row in zip([r for r in replies if r.request_id != "bad"], probs, strict=True):
        _check(reply.response, row[None], 1)


def test_raw_image_with_wrong_byte_count(client: KilnClient) -> None:
    import grpc

    bad = cpb.Image(raw=cpb.RawImage(height=8, width=8, channels=3, data=b"\0" * 100))
    with pytest.raises(grpc.RpcError) as info:
        client.classifier.Classify(cpb.ClassifyRequest(model="tiny", images=[bad]), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "image 0: raw data is 100 bytes, expected 192 (8x8x3 uint8)" in info.value.details()


def test_kiln_classify_cli_prints_a_table(
    server: ServerThread, repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import argparse

    from serving.clients import classify_cli

    pixels = _pixels(2, seed=7)
    paths = []
    for i, p in enumerate(pixels):
        paths.append(tmp_path / f"digit{i}.png")
        paths[-1].write_bytes(_encode(p, "PNG"))
    parser = argparse.ArgumentParser()
    classify_cli.add_arguments(parser)
    args = parser.parse_args(
        [*map(str, paths), "--server", server.address, "--model", "tiny", "--top-k", "2"]
    )
    assert classify_cli.run(args) == 0
    out = capsys.readouterr().out
    best = np.argmax(_expected_probs(repo, pixels), axis=1)
    for path, index in zip(paths, best, strict=True):
        line = next(line for line in out.splitlines() if path.name in line)
        assert LABELS[index] in line
    assert "tiny v1" in out and "server: preprocess" in out
    args = parser.parse_args([str(paths[0]), "--server", server.address, "--model", "nope"])
    assert classify_cli.run(args) == 1
    assert "NOT_FOUND: model 'nope' not found" in capsys.readouterr().err
