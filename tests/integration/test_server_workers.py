"""`kiln serve --workers 2`: a real supervisor and its two worker processes on one port, real clients
(tritonclient channels, KilnClient). Connections spread over the workers; one channel stays on one,
computes on every core while the other worker idles, and moves at its connection age; health turns
on only with every worker; /metrics sums them; a new version published into the repository reaches
every worker by polling; repository control is refused; a SIGKILLed worker is replaced while the
other keeps answering; SIGTERM drains both with nothing lost."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serving.clients.client import KilnClient
from tests.integration.server_fixtures import ROOT, publish_tiny_model, reference_logits

grpcclient = pytest.importorskip("tritonclient.grpc", reason="tritonclient not installed")

BATCH = np.random.default_rng(0).normal(size=(1, 3, 8, 8)).astype(np.float32)
CHANNELS = 16  # 2 workers: all 16 on one worker has odds 2**-15
SERVING = health_pb2.HealthCheckResponse.SERVING
# grpc shares one TCP connection among a process's channels to the same target with the same
# arguments (its global subchannel pool); a local pool gives each channel its own connection
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]


def open_clients(port: int, count: int) -> list[grpcclient.InferenceServerClient]:
    return [
        grpcclient.InferenceServerClient(f"127.0.0.1:{port}", channel_args=OWN_CONNECTION)
        for _ in range(count)
    ]


@dataclass
class Supervised:
    """A `kiln serve --workers 2` process, its ports and its JSON log (read by a thread)."""

    proc: subprocess.Popen[str]
    lines: list[dict] = field(default_factory=list)
    port: int = 0
    metrics_port: int | None = None
    reader: threading.Thread | None = None

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM (unless already exited), wait, and close the log pipe; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            if self.reader is not None:
                self.reader.join(5)
            assert self.proc.stderr is not None
            self.proc.stderr.close()

    def worker_pids(self) -> list[int]:
        started = [line for line in self.lines if line["msg"].startswith("worker ") and "pid" in line]
        latest = {line["worker"]: line["pid"] for line in started}
        return sorted(latest.values())

    def metrics_text(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as reply:
            return reply.read().decode()

    def metric(self, name: str) -> float:
        text = self.metrics_text()
        pattern = re.compile(rf"^{re.escape(name)} ([0-9.e+-]+)$", re.MULTILINE)
        found = pattern.search(text)
        return float(found.group(1)) if found else 0.0

    def health(self) -> int:
        with grpc.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            return stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status


def start_supervised(repo: Path, *flags: str) -> Supervised:
    cmd = [sys.executable, "-m", "serving.dispatch", "serve", "--repo", str(repo), "--host", "127.0.0.1",
           "--port", "0", "--metrics-port", "0", "--workers", "2", "--log-format", "json",
           *flags]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    server = Supervised(proc)
    ready = threading.Event()

    def read() -> None:  # keeps draining stderr so that no worker ever blocks on its log
        assert proc.stderr is not None
        for raw in proc.stderr:
            try:
                line = json.loads(raw)
            except json.JSONDecodeError:  # a traceback: keep it for the failure message
                line = {"msg": raw.rstrip()}
            server.lines.append(line)
            if "workers" in line and "grpc_port" in line:
                server.port, server.metrics_port = line["grpc_port"], line["metrics_port"]
                ready.set()
        ready.set()

    server.reader = threading.Thread(target=read, daemon=True)
    server.reader.start()
    if not (ready.wait(60) and server.port):
        server.stop(5)
        raise AssertionError(f"no supervisor ready line: {server.lines}")
    return server


def connections(pids: list[int], port: int) -> dict[int, int]:
    """Established TCP connections to `port` that each pid holds (from /proc, no extra package)."""
    states: dict[str, int] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in Path(table).read_text().splitlines()[1:]:
            cols = row.split()
            if int(cols[1].rsplit(":", 1)[1], 16) == port and cols[3] == "01":
                states[cols[9]] = 1
    counts = {}
    for pid in pids:
        inodes = set()
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            target = os.readlink(fd) if fd.is_symlink() else ""
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
        counts[pid] = len(inodes & states.keys())
    return counts


def infer(client: grpcclient.InferenceServerClient) -> np.ndarray:
    inp = grpcclient.InferInput("input", list(BATCH.shape), "FP32")
    inp.set_data_from_numpy(BATCH)
    return client.infer("tiny", [inp], client_timeout=10).as_numpy("logits")


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("repo")
    publish_tiny_model(root, "tiny", seed=1, max_batch_size=4)
    return root


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[Supervised]:
    # connections counted by these tests stay put: no GOAWAY at a connection age (its own test below)
    supervised = start_supervised(
        repo, "--poll-interval-s", "0.5", "--grace-period-s", "5", "--max-connection-age-s", "0"
    )
    yield supervised
    assert supervised.stop() == 0


@pytest.fixture(scope="module")
def clients(server: Supervised) -> Iterator[list[grpcclient.InferenceServerClient]]:
    opened = open_clients(server.port, CHANNELS)
    yield opened
    for client in opened:
        client.close()


def test_many_connections_spread_and_one_stays(
    server: Supervised, repo: Path, clients: list[grpcclient.InferenceServerClient]
) -> None:
    expected = reference_logits(repo / "tiny" / "1" / "model.onnx", BATCH)
    assert server.health() == SERVING
    before_ok = server.metric('kiln_requests_total{code="OK",model="tiny",version="1"}')
    before_hist = server.metric('kiln_request_duration_seconds_count{model="tiny",version="1"}')
    for client in clients:
        np.testing.assert_allclose(infer(client), expected, rtol=1e-5, atol=1e-5)
    pids = server.worker_pids()
    spread = connections(pids, server.port)
    assert len(pids) == 2 and all(spread[pid] >= 1 for pid in pids), spread
    with KilnClient(f"127.0.0.1:{server.port}") as one:
        for _ in range(10):
            np.testing.assert_allclose(
                one.infer("tiny", {"input": BATCH})["logits"], expected, rtol=1e-5, atol=1e-5
            )
        one_more = connections(pids, server.port)
        assert sorted(one_more[pid] - spread[pid] for pid in pids) == [0, 1]  # one channel, one worker
    sent = CHANNELS + 10
    assert server.metric('kiln_requests_total{code="OK",model="tiny",version="1"}') == before_ok + sent
    assert (
        server.metric('kiln_request_duration_seconds_count{model="tiny",version="1"}') == before_hist + sent
    )
    assert server.metric('kiln_workers{state="ready"}') == 2


def test_a_long_lived_channel_moves_between_workers_at_its_connection_age(repo: Path) -> None:
    """One channel lands on one worker (the kernel hashes each connection to one); at its
    connection age the worker sends GOAWAY, the channel reconnects and the kernel picks again, so
    over ~20 reconnects it reaches both workers (odds of staying 2**-19), every call answered."""
    expected = reference_logits(repo / "tiny" / "1" / "model.onnx", BATCH)
    server = start_supervised(repo, "--max-connection-age-s", "0.2")
    try:
        pids, holders = server.worker_pids(), set()
        with KilnClient(f"127.0.0.1:{server.port}") as one:
            end = time.monotonic() + 4.0
            while time.monotonic() < end:
                np.testing.assert_allclose(
                    one.infer("tiny", {"input": BATCH})["logits"], expected, rtol=1e-5, atol=1e-5
                )
                holders |= {pid for pid, count in connections(pids, server.port).items() if count}
        assert len(pids) == 2 and holders == set(pids), (pids, holders)
    finally:
        assert server.stop() == 0


def test_kiln_client_connections_reach_every_worker(server: Supervised, repo: Path) -> None:
    """KilnClient(connections=N) opens N connections and spreads its calls round-robin over them:
    channels connect lazily, so N new established connections mean every one carried calls."""
    expected = reference_logits(repo / "tiny" / "1" / "model.onnx", BATCH)
    pids = server.worker_pids()
    before = connections(pids, server.port)
    with KilnClient(f"127.0.0.1:{server.port}", connections=CHANNELS) as spread:
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda _: spread.infer("tiny", {"input": BATCH}), range(2 * CHANNELS)))
        for answer in answers:
            np.testing.assert_allclose(answer["logits"], expected, rtol=1e-5, atol=1e-5)
        added = {pid: count - before[pid] for pid, count in connections(pids, server.port).items()}
    assert sum(added.values()) == CHANNELS and all(n >= 1 for n in added.values()), added


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="one core: a worker's share is every core")
def test_one_connection_computes_on_every_core_while_the_other_worker_idles(
    server: Supervised, repo: Path
) -> None:
    """One channel reaches one worker; with the other idle, its batches run on the wide session
    (every core) and say so in kiln_worker_batches_total, with the numbers of the reference."""
    expected = reference_logits(repo / "tiny" / "1" / "model.onnx", BATCH)
    wide = 'kiln_worker_batches_total{cores="all"}'
    before = server.metric(wide)
    with KilnClient(f"127.0.0.1:{server.port}") as one:
        for _ in range(10):
            np.testing.assert_allclose(
                one.infer("tiny", {"input": BATCH})["logits"], expected, rtol=1e-5, atol=1e-5
            )
    assert server.metric(wide) - before >= 9  # the first may follow the other worker's last batch


def test_workers_keep_their_share_when_told_not_to_share(repo: Path) -> None:
    supervised = start_supervised(repo, "--no-workers-share-cores")
    try:
        expected = reference_logits(repo / "tiny" / "1" / "model.onnx", BATCH)
        with KilnClient(f"127.0.0.1:{supervised.port}") as one:
            for _ in range(3):
                np.testing.assert_allclose(
                    one.infer("tiny", {"input": BATCH})["logits"], expected, rtol=1e-5, atol=1e-5
                )
        assert "kiln_worker_batches_total" not in supervised.metrics_text()
    finally:
        assert supervised.stop() == 0


def test_repository_control_refused_with_workers(repo: Path) -> None:
    cmd = [sys.executable, "-m", "serving.dispatch", "serve", "--repo", str(repo), "--workers", "2",
           "--repository-control", "--print-config"]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "repository_control needs workers: 1" in done.stderr


def test_polling_reaches_every_worker(
    server: Supervised, repo: Path, clients: list[grpcclient.InferenceServerClient]
) -> None:
    publish_tiny_model(repo, "tiny", seed=2, max_batch_size=4, version=2)
    expected = reference_logits(repo / "tiny" / "2" / "model.onnx", BATCH)
    deadline = time.monotonic() + 20
    stale = list(clients)
    while stale and time.monotonic() < deadline:
        stale = [c for c in stale if not np.allclose(infer(c), expected, rtol=1e-5, atol=1e-5)]
        time.sleep(0.2)
    assert not stale, f"{len(stale)} connections still answered by version 1"


def test_killed_worker_is_replaced(
    server: Supervised, clients: list[grpcclient.InferenceServerClient]
) -> None:
    victim, survivor = server.worker_pids()
    held = connections([victim], server.port)[victim]
    failed: set[int] = set()
    stop = threading.Event()

    def hammer(index: int) -> None:
        while not stop.is_set():
            try:
                infer(clients[index])
            except Exception:  # any failure counts against this channel
                failed.add(index)

    with ThreadPoolExecutor(CHANNELS) as pool:
        for index in range(CHANNELS):
            pool.submit(hammer, index)
        time.sleep(0.3)
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while (victim in server.worker_pids() or server.health() != SERVING) and time.monotonic() < deadline:
            time.sleep(0.1)
        stop.set()
    assert victim not in server.worker_pids() and survivor in server.worker_pids()
    assert server.health() == SERVING
    assert len(failed) <= held, f"{len(failed)} channels failed, the killed worker held {held}"
    assert server.metric("kiln_worker_restarts_total") == 1
    assert any("died" in line["msg"] for line in server.lines)


def test_sigterm_drains_every_worker(repo: Path) -> None:
    # each batch holds its instance 300 ms: the requests are in flight when SIGTERM arrives
    supervised = start_supervised(
        repo, "--backend", "null", "--null-base-us", "300000", "--grace-period-s", "5"
    )
    opened = open_clients(supervised.port, 8)
    try:
        assert all(client.is_server_live() for client in opened)  # connected before the clock starts
        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(infer, client) for client in opened]
            time.sleep(0.15)
            supervised.proc.send_signal(signal.SIGTERM)
            answers = [future.result(timeout=15) for future in futures]
        assert all(answer.shape == (1, 4) for answer in answers)
        assert supervised.stop(15) == 0
        assert sum("drained and exited" in line["msg"] for line in supervised.lines) == 2
    finally:
        for client in opened:
            client.close()
        supervised.stop(5)
