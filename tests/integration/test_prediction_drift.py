"""The drift gauge on a real server: kiln_prediction_drift is the PSI of what a version served
over its sliding window against the reference its kiln.json carries. A version is published with
the reference export would record for a held-out set; traffic drawn like that set keeps the gauge
low, traffic of one class only lifts it past the alert rule's threshold, and a version without a
reference has no gauge at all."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import yaml

from export.distribution import prediction_distribution
from serving.clients.client import KilnClient
from serving.contract.manifest_types import ParityReport
from serving.grpc.config import ServeConfig
from tests.integration.server_fixtures import (
    CHANNELS,
    SIZE,
    build_onnx,
    publish_tiny_model,
    reference_logits,
    running_server,
)

ALERTS = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "alerts.yaml"
WINDOW = 400


def _rows(seed: int, count: int) -> np.ndarray:
    """Inputs whose pooled channel means spread over every class of the tiny model."""
    means = np.random.default_rng(seed).normal(scale=2.0, size=(count, CHANNELS, 1, 1))
    return np.broadcast_to(means, (count, CHANNELS, SIZE, SIZE)).astype(np.float32)


def _threshold() -> float:
    rules = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))["spec"]["groups"]
    (rule,) = [r for g in rules for r in g["rules"] if r.get("alert") == "KilnPredictionDrift"]
    assert "kiln_prediction_drift" in rule["expr"]
    return float(re.search(r">\s*([\d.]+)", rule["expr"]).group(1))


def _publish_with_reference(repo: Path, held_out: np.ndarray) -> np.ndarray:
    """v1 whose kiln.json carries the reference of `held_out`; returns its top-1 per held-out row."""
    model = repo / "reference.onnx"
    build_onnx(model, 1)
    logits = reference_logits(model, held_out)
    report = ParityReport(reference="test", samples=len(held_out), max_abs_err=0.0, max_rel_err=0.0,
                          top1_agreement=1.0, distribution=prediction_distribution(logits))  # fmt: skip
    model.unlink()
    publish_tiny_model(repo, seed=1, parity=report)
    return logits.argmax(axis=1)


def _serve(client: KilnClient, rows: np.ndarray) -> None:
    for start in range(0, len(rows), 8):
        client.infer("tiny", {"input": np.ascontiguousarray(rows[start : start + 8])})


def _drift(registry: object, version: str = "1") -> dict[str, float | None]:
    return {
        d: registry.get_sample_value(  # type: ignore[attr-defined]
            "kiln_prediction_drift", {"model": "tiny", "version": version, "distribution": d}
        )
        for d in ("class", "confidence")
    }


def test_a_shifted_class_mix_lifts_the_drift_gauge_past_the_alert_and_a_matching_one_does_not(
    tmp_path: Path,
) -> None:
    classes = _publish_with_reference(tmp_path, _rows(0, 4000))
    config = ServeConfig(repo=tmp_path, host="127.0.0.1", port=0, metrics_port=None, drift_window=WINDOW)
    live = _rows(1, WINDOW)  # drawn like the held-out set, not the same rows
    rarest = np.argmin(np.bincount(classes, minlength=4))
    live_classes = reference_logits(tmp_path / "tiny" / "1" / "model.onnx", live).argmax(axis=1)
    shifted = live[live_classes == rarest]

    with running_server(config) as srv, KilnClient(srv.address) as client:
        registry = srv.server.registry
        _serve(client, live[:50])
        early = _drift(registry)  # fewer rows than the minimum: no score yet
        _serve(client, live[50:])
        matching = _drift(registry)
        for _ in range(-(-WINDOW // len(shifted))):  # enough to fill the window
            _serve(client, shifted)
        drifted = _drift(registry)
    threshold = _threshold()
    assert early == {"class": None, "confidence": None}
    assert matching["class"] < threshold / 4 and matching["confidence"] < threshold / 4, matching
    assert drifted["class"] > threshold, drifted
    assert len(shifted) >= 5 and 0 < len(set(live_classes)) == 4


def test_a_version_without_a_reference_has_no_drift_gauge(tmp_path: Path) -> None:

    publish_tiny_model(tmp_path, seed=1)  # as exports made before the reference existed
    config = ServeConfig(repo=tmp_path, host="127.0.0.1", port=0, metrics_port=None, drift_window=10)
    with running_server(config) as srv, KilnClient(srv.address) as client:
        _serve(client, _rows(1, 40))
        drift = _drift(srv.server.registry)
        counted = srv.server.registry.get_sample_value(
            "kiln_prediction_confidence_count", {"model": "tiny", "version": "1"}
        )
    assert drift == {"class": None, "confidence": None} and counted == 40
