"""Prometheus metrics of the server, all on an injected registry (no module-global metrics).

Names follow Prometheus conventions (`kiln_` prefix, `_total`, `_seconds`); per-model series carry
`model` and `version` labels. Latency buckets resolve the 0.5 ms - 10 ms range where a batched
CNN server lives, and still reach 10 s for the pathological tail.

Label cardinality: the server should label requests for unknown models with model="" (clients
choose model names; one series per typo would let them grow the registry without bound).

One tally is per process rather than per registry: `CLIENT_ERRORS`, the errors clients caused
(`kiln_client_errors_total{reason}`). They are counted where no server object is at hand (the
error-mapping wrapper, a filter on grpc's own logger), and every KilnMetrics exports the tally, as
the process collector exports the process's CPU time. Its `reason` values are a fixed set.

Multiprocess mode (`workers` > 1, serving.grpc.workers): the supervisor sets
PROMETHEUS_MULTIPROC_DIR before it starts the workers, so prometheus_client keeps every worker's
counters, gauges and histograms in files there, and the supervisor's /metrics sums them
(MultiProcessCollector). What that mode cannot carry changes form: gauges are live sums across
workers; kiln_model_load_state becomes a gauge per state that is 1 only while every live worker is
in that state (stateset series are per process); client errors are also written to a counter
there; kiln_queue_depth (read by a function at scrape time) is absent (kiln_inflight_requests
sums the workers' queued and computing requests); series of unloaded versions stay (removal is
not implemented in that mode); process_* and GPU series are the supervisor's own.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, suppress
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Enum,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from serving.grpc.gpu_stats import GpuCollector, gpu_collector
from serving.runtime.distribution import CONFIDENCE_EDGES  # the bins export records for drift

__all__ = [
    "BATCH_BUCKETS",
    "CLIENT_ERRORS",
    "CLIENT_ERROR_REASONS",
    "LATENCY_BUCKETS",
    "LOAD_STATES",
    "BatchMetrics",
    "ClientErrorTally",
    "KilnMetrics",
]

LATENCY_BUCKETS = (
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03,
    0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
LOAD_STATES = ("unloaded", "loading", "ready", "unloading", "failed", "candidate")
_STATUS_CODES = (
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
    "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE",
    "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED",
)  # fmt: skip
_DROP_REASONS = ("expired", "cancelled")
DRIFT_DISTRIBUTIONS = ("class", "confidence")  # kiln_prediction_drift's `distribution` label
_MV = ("model", "version")
# kiln_client_errors_total's reasons: the status a client's call was answered with (lower case),
# or "write_failed" (a write to the client failed: it had gone away, or the answer was over
# max_send_message_bytes); anything else is "other".
CLIENT_ERROR_REASONS = (*(code.lower() for code in _STATUS_CODES if code != "OK"), "write_failed", "other")


class ClientErrorTally:
    """Errors clients caused in this process, by reason (thread-safe; see the module docstring)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}
        self._mirror: Counter | None = None  # multiprocess mode: the counter the supervisor sums

    def mirror_to(self, counter: Counter) -> None:
        """Also count into `counter` (labelled by reason) from now on."""
        self._mirror = counter

    def add(self, reason: str) -> None:
        """Count one; an unknown reason counts as "other" (the label set stays fixed)."""
        key = reason if reason in CLIENT_ERROR_REASONS else "other"
        with self._lock:
            self._counts[key] = self._counts.get(key, 0) + 1
        if self._mirror is not None:
            self._mirror.labels(key).inc()

    def counts(self) -> dict[str, int]:
        """A copy of the counts by reason (only reasons seen so far)."""
        with self._lock:
            return dict(self._counts)


CLIENT_ERRORS = ClientErrorTally()


class _ClientErrorCollector(Collector):
    """Exports CLIENT_ERRORS as the counter kiln_client_errors_total{reason}."""

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "kiln_client_errors", "Errors caused by clients (bad requests, refused loads, vanished peers)",
            labels=("reason",),
        )  # fmt: skip
        for reason, count in sorted(CLIENT_ERRORS.counts().items()):
            family.add_metric((reason,), count)
        yield family


