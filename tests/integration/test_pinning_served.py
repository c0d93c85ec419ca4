"""`pin_ort_threads` through the real server (serving/runtime/backends/cpu_pinning.py): `kiln serve`
on 127.0.0.1 with real ONNX Runtime sessions pins each instance's pool threads to cores of their
own and answers tritonclient with the model's numbers; `--no-pin-ort-threads` leaves every
thread free. The kernel's own view of the threads is checked in tests/unit/test_cpu_pinning.py."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from serving.runtime.backends.cpu_pinning import CoreBlock, process_cpus
from tests.integration.server_fixtures import (
    local_config,
    publish_tiny_model,
    reference_logits,
    running_server,
)

CPUS = process_cpus()
pytestmark = pytest.mark.skipif(len(CPUS) < 2, reason="pinning needs a process with 2+ CPUs")


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("repo")
    publish_tiny_model(path, "tiny", max_batch_size=8)
    return path


def _answers(address: str, rows: np.ndarray) -> np.ndarray:
    client = grpcclient.InferenceServerClient(address)
    try:
        got = []
        for row in rows:  # one row at a time: each a lone request, the case pinning is for
            tensor = grpcclient.InferInput("input", [1, *row.shape], "FP32")
            tensor.set_data_from_numpy(row[None])
            got.append(client.infer("tiny", [tensor]).as_numpy("logits"))
        return np.concatenate(got)
    finally:
        client.close()


def test_the_server_pins_each_instance_and_answers_the_models_numbers(repo: Path) -> None:
    rows = np.random.default_rng(8).normal(size=(12, 3, 8, 8)).astype(np.float32)
    before = os.sched_getaffinity(0)
    with running_server(local_config(repo)) as srv:
        backend = srv.server.manager.get("tiny").backend  # type: ignore[attr-defined]
        # one instance on every CPU of the process: the caller's core first, a core per pool thread
        assert backend.core_blocks == (CoreBlock(CPUS[0], tuple(CPUS[1:])),)
        got = _answers(srv.address, rows)  # type: ignore[attr-defined]
    np.testing.assert_allclose(
        got, reference_logits(repo / "tiny" / "1" / "model.onnx", rows), rtol=1e-5, atol=1e-5
    )
    assert os.sched_getaffinity(0) == before  # the test's own thread was never the one moved


def test_no_pin_ort_threads_leaves_them_free(repo: Path) -> None:
    rows = np.random.default_rng(9).normal(size=(4, 3, 8, 8)).astype(np.float32)
    with running_server(local_config(repo, pin_ort_threads=False)) as srv:
        assert srv.server.manager.get("tiny").backend.core_blocks == (None,)  # type: ignore[attr-defined]
        got = _answers(srv.address, rows)  # type: ignore[attr-defined]
    np.testing.assert_allclose(
        got, reference_logits(repo / "tiny" / "1" / "model.onnx", rows), rtol=1e-5, atol=1e-5
    )
