"""Metric names in PromQL expressions, and the names Kiln's server actually exports.

`metric_names` is a small lexer, not a PromQL parser: it removes strings, label matchers, range
selectors, grouping clauses, numbers and template variables, then keeps each identifier that is
not a function call or a keyword. That is enough to cross-check the dashboard, the alert rules and
the adapter rule against `serving/grpc/metrics.py`, and it errs towards reporting a name.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import yaml

DEPLOY = Path(__file__).resolve().parents[1]
DASHBOARD = DEPLOY / "grafana" / "kiln-dashboard.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yaml"
ADAPTER = DEPLOY / "prometheus" / "adapter-rules.yaml"
# Series that Prometheus itself creates, with the reason they are not in serving/grpc/metrics.py.
PROMETHEUS_SERIES = {"up": "synthetic per-target scrape health, added by Prometheus"}

_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
             "group_left", "group_right", "inf", "nan", "atan2"}  # fmt: skip
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
}


def metric_names(expr: str) -> set[str]:
    """Metric names an expression selects (recording-rule names included)."""
    s = re.sub(r"<<[^>]*>>", "", expr)  # prometheus-adapter templates
    s = re.sub(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'', '""', s)  # string literals
    s = re.sub(r"\{[^{}]*\}", " ", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", " ", s)  # ranges and subqueries
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    s = re.sub(r"\boffset\s+-?\w+", " ", s)
    s = re.sub(r"\$\{?\w+\}?", " ", s)  # Grafana variables
    s = re.sub(r"(?<![\w:.])\d+(\.\d*)?([eE][-+]?\d+)?", " ", s)  # numbers
    names = set()
    for match in re.finditer(r"[A-Za-z_:][\w:]*", s):
        name, rest = match.group(), s[match.end() :].lstrip()
        if name.lower() in _KEYWORDS or rest.startswith("("):
            continue
        names.add(name)
    return names


def exposed_names(families: Iterable[tuple[str, str]]) -> set[str]:
    """Sample names a scrape can contain, from (family name, type) pairs."""
    names = set()
    for name, kind in families:
        names.update(name + suffix for suffix in _SUFFIXES.get(kind, ("",)))
    return names


def registry_families() -> list[tuple[str, str]]:
    """(name, type) of every family the server registers: KilnMetrics, the NVML GPU collector and,
    with `workers` > 1, the supervisor's own series."""
    from types import SimpleNamespace

    from prometheus_client import CollectorRegistry

    from serving.grpc.gpu_stats import GpuCollector
    from serving.grpc.metrics import KilnMetrics
    from serving.grpc.workers import SupervisorCollector

    registry = CollectorRegistry()
    KilnMetrics(registry, process=True, gpu=False)
    registry.register(GpuCollector(_NoGpus()))  # describe() needs no GPU: the names are static
    # what the collector reads of a supervisor: its workers (each `.ready`) and restarts
    registry.register(SupervisorCollector(SimpleNamespace(workers={}, restarts=0)))  # type: ignore[arg-type]
    return [(family.name, family.type) for family in registry.collect()]


def scrape_families(text: str) -> list[tuple[str, str]]:
    """(name, type) of every family in a /metrics response (HELP/TYPE lines count, samples or not)."""
    from prometheus_client.parser import text_string_to_metric_families

    return [(family.name, family.type) for family in text_string_to_metric_families(text)]


class _NoGpus:
    """An NVML stand-in with zero devices, enough to construct the collector."""

    @staticmethod
    def nvmlDeviceGetCount() -> int:  # NVML's spelling
        return 0


def dashboard_expressions(path: Path = DASHBOARD) -> Iterator[tuple[str, str]]:
    """(where, expr) for every panel target and templating query of a Grafana dashboard."""
    dash = json.loads(path.read_text(encoding="utf-8"))
    for panel in _panels(dash.get("panels", [])):
        for target in panel.get("targets", []):
            yield f"panel {panel.get('title')!r} {target.get('refId')}", target["expr"]
    for var in dash.get("templating", {}).get("list", []):
        query = var.get("query")
        text = query.get("query") if isinstance(query, dict) else query
        if var.get("type") == "query" and text:
            match = re.fullmatch(r"\s*label_values\((.*),\s*\w+\)\s*", text)
            yield f"variable {var['name']}", match.group(1) if match else text


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def rule_expressions(path: Path = ALERTS) -> Iterator[tuple[str, str]]:
    """(where, expr) for every rule of a PrometheusRule file."""
    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    for group in doc["spec"]["groups"]:
        for rule in group["rules"]:
            yield f"rule {rule.get('alert') or rule.get('record')}", rule["expr"]


def recorded_names(path: Path = ALERTS) -> set[str]:
    """Names the PrometheusRule's recording rules define."""
    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    return {rule["record"] for group in doc["spec"]["groups"] for rule in group["rules"] if "record" in rule}


def adapter_rules(path: Path = ADAPTER) -> list[dict[str, Any]]:
    """The prometheus-adapter `rules` list."""
    return yaml.safe_load(path.read_text(encoding="utf-8"))["rules"]


def adapter_expressions(path: Path = ADAPTER) -> Iterator[tuple[str, str]]:
    """(where, expr) for each adapter rule's seriesQuery and metricsQuery."""
    for i, rule in enumerate(adapter_rules(path)):
        yield f"adapter rule {i} seriesQuery", rule["seriesQuery"]
        yield f"adapter rule {i} metricsQuery", rule["metricsQuery"]


def all_expressions() -> list[tuple[str, str]]:
    """Every PromQL expression shipped in deploy/."""
    return [*dashboard_expressions(), *rule_expressions(), *adapter_expressions()]


def unknown_names(known: set[str]) -> list[str]:
    """'where: name' for each metric an expression uses that is neither known nor allowed."""
    allowed = known | recorded_names() | set(PROMETHEUS_SERIES)
    return [
        f"{where}: {name}"
        for where, expr in all_expressions()
        for name in sorted(metric_names(expr) - allowed)
    ]