class BatchMetrics:
    """A `serving.runtime.batcher.BatchObserver` bound to one model version (label lookups done once)."""

    def __init__(self, metrics: KilnMetrics, model: str, version: str) -> None:
        self._batch = metrics.batch_size.labels(model, version)
        self._queue = metrics.queue_duration.labels(model, version)
        self._compute = metrics.compute_duration.labels(model, version)
        self._dropped = {r: metrics.requests_dropped.labels(model, version, r) for r in _DROP_REASONS}
        self._metrics, self._model, self._version = metrics, model, version

    def on_batch(
        self, *, rows: int, requests: int, queue_seconds: Sequence[float], compute_seconds: float
    ) -> None:
        """One executed batch: its size in rows, each request's queue wait, the compute time."""
        self._batch.observe(rows)
        self._compute.observe(compute_seconds)
        for seconds in queue_seconds:
            self._queue.observe(seconds)

    def on_dropped(self, reason: str, count: int = 1) -> None:
        """Requests dropped before compute ("expired" | "cancelled")."""
        child = self._dropped.get(reason)
        if child is None:
            child = self._metrics.requests_dropped.labels(self._model, self._version, reason)
        child.inc(count)


@dataclass(frozen=True, slots=True)
class _Spec:
    """One metric of KilnMetrics: its type, name, help text, labels and type-specific options."""

    kind: type[Counter] | type[Gauge] | type[Histogram]
    name: str
    help: str
    labels: tuple[str, ...] = _MV
    options: Mapping[str, Any] = field(default_factory=dict)

    def make(self, registry: CollectorRegistry) -> Counter | Gauge | Histogram:
        return self.kind(self.name, self.help, self.labels, registry=registry, **self.options)


def _latency(name: str, help: str) -> _Spec:
    """A per-version latency histogram (LATENCY_BUCKETS)."""
    return _Spec(Histogram, name, help, options={"buckets": LATENCY_BUCKETS})


# KilnMetrics attribute -> its metric (kiln_model_load_state and the client errors depend on the
# multiprocess mode: KilnMetrics._load_state_metric).
_METRICS: dict[str, _Spec] = {
    "requests": _Spec(Counter, "kiln_requests", "Inference requests by final status code", (*_MV, "code")),
    "request_duration": _latency("kiln_request_duration_seconds", "End-to-end request latency in the server"),
    "queue_duration": _latency("kiln_queue_duration_seconds", "Time a request waited in the batching queue"),
    "compute_duration": _latency("kiln_compute_duration_seconds", "Backend time per executed batch"),
    "preprocess_duration": _latency(
        "kiln_preprocess_duration_seconds", "Image decode + resize + normalise time per request"
    ),
    "batch_size": _Spec(
        Histogram, "kiln_batch_size", "Rows per executed batch", options={"buckets": BATCH_BUCKETS}
    ),
    "queue_depth": _Spec(Gauge, "kiln_queue_depth", "Requests waiting in the batching queue"),
    "inflight": _Spec(
        Gauge,
        "kiln_inflight_requests",
        "Requests of a model version waiting for or in a batch",
        options={"multiprocess_mode": "livesum"},
    ),
    "requests_dropped": _Spec(
        Counter, "kiln_requests_dropped", "Requests dropped before compute", (*_MV, "reason")
    ),
    # which artefact a version serves and why (precision auto measures on a CPU): an info
    # metric, 1 for the artefact in use, so dashboards can join it on model/version
    "artefact_info": _Spec(
        Gauge,
        "kiln_model_artefact_info",
        "The artefact a model version serves (1), and how it was chosen",
        (*_MV, "artefact", "precision", "threads", "instances", "chosen_by"),
        {"multiprocess_mode": "max"},
    ),
    # shadow rollouts (serving/grpc/shadow.py): what happened to each copy sent to a candidate
    # ("compared", "dropped": its queue was full, "failed"), its running top-1 agreement with
    # the serving version, and each verdict ("promoted", "rejected", "forced")
    "shadow_requests": _Spec(
        Counter,
        "kiln_shadow_requests",
        "Live requests copied to a candidate version, by outcome",
        ("model", "outcome"),
    ),
    "shadow_agreement": _Spec(
        Gauge,
        "kiln_shadow_agreement_ratio",
        "Top-1 agreement of a candidate with the serving version",
        options={"multiprocess_mode": "livemin"},
    ),
    "promotions": _Spec(
        Counter, "kiln_model_promotions", "Verdicts on candidate versions, by result", ("model", "result")
    ),
    # what each version predicts (serving/grpc/predictions.py): top-1 class of each served row
    # (classes past prediction_classes are "other") and the top-1 probability
    "predictions": _Spec(Counter, "kiln_predictions", "Served rows by top-1 class", (*_MV, "class")),
    "prediction_confidence": _Spec(
        Histogram,
        "kiln_prediction_confidence",
        "Top-1 probability of each served row",
        options={"buckets": CONFIDENCE_EDGES},
    ),
    # how far what a version predicts has drifted from the reference its export recorded
    # (serving/grpc/drift.py): population stability index of the top-1 class mix and
    # of the top-1 probability histogram over a sliding window; absent without a reference
    "prediction_drift": _Spec(
        Gauge,
        "kiln_prediction_drift",
        "Population stability index of served predictions vs the reference",
        (*_MV, "distribution"),
        {"multiprocess_mode": "livemax"},
    ),
    # workers > 1 (serving/runtime/backends/core_share.py): batches on the worker's own share of
    # the cores, or on all of them while every other worker idled ("all": few connections, one
    # worker holding them)
    "worker_batches": _Spec(
        Counter, "kiln_worker_batches", "Batches computed by workers, by the cores they used", ("cores",)
    ),
}


