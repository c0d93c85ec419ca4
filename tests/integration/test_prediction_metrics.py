"""Prediction-distribution metrics on a real server: kiln_predictions_total counts each served row
by its top-1 class (past prediction_classes as "other"), kiln_prediction_confidence its top-1
probability, for ModelInfer and Classify alike; unloading a version removes its series."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import pytest

from serving.clients.client import KilnClient
from serving.grpc.config import ServeConfig
from serving.grpc.predictions import PredictionMetrics
from serving.runtime.topk import ClassificationHead, softmax
from tests.integration.server_fixtures import LABELS, publish_tiny_model, reference_logits, running_server

ROWS = np.random.default_rng(7).normal(size=(8, 3, 8, 8)).astype(np.float32)
IMAGES = np.random.default_rng(8).integers(0, 256, size=(3, 8, 8, 3), dtype=np.uint8)


def _config(repo: Path, classes: int) -> ServeConfig:
    return ServeConfig(
        repo=repo,
        host="127.0.0.1",
        port=0,
        metrics_port=None,
        prediction_classes=classes,
        repository_control=True,
    )


def test_served_rows_are_counted_by_class_and_confidence(tmp_path: Path) -> None:
    publish_tiny_model(tmp_path, seed=1)
    probabilities = softmax(reference_logits(tmp_path / "tiny" / "1" / "model.onnx", ROWS))
    expected = {label: int(np.sum(probabilities.argmax(1) == i)) for i, label in enumerate(LABELS)}
    with running_server(_config(tmp_path, classes=len(LABELS))) as srv, KilnClient(srv.address) as client:
        client.infer("tiny", {"input": ROWS})
        classified = client.classify("tiny", list(IMAGES))
        registry = srv.server.registry
        counts = {
            label: registry.get_sample_value(
                "kiln_predictions_total", {"model": "tiny", "version": "1", "class": label}
            )
            or 0
            for label in LABELS
        }
        labels = {"model": "tiny", "version": "1"}
        observed = registry.get_sample_value("kiln_prediction_confidence_count", labels)
        below_half = registry.get_sample_value("kiln_prediction_confidence_bucket", {**labels, "le": "0.5"})
        client.unload_model("tiny")
        after = registry.get_sample_value("kiln_prediction_confidence_count", labels)
    for result in classified.results:
        expected[result.predictions[0].label] += 1
    confidence = [*probabilities.max(1), *(r.predictions[0].score for r in classified.results)]
    assert counts == expected and observed == len(ROWS) + len(IMAGES)
    assert below_half == sum(c <= 0.5 for c in confidence)
    assert after is None


def test_classes_past_the_limit_count_as_other(tmp_path: Path) -> None:
    publish_tiny_model(tmp_path, seed=1)
    probabilities = softmax(reference_logits(tmp_path / "tiny" / "1" / "model.onnx", ROWS))
    with running_server(_config(tmp_path, classes=2)) as srv, KilnClient(srv.address) as client:
        client.infer("tiny", {"input": ROWS})
        registry = srv.server.registry
        labels = {"model": "tiny", "version": "1"}
        other = registry.get_sample_value("kiln_predictions_total", {**labels, "class": "other"}) or 0
        named = {
            c: registry.get_sample_value("kiln_predictions_total", {**labels, "class": c}) for c in LABELS
        }
    assert other == int(np.sum(probabilities.argmax(1) >= 2))
    assert named["star"] is None and named["wave"] is None


def _wait(condition, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def test_rows_are_counted_without_a_scrape_and_pending_rows_are_bounded(tmp_path: Path) -> None:
    """The batch worker only hands its rows over; the recorder's own thread counts them within
    FLUSH_INTERVAL_S with nobody scraping (what a worker of `workers` > 1 relies on), and past
    `max_pending_rows` the worker counts at once, so what waits stays bounded."""
    publish_tiny_model(tmp_path, seed=1)
    with running_server(_config(tmp_path, classes=len(LABELS))) as srv, KilnClient(srv.address) as client:
        recorder = srv.server.metrics.extensions["predictions"]
        client.infer("tiny", {"input": ROWS})
        assert _wait(lambda: recorder.pending_rows == 0)  # no scrape so far: the timer counted them
        loaded = srv.server.manager.get("tiny")
        bounded = PredictionMetrics(
            srv.server.metrics, len(LABELS), 0, flush_interval_s=3600, max_pending_rows=10
        )
        outputs = np.zeros((4, len(LABELS)), np.float32)
        seen = []
        for _ in range(6):
            bounded.defer(loaded, outputs)
            seen.append(bounded.pending_rows)
        by_bytes = PredictionMetrics(
            srv.server.metrics, len(LABELS), 0, flush_interval_s=3600, max_pending_bytes=outputs.nbytes * 2
        )
        seen_bytes = []
        for _ in range(3):
            by_bytes.defer(loaded, outputs)
            seen_bytes.append(by_bytes.pending_rows)
        counted = srv.server.registry.get_sample_value(
            "kiln_prediction_confidence_count", {"model": "tiny", "version": "1"}
        )
    assert seen == [4, 8, 0, 4, 8, 0]  # past 10 rows waiting: counted by the caller
    assert seen_bytes == [4, 8, 0]  # past twice a batch's bytes waiting: the same
    assert counted == len(ROWS) + 9 * 4  # the scrape counted what was left (none) and nothing twice


def test_the_pending_bounds_are_settings(tmp_path: Path) -> None:
    """prediction_pending_max_rows / _bytes and prediction_flush_interval_s reach the server's
    recorder: past 6 rows waiting, the batch worker counts them at once."""
    publish_tiny_model(tmp_path, seed=1)
    config = dataclasses.replace(
        _config(tmp_path, classes=len(LABELS)),
        prediction_flush_interval_s=60.0,
        prediction_pending_max_rows=6,
        prediction_pending_max_bytes=1 << 20,
    )
    with running_server(config) as srv, KilnClient(srv.address) as client:
        recorder = srv.server.metrics.extensions["predictions"]
        seen = []
        for _ in range(3):
            client.infer("tiny", {"input": ROWS[:4]})
            seen.append(recorder.pending_rows)
    assert seen == [4, 0, 4]  # 8 rows waiting > 6: counted by the worker; no timer within 60 s


def test_a_failing_count_is_logged_once_and_never_breaks_a_scrape(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A fault that real outputs cannot cause (the counting code itself failing), so it is
    patched in: the scrape still answers, the error is logged once, the version stops counting."""

    def broken(self: ClassificationHead, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise RuntimeError("counting bug")

    monkeypatch.setattr(ClassificationHead, "top1", broken)
    publish_tiny_model(tmp_path, seed=1)
    with running_server(_config(tmp_path, classes=len(LABELS))) as srv, KilnClient(srv.address) as client:
        for _ in range(2):
            client.infer("tiny", {"input": ROWS})
            ok = {"model": "tiny", "version": "1", "code": "OK"}
            assert srv.server.registry.get_sample_value("kiln_requests_total", ok) is not None
    failures = [r for r in caplog.records if "prediction metrics of tiny v1 failed" in r.getMessage()]
    assert len(failures) == 1
