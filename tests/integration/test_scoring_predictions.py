"""`kiln score`'s _predictions.json against the rows it wrote and against a real server.

A real job over real image files writes the top-1 class counts (classes past
--prediction-classes as "other"), the top-1 confidence histogram and the drift score; the same
images classified by a real server give the same kiln_predictions_total, the same
kiln_prediction_confidence buckets and the same kiln_prediction_drift. A version whose kiln.json
has no reference gets no drift score: absent, not 0.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from export.distribution import prediction_distribution
from serving.clients import score_cli
from serving.clients.client import KilnClient
from serving.contract.manifest_types import ParityReport
from serving.grpc.config import ServeConfig
from serving.runtime.distribution import CONFIDENCE_EDGES, confidence_bins
from serving.scoring.job import ScoreConfig, run_score
from tests.integration.scoring_fixtures import LABELS, make_images, publish_model
from tests.integration.server_fixtures import running_server
from tests.integration.test_scoring_local import read_output

MOST = 3  # of the 5 classes: "dog" and "eel" count as "other"
GOOD = 120


def _reference() -> ParityReport:
    """What export records for a held-out split whose class mix is not the images' mix."""
    logits = np.random.default_rng(11).normal(scale=2.0, size=(500, len(LABELS)))
    logits[:, 0] += 1.5  # the held-out split leans to "ant"
    return ParityReport(reference="test", samples=500, max_abs_err=0.0, max_rel_err=0.0,
                        top1_agreement=1.0, distribution=prediction_distribution(logits))  # fmt: skip


def _score_cli(repo: Path, images: Path, out: Path, capsys: pytest.CaptureFixture[str]) -> str:
    parser = argparse.ArgumentParser()
    score_cli.add_arguments(parser)
    argv = ["--repo", str(repo), "--model", "tiny", "--input", str(images), "--output", str(out),
            "--shard-size", "50", "--prediction-classes", str(MOST), "--no-progress"]  # fmt: skip
    assert score_cli.run(parser.parse_args(argv)) == 0
    return capsys.readouterr().out


def _top1(out: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(top-1 index, top-1 score, path) of each good row the job wrote."""
    table = read_output(out)
    good = table.filter(pa.compute.is_null(table.column("error"))).to_pylist()
    return (
        np.array([r["indices"][0] for r in good]),
        np.array([r["scores"][0] for r in good], np.float64),
        [r["path"] for r in good],
    )


def test_the_job_summary_counts_its_rows_and_matches_the_servers_metrics(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo, images, out = tmp_path / "repo", tmp_path / "images", tmp_path / "out"
    publish_model(repo, "tiny", seed=1, parity=_reference())
    make_images(images, GOOD, size=(16, 16), smooth=True)  # spread over all five classes
    printed = _score_cli(repo, images, out, capsys)
    summary = json.loads((out / "_predictions.json").read_text(encoding="utf-8"))
    best, top, paths = _top1(out)

    # the summary counts exactly the rows written: top-1 classes, "other" past MOST, bins
    counts = np.bincount(best, minlength=len(LABELS))
    expected = {**{LABELS[i]: int(counts[i]) for i in range(MOST)}, "other": int(counts[MOST:].sum())}
    assert summary["classes"] == expected and sum(expected.values()) == summary["rows"] == GOOD
    assert summary["errors"] == 5 and summary["prediction_classes"] == MOST
    assert summary["confidence"]["le"] == list(CONFIDENCE_EDGES)
    bins = np.bincount(confidence_bins(top), minlength=len(CONFIDENCE_EDGES))
    assert summary["confidence"]["count"] == bins.tolist()
    assert np.count_nonzero(counts[:MOST]) >= 2 and counts[MOST:].sum() > 0
    assert summary["drift"]["class"] > 0 and summary["drift"]["confidence"] > 0
    assert "predictions of tiny v1: 120 rows" in printed and "drift (PSI) vs kiln.json" in printed

    # the same images through a real server: its prediction metrics and drift gauge agree
    config = ServeConfig(repo=repo, host="127.0.0.1", port=0, metrics_port=None,
                         prediction_classes=MOST, drift_window=GOOD)  # fmt: skip
    with running_server(config) as srv, KilnClient(srv.address) as client:
        for start in range(0, GOOD, 40):
            client.classify("tiny", [Path(p) for p in paths[start : start + 40]], top_k=1)
        registry = srv.server.registry

        def sample(name: str, **labels: str) -> float | None:
            return registry.get_sample_value(name, {"model": "tiny", "version": "1", **labels})

        served = {name: sample("kiln_predictions_total", **{"class": name}) for name in expected}
        buckets = [sample("kiln_prediction_confidence_bucket", le=str(edge)) for edge in CONFIDENCE_EDGES]
        drift = {d: sample("kiln_prediction_drift", distribution=d) for d in ("class", "confidence")}
    assert served == {name: float(count) for name, count in summary["classes"].items()}
    assert buckets == np.cumsum(summary["confidence"]["count"]).astype(float).tolist()
    assert drift == pytest.approx(summary["drift"], abs=1e-12)


def test_a_version_without_a_reference_has_counts_but_no_drift(tmp_path: Path) -> None:
    repo, images, out = tmp_path / "repo", tmp_path / "images", tmp_path / "out"
    publish_model(repo, "tiny", seed=3)  # as exports made before the reference existed
    make_images(images, 30)
    run_score(ScoreConfig(repo=repo, model="tiny", inputs=str(images), output=out, progress=False))
    summary = json.loads((out / "_predictions.json").read_text(encoding="utf-8"))
    best, _, _ = _top1(out)
    assert "drift" not in summary and summary["rows"] == 30
    counts = np.bincount(best, minlength=len(LABELS))
    # 5 classes, fewer than the default 20: each by its label, no "other"
    assert summary["classes"] == {label: int(counts[i]) for i, label in enumerate(LABELS)}
