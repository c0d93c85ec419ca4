"""Cross-checks of the deployment against a live `kiln serve`, started exactly as the CPU overlay's
pod starts it (its args, KILN_* environment and mounted kiln.yaml; only the repository, the bind
address and the ports are local): every probe's health service answers SERVING, every metric name
the dashboard, alerts and adapter use is in a real /metrics scrape, the HPA's signal has data after
a request, and SIGTERM ends the drain well inside the pod's termination budget."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from deploy.validate import pod, promql, render
from deploy.validate.render import K8S
from tests.integration.server_fixtures import CHANNELS, SIZE, publish_tiny_model

pytestmark = pytest.mark.skipif(render.kubectl() is None, reason="kubectl is not installed")


class LiveServer:
    """A `kiln serve` child process and the ports it logged."""

    def __init__(self, proc: subprocess.Popen[str], grpc_port: int, metrics_port: int) -> None:
        self.proc, self.grpc_port, self.metrics_port = proc, grpc_port, metrics_port
        self.log: list[str] = []

    def scrape(self, path: str = "/metrics") -> str:
        url = f"http://127.0.0.1:{self.metrics_port}{path}"
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.read().decode("utf-8")


@pytest.fixture(scope="module")
def objects() -> list[dict[str, Any]]:
    return render.kustomize(K8S / "overlays" / "cpu")


@pytest.fixture(scope="module")
def live(objects: list[dict[str, Any]], tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    tmp = tmp_path_factory.mktemp("live")
    publish_tiny_model(tmp / "repo", "tiny")
    run = pod.prepare(objects, tmp / "root")
    proc = subprocess.Popen(
        pod.serve_command(run, tmp / "repo"), cwd=pod.REPO_ROOT, env=pod.kiln_env(run),
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stderr is not None
    reader: threading.Thread | None = None
    try:
        server = _wait_for_ports(proc)
        # keep reading the log so a full pipe never blocks the server
        reader = threading.Thread(target=server.log.extend, args=(proc.stderr,), daemon=True)
        reader.start()
        yield server
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        if reader is not None:
            reader.join(timeout=30)
        proc.stderr.close()


def _wait_for_ports(proc: subprocess.Popen[str]) -> LiveServer:
    """Read the JSON log (log_format json comes from the ConfigMap) until the server logs its ports."""
    assert proc.stderr is not None
    deadline = time.monotonic() + 120
    for line in proc.stderr:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            raise AssertionError(f"not a JSON log line (log_format from kiln.yaml?): {line!r}") from None
        if "grpc_port" in entry:
            return LiveServer(proc, int(entry["grpc_port"]), int(entry["metrics_port"]))
        assert time.monotonic() < deadline, "server did not start in time"
    raise AssertionError(f"kiln serve exited with {proc.wait()} before serving")


def _health(port: int, service: str) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


def test_every_probe_service_is_serving(objects: list[dict[str, Any]], live: LiveServer) -> None:
    container = pod.server_container(objects)
    services = {
        container[p]["grpc"].get("service", "") for p in ("startupProbe", "readinessProbe", "livenessProbe")
    }
    assert services, "no gRPC probes"
    for service in services:
        assert _health(live.grpc_port, service) == health_pb2.HealthCheckResponse.SERVING, service
    with pytest.raises(grpc.RpcError) as err:  # a typo in a probe's service would fail like this
        _health(live.grpc_port, "inference.GRPCInferenceServic")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_every_metric_name_used_is_in_a_live_scrape(objects: list[dict[str, Any]], live: LiveServer) -> None:
    (endpoint,) = render.one(objects, "ServiceMonitor")["spec"]["endpoints"]
    scraped = promql.exposed_names(promql.scrape_families(live.scrape(endpoint["path"])))
    missing = promql.unknown_names(scraped)
    # NVML metrics exist only where a GPU driver is present; they are checked against the
    # collector's names in tests/unit/test_deploy_monitoring.py instead.
    if not any(name.startswith("kiln_gpu_") for name in scraped):
        missing = [m for m in missing if ": kiln_gpu_" not in m]
    # The supervisor's series exist only with workers > 1 (this box's pod resolves to one worker);
    # a real two-worker scrape has them in tests/integration/test_server_workers.py.
    if "kiln_workers" not in scraped:
        missing = [m for m in missing if not m.endswith((": kiln_workers", ": kiln_worker_restarts_total"))]
    assert not missing, "\n".join(missing)


def test_the_autoscaling_signal_has_data_after_a_request(live: LiveServer) -> None:
    from protos.inference import grpc_service_pb2_grpc as pb_grpc
    from serving.clients.client import build_infer_request

    batch = np.zeros((2, CHANNELS, SIZE, SIZE), np.float32)
    with grpc.insecure_channel(f"127.0.0.1:{live.grpc_port}") as channel:
        pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            build_infer_request("tiny", {"input": batch}), timeout=30
        )
    (rule,) = promql.adapter_rules()
    series = rule["seriesQuery"].split("{")[0]
    samples = [line for line in live.scrape().splitlines() if line.startswith(series + "{")]
    assert samples and any('model="tiny"' in s and float(s.rsplit(" ", 1)[1]) >= 1 for s in samples), samples


def test_sigterm_drains_inside_the_pods_termination_budget(
    objects: list[dict[str, Any]], live: LiveServer
) -> None:
    spec = pod.pod_spec(objects)
    pre_stop = pod.server_container(objects)["lifecycle"]["preStop"]["sleep"]["seconds"]
    budget = spec["terminationGracePeriodSeconds"] - pre_stop
    start = time.monotonic()
    live.proc.send_signal(signal.SIGTERM)
    assert live.proc.wait(timeout=budget) == 0
    assert time.monotonic() - start < budget