class _Inflight:
    """One version's in-flight gauge as a reusable `with` block: a class, not a generator
    context manager, which cost ~3x as much on every request's path."""

    __slots__ = ("_gauge",)

    def __init__(self, gauge: Gauge) -> None:
        self._gauge = gauge

    def __enter__(self) -> None:
        self._gauge.inc()

    def __exit__(self, *exc: object) -> None:
        self._gauge.dec()


class KilnMetrics:
    """Every metric the server exports, registered on `registry`: the metrics of _METRICS under
    their attribute names, `load_state`, and the collectors (client errors, process, GPU)."""

    requests: Counter
    request_duration: Histogram
    queue_duration: Histogram
    compute_duration: Histogram
    preprocess_duration: Histogram
    batch_size: Histogram
    queue_depth: Gauge
    inflight: Gauge
    requests_dropped: Counter
    artefact_info: Gauge
    shadow_requests: Counter
    shadow_agreement: Gauge
    promotions: Counter
    predictions: Counter
    prediction_confidence: Histogram
    prediction_drift: Gauge
    worker_batches: Counter

    def __init__(self, registry: CollectorRegistry, *, process: bool = True, gpu: bool = True) -> None:
        self.registry = registry
        # run before every scrape and every forget(): registered first, so a scrape reads what
        # they counted (prediction metrics count their pending batches)
        self._before_read: list[Callable[[], None]] = []
        registry.register(_BeforeRead(self._before_read))
        self.extensions: dict[str, Any] = {}  # per-server recorders built on these metrics
        # prometheus_client's own switch (read when it was imported); see the module docstring
        self.multiprocess = "PROMETHEUS_MULTIPROC_DIR" in os.environ
        for attr, spec in _METRICS.items():
            setattr(self, attr, spec.make(registry))
        self.load_state = self._load_state_metric()
        if self.multiprocess:  # the supervisor sums this counter across workers
            CLIENT_ERRORS.mirror_to(
                Counter("kiln_client_errors", "Errors caused by clients", ("reason",), registry=None)
            )
        # (model, version, code) -> (counter child, histogram child): `labels()` takes a lock and
        # builds a key on every call, and observe_request runs once per request.
        self._request_children: dict[tuple[str, str, str], tuple[Counter, Histogram]] = {}
        self._inflight_children: dict[tuple[str, str], _Inflight] = {}  # the same, for track_inflight
        self._worker_children: dict[str, Counter] = {}  # and for count_worker_batch
        self.gpu = self._register_collectors(process=process, gpu=gpu)

    def _load_state_metric(self) -> Enum | Gauge:
        """kiln_model_load_state: a stateset, or in multiprocess mode a gauge per state (see the
        module docstring)."""
        if not self.multiprocess:
            return Enum(
                "kiln_model_load_state", "Load state of a model version", _MV, states=list(LOAD_STATES),
                registry=self.registry,
            )  # fmt: skip
        return Gauge(
            "kiln_model_load_state", "1 while every live worker holds the version in this state",
            (*_MV, "kiln_model_load_state"), registry=self.registry, multiprocess_mode="livemin",
        )  # fmt: skip

    def _register_collectors(self, *, process: bool, gpu: bool) -> GpuCollector | None:
        """The client-error tally, the process collectors if `process`; the GPU collector if `gpu`
        and a GPU is found (returned)."""
        self.registry.register(_ClientErrorCollector())
        if process:
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)
        collector = gpu_collector() if gpu else None
        if collector is not None:
            self.registry.register(collector)
        return collector

    def observe_request(self, model: str, version: str, code: str, seconds: float | None = None) -> None:
        """Count one finished request by status code name ("OK", "INVALID_ARGUMENT", ...) and its latency."""
        key = (model, version, code)
        children = self._request_children.get(key)
        if children is None:
            children = (self.requests.labels(*key), self.request_duration.labels(model, version))
            self._request_children[key] = children
        children[0].inc()
        if seconds is not None:
            children[1].observe(seconds)

    def count_worker_batch(self, on_all_cores: bool) -> None:
        """One batch of a worker that shares the cores with others (core_share.CoreTable.on_batch)."""
        cores = "all" if on_all_cores else "own_share"
        child = self._worker_children.get(cores)
        if child is None:  # made on first use: a lone server shows no such series
            child = self._worker_children[cores] = self.worker_batches.labels(cores)
        child.inc()

    def track_inflight(self, model: str, version: str) -> AbstractContextManager[None]:
        """Count a request as in flight for the duration of the block (the handlers wrap each
        request's batcher submit in it)."""
        block = self._inflight_children.get((model, version))
        if block is None:
            block = _Inflight(self.inflight.labels(model, version))
            self._inflight_children[model, version] = block
        return block

    def observe_preprocess(self, model: str, version: str, seconds: float) -> None:
        """Preprocessing time of one request."""
        self.preprocess_duration.labels(model, version).observe(seconds)

    def set_load_state(self, model: str, version: str, state: str) -> None:
        """One of LOAD_STATES."""
        if state not in LOAD_STATES:
            raise ValueError(f"load state must be one of {LOAD_STATES}, got {state!r}")
        if isinstance(self.load_state, Enum):
            self.load_state.labels(model, version).state(state)
            return
        for name in LOAD_STATES:
            self.load_state.labels(model, version, name).set(float(name == state))

    def batch_observer(self, model: str, version: str) -> BatchMetrics:
        """The observer to give `DynamicBatcher(observer=...)` for this model version."""
        return BatchMetrics(self, model, version)

    def track_queue_depth(self, model: str, version: str, depth: Callable[[], float]) -> None:
        """Read the queue depth at scrape time, e.g. `lambda: batcher.queue_depth`."""
        if self.multiprocess:  # a function in a worker cannot be read from the supervisor
            return
        self.queue_depth.labels(model, version).set_function(depth)

    def set_artefact(
        self, model: str, version: str, artefact: str, precision: str, layout: tuple[int, int], chosen_by: str
    ) -> None:
        """Record the artefact a loaded version serves (`chosen_by`: "measured", "cached" or "rule")."""
        threads, instances = (str(n) for n in layout)
        self.artefact_info.labels(model, version, artefact, precision, threads, instances, chosen_by).set(1)

    def before_read(self, hook: Callable[[], None]) -> None:
        """Call `hook` before each scrape of this registry and before each `forget`."""
        self._before_read.append(hook)

    def forget(self, model: str, version: str) -> None:
        """Remove every series of an unloaded model version (load state excepted: keep "unloaded")."""
        for hook in self._before_read:  # nothing counted later may re-create the series
            hook()
        for key in [k for k in self._request_children if k[:2] == (model, version)]:
            del self._request_children[key]
        self._inflight_children.pop((model, version), None)
        if self.multiprocess:  # the series live in files the supervisor reads: not removable
            return
        for attr, spec in _METRICS.items():
            if spec.labels[:2] == _MV:
                _remove_version(getattr(self, attr), spec.labels, model, version)


class _BeforeRead(Collector):
    """Exports nothing: runs the hooks when the registry is collected (a scrape)."""

    def __init__(self, hooks: list[Callable[[], None]]) -> None:
        self._hooks = hooks

    def describe(self) -> list[Metric]:
        return []  # no names: registering it does not call collect()

    def collect(self) -> Iterator[Metric]:
        for hook in self._hooks:
            hook()
        return iter(())


def _remove_version(
    metric: Counter | Gauge | Histogram, labelnames: tuple[str, ...], model: str, version: str
) -> None:
    """Remove every series of `metric` labelled with this model version."""
    if len(labelnames) == 2:
        _remove(metric, model, version)
        return
    series = {tuple(s.labels[n] for n in labelnames) for m in metric.collect() for s in m.samples}
    for labels in series:
        if labels[:2] == (model, version):
            _remove(metric, *labels)


def _remove(metric: Counter | Gauge | Histogram, *labels: str) -> None:
    with suppress(KeyError):  # that series never existed
        metric.remove(*labels)
