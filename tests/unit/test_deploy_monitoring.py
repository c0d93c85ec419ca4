"""The Grafana dashboard, the alert rules and the prometheus-adapter rule use only metric names that
Kiln's server registers (serving/grpc/metrics.py, serving/grpc/gpu_stats.py), and the PromQL they carry is
shaped the way aggregation across replicas needs (quantiles over `sum by (le)`)."""

from __future__ import annotations

import json
import re

import pytest

from deploy.validate import promql


@pytest.fixture(scope="module")
def known() -> set[str]:
    return promql.exposed_names(promql.registry_families())


def test_the_registry_exports_the_names_the_deployment_depends_on(known: set[str]) -> None:
    # the HPA signal and the dashboard's core panels
    for name in ("kiln_queue_duration_seconds_sum", "kiln_queue_duration_seconds_count",
                 "kiln_request_duration_seconds_bucket", "kiln_requests_total", "kiln_batch_size_bucket",
                 "kiln_queue_depth", "kiln_inflight_requests", "kiln_model_load_state",
                 "kiln_gpu_utilization_ratio", "kiln_gpu_memory_used_bytes", "kiln_workers",
                 "kiln_worker_restarts_total"):  # fmt: skip
        assert name in known, name


def test_every_expression_uses_only_exported_metric_names(known: set[str]) -> None:
    assert not promql.unknown_names(known), "\n".join(promql.unknown_names(known))


def test_an_unknown_metric_name_is_caught(known: set[str]) -> None:
    expr = 'histogram_quantile(0.99, sum by (le) (rate(kiln_latency_seconds_bucket{model=~"$model"}[5m])))'
    assert promql.metric_names(expr) - known == {"kiln_latency_seconds_bucket"}
    assert promql.metric_names("sum(rate(a_total[5m])) by (pod) / on(pod) group_left b > 1e-9") == {
        "a_total",
        "b",
    }


def test_dashboard_parses_and_covers_the_serving_signals() -> None:
    dash = json.loads(promql.DASHBOARD.read_text(encoding="utf-8"))
    assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 36
    exprs = dict(promql.dashboard_expressions())
    text = "\n".join(exprs.values())
    needles = ("kiln_requests_total", "kiln_queue_duration_seconds", "kiln_batch_size_bucket",
               "kiln_queue_depth", "kiln_inflight_requests", "kiln_gpu_utilization_ratio",
               "kiln_gpu_memory_used_bytes", "kiln_worker_batches_total", "kiln_workers{",
               "kiln_worker_restarts_total", "histogram_quantile(0.5",
               "histogram_quantile(0.99")  # fmt: skip
    for needle in needles:
        assert needle in text, needle
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"


def test_quantiles_aggregate_buckets_across_replicas_by_le() -> None:
    for where, expr in promql.all_expressions():
        for match in re.finditer(r"histogram_quantile\(\s*[\d.]+\s*,\s*(.*)", expr, re.S):
            inner = match.group(1)
            assert re.match(r"sum by \(([\w, ]*\b)?le\b", inner), (
                f"{where}: quantile must be over sum by (le)"
            )
            assert "_bucket" in inner, where


def test_alerts_cover_errors_latency_saturation_readiness_and_targets() -> None:
    alerts = {where.removeprefix("rule "): expr for where, expr in promql.rule_expressions()}
    for name in ("KilnHighErrorRatio", "KilnHighP99Latency", "KilnQueueSaturated", "KilnModelNotReady",
                 "KilnNoTargets", "KilnWorkerRestarted"):  # fmt: skip
        assert name in alerts, name
    assert "kiln_worker_restarts_total" in alerts["KilnWorkerRestarted"]
    assert "absent(" in alerts["KilnNoTargets"]
    assert 'kiln_model_load_state="ready"' in alerts["KilnModelNotReady"]


def test_adapter_rule_is_the_mean_queue_wait_per_pod() -> None:
    (rule,) = promql.adapter_rules()
    assert rule["resources"]["overrides"]["pod"]["resource"] == "pod"
    assert rule["resources"]["overrides"]["namespace"]["resource"] == "namespace"
    query = rule["metricsQuery"]
    assert "kiln_queue_duration_seconds_sum" in query and "kiln_queue_duration_seconds_count" in query
    assert "<<.GroupBy>>" in query and "<<.LabelMatchers>>" in query
    assert "clamp_min(" in query, "an idle pod must report 0, not NaN"
    assert re.fullmatch(r"\^?(\w+)\$?", rule["name"]["matches"]).group(1) in promql.metric_names(
        rule["seriesQuery"]
    )
