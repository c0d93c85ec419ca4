"""A 1-D (signal) model served like any other: a real server on 127.0.0.1, real clients.

KServe v2 (tritonclient): metadata [-1, C, L], Triton-style config dims [C, L], typed and raw
ModelInfer matching ONNX Runtime in-process, perf_analyzer fed real signal values. Classify: an
image sent to a signal model is refused with FAILED_PRECONDITION (unary and stream, and through
`kiln classify`); raw signals get top-k labels; `kiln score` refuses a signal model up front.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf import text_format
from PIL import Image

from protos.inference import model_config_pb2 as mc
from protos.kiln.classify.v1 import classify_pb2 as cpb
from serving.clients.client import KilnClient, image_message, signal_message
from serving.contract.manifest import read_manifest
from serving.grpc.config import ServeConfig
from serving.runtime.preprocess import Preprocessor
from tests.integration.server_fixtures import ServerThread, publish_tiny_model, reference_logits
from tests.integration.signal_fixtures import SIGNAL_LABELS, SIGNAL_LENGTH, publish_signal_model, signals
from tests.integration.test_server_perf_analyzer import PERF_ANALYZER

grpcclient = pytest.importorskip("tritonclient.grpc", reason="tritonclient not installed")

REFUSAL = f"model sig takes a signal of length {SIGNAL_LENGTH}, not an image"


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("repo")
    publish_signal_model(root, "sig", seed=3, max_batch_size=4)
    publish_tiny_model(root, "tiny", seed=1, max_batch_size=4)  # an image model beside it
    return root


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[ServerThread]:
    config = ServeConfig(repo=repo, host="127.0.0.1", port=0, metrics_port=None, default_top_k=3)
    thread = ServerThread(config).start()
    yield thread
    thread.stop()


def _onnx(repo: Path) -> Path:
    return repo / "sig" / "1" / "model.onnx"


def _probs(repo: Path, batch: np.ndarray) -> np.ndarray:
    logits = reference_logits(_onnx(repo), batch).astype(np.float64)
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


def _png(seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_metadata_and_config_describe_a_signal(triton: grpcclient.InferenceServerClient, repo: Path) -> None:
    model = triton.get_model_metadata("sig")
    assert [(t.name, t.datatype, list(t.shape)) for t in model.inputs] == [("input", "FP32", [-1, 1, 40])]
    assert [(t.name, t.datatype, list(t.shape)) for t in model.outputs] == [("logits", "FP32", [-1, 10])]
    config = triton.get_model_config("sig").config
    assert config.max_batch_size == 4 and config.HasField("dynamic_batching")
    assert [(i.name, list(i.dims)) for i in config.input] == [("input", [1, 40])]
    assert config.input[0].data_type == 11 and config.input[0].format == 0  # TYPE_FP32, FORMAT_NONE
    assert [(o.name, list(o.dims)) for o in config.output] == [("logits", [10])]
    on_disk = text_format.Parse((repo / "sig" / "config.pbtxt").read_text(), mc.ModelConfig())
    assert mc.ModelConfig.FromString(config.SerializeToString()) == on_disk  # the file says what runs


@pytest.mark.parametrize("rows", [1, 4])
def test_tritonclient_raw_and_typed_infer_match_onnxruntime(
    triton: grpcclient.InferenceServerClient, client: KilnClient, repo: Path, rows: int
) -> None:
    batch = signals(rows, seed=rows)
    item = grpcclient.InferInput("input", list(batch.shape), "FP32")
    item.set_data_from_numpy(batch)
    raw = triton.infer("sig", [item]).as_numpy("logits")
    expected = reference_logits(_onnx(repo), batch)
    np.testing.assert_allclose(raw, expected, rtol=1e-5, atol=1e-5)
    typed = client.infer("sig", {"input": batch}, raw=False)["logits"]
    np.testing.assert_array_equal(typed, raw)


def test_tritonclient_classification_extension(triton: grpcclient.InferenceServerClient, repo: Path) -> None:
    batch = signals(2, seed=7)
    item = grpcclient.InferInput("input", list(batch.shape), "FP32")
    item.set_data_from_numpy(batch)
    out = grpcclient.InferRequestedOutput("logits", class_count=1)
    top = triton.infer("sig", [item], outputs=[out]).as_numpy("logits")
    best = np.argmax(reference_logits(_onnx(repo), batch), axis=1)
    assert [row[0].decode().split(":")[2] for row in top] == [SIGNAL_LABELS[i] for i in best]


def test_wrong_signal_length_is_invalid_argument(triton: grpcclient.InferenceServerClient) -> None:
    batch = np.zeros((1, 1, SIGNAL_LENGTH - 1), np.float32)
    item = grpcclient.InferInput("input", list(batch.shape), "FP32")
    item.set_data_from_numpy(batch)
    with pytest.raises(grpcclient.InferenceServerException) as info:
        triton.infer("sig", [item])
    assert "INVALID_ARGUMENT" in str(info.value.status())
    assert "expected shape [-1, 1, 40], got [1, 1, 39]" in info.value.message()


def test_classify_refuses_an_image_unary(client: KilnClient) -> None:
    with pytest.raises(grpc.RpcError) as info:
        client.classify("sig", [_png()], timeout=10)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert info.value.details() == REFUSAL


def test_classify_stream_refuses_an_image_and_carries_on(client: KilnClient, repo: Path) -> None:
    batch = signals(1, seed=11)
    requests = [
        cpb.ClassifyRequest(model="sig", images=[image_message(_png())], request_id="img"),
        cpb.ClassifyRequest(model="sig", signals=[signal_message(batch[0])], top_k=1, request_id="sig"),
    ]
    replies = list(client.classify_stream(requests, timeout=30))
    assert [r.request_id for r in replies] == ["img", "sig"]
    assert replies[0].WhichOneof("result") == "error"
    assert replies[0].error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert replies[0].error.message == REFUSAL
    best = int(np.argmax(_probs(repo, batch)[0]))
    assert [p.index for p in replies[1].response.results[0].predictions] == [best]


def test_classify_signals_returns_top_k(client: KilnClient, repo: Path) -> None:
    batch = signals(6, seed=5)  # 6 rows > max_batch_size 4: split server-side
    response = client.classify_signals("sig", batch, top_k=2, request_id="s-1")
    assert response.model == "sig" and response.version == "1" and response.request_id == "s-1"
    probs = _probs(repo, batch)
    assert len(response.results) == len(batch)
    for result, row in zip(response.results, probs, strict=True):
        order = np.argsort(-row, kind="stable")[:2]
        assert [p.index for p in result.predictions] == order.tolist()
        assert [p.label for p in result.predictions] == [SIGNAL_LABELS[i] for i in order]
        np.testing.assert_allclose([p.score for p in result.predictions], row[order], rtol=1e-4, atol=1e-6)
    one = client.classify_signals("sig", [batch[0, 0]])  # a bare [L] signal is one channel
    assert [p.index for p in one.results[0].predictions] == np.argsort(-probs[0])[:3].tolist()


@pytest.mark.parametrize(
    ("request_", "code", "message"),
    [
        (
            cpb.ClassifyRequest(model="sig", signals=[signal_message(np.zeros((1, 39), np.float32))]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "signal 0 is 1x39 (channels x length), model sig takes 1x40",
        ),
        (
            cpb.ClassifyRequest(model="sig", signals=[cpb.Signal(channels=1, length=40, data=b"\0" * 100)]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "signal 0: data is 100 bytes, expected 160 (1x40 float32)",
        ),
        (
            cpb.ClassifyRequest(model="sig", signals=[signal_message(np.full((1, 40), np.nan, np.float32))]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "signal 0: values must be finite",
        ),
        (
            cpb.ClassifyRequest(
                model="sig",
                signals=[signal_message(np.zeros((1, 40), np.float32))],
                images=[cpb.Image(encoded=_png())],
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "send images or signals in one request, not both",
        ),
        (
            cpb.ClassifyRequest(model="tiny", signals=[signal_message(np.zeros((3, 40), np.float32))]),
            grpc.StatusCode.FAILED_PRECONDITION,
            "model tiny takes images, not signals",
        ),
    ],
    ids=["wrong-length", "wrong-bytes", "nan", "both-kinds", "image-model"],
)
def test_bad_signal_requests_are_refused(
    client: KilnClient, request_: cpb.ClassifyRequest, code: grpc.StatusCode, message: str
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        client.classifier.Classify(request_, timeout=10)
    assert info.value.code() == code and message in info.value.details()


def test_kiln_classify_cli_refuses_images_and_takes_npy(
    server: ServerThread, repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from serving.clients import classify_cli

    parser = argparse.ArgumentParser()
    classify_cli.add_arguments(parser)
    image = tmp_path / "x.png"
    image.write_bytes(_png())
    refused = parser.parse_args([str(image), "--server", server.address, "--model", "sig"])
    assert classify_cli.run(refused) == 1
    assert f"FAILED_PRECONDITION: {REFUSAL}" in capsys.readouterr().err
    batch = signals(2, seed=13)
    paths = [tmp_path / f"s{i}.npy" for i in range(2)]
    for path, row in zip(paths, batch, strict=True):
        np.save(path, row)
    args = parser.parse_args([*map(str, paths), "--server", server.address, "--model", "sig", "--top-k", "1"])
    assert classify_cli.run(args) == 0
    out = capsys.readouterr().out
    for path, best in zip(paths, np.argmax(_probs(repo, batch), axis=1), strict=True):
        line = next(line for line in out.splitlines() if path.name in line)
        assert SIGNAL_LABELS[best] in line
    mixed = parser.parse_args([str(image), str(paths[0]), "--model", "sig"])
    assert classify_cli.run(mixed) == 2
    assert "not both" in capsys.readouterr().err


def test_kiln_score_refuses_a_signal_model(repo: Path, tmp_path: Path) -> None:
    from serving.scoring.job import ScoreConfig, prepare_job

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "x.png").write_bytes(_png())
    config = ScoreConfig(repo=repo, model="sig", inputs=str(tmp_path / "in"), output=tmp_path / "out")
    with pytest.raises(ValueError, match=f"{REFUSAL}; kiln score reads image files only"):
        prepare_job(config)
    signal_spec = read_manifest(repo / "sig" / "1" / "kiln.json").input
    with pytest.raises(ValueError, match="takes a signal of length 40 \\(1 channel\\(s\\)\\)"):
        Preprocessor(signal_spec)


@pytest.mark.skipif(PERF_ANALYZER is None, reason="perf_analyzer not found")
def test_perf_analyzer_completes_with_real_signals(server: ServerThread, tmp_path: Path) -> None:
    rows = signals(4, seed=17)
    data = [{"input": {"content": r.ravel().tolist(), "shape": list(r.shape)}} for r in rows]
    (tmp_path / "input.json").write_text(json.dumps({"data": data}))
    cmd = [
        str(PERF_ANALYZER), "-i", "grpc", "-u", server.address, "-m", "sig", "-b", "1",
        "--input-data", str(tmp_path / "input.json"), "--concurrency-range", "2",
        "--measurement-mode", "count_windows", "--measurement-request-count", "100",
        "--max-trials", "5", "--stability-percentage", "999",
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "Throughput:" in output and "infer/sec" in output, output
