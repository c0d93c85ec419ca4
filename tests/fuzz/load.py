"""Fault-injection helpers shared by tests/integration/test_faults_*.py: steady client load that
records every failure, a gate that holds or inspects the batches reaching a real backend, the
resident memory of a process, Prometheus samples read over HTTP, and a `kiln serve` subprocess.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path

import grpc
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from serving.clients.client import KilnClient, build_infer_request

ROOT = Path(__file__).resolve().parents[2]
BATCH = np.random.default_rng(0).normal(size=(1, 3, 8, 8)).astype(np.float32)
MARKER = 321.0  # an input filled with this identifies a request inside a batch


def wait_until(predicate: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    """Poll `predicate` until true; AssertionError naming `what` after `timeout` seconds."""
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, f"{what} not reached within {timeout} s"
        time.sleep(0.01)


class Hammer:
    """Client threads sending valid requests to `models` until stopped; records every failure."""

    def __init__(self, address: str, models: tuple[str, ...] = ("tiny",), threads: int = 2) -> None:
        self.address, self.models = address, models
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self.ok: dict[str, int] = dict.fromkeys(models, 0)
        self.failures: list[tuple[str, grpc.StatusCode, str]] = []
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def __enter__(self) -> Hammer:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join(60)

    def count(self, model: str) -> int:
        """Successful requests to `model` so far."""
        with self._lock:
            return self.ok[model]

    def _run(self, index: int) -> None:
        with KilnClient(self.address, timeout=30) as client:
            turn = index
            while not self.stop.is_set():
                model = self.models[turn % len(self.models)]
                turn += 1
                try:
                    client.inference.ModelInfer(build_infer_request(model, {"input": BATCH}), timeout=30)
                except grpc.RpcError as exc:
                    with self._lock:
                        self.failures.append((model, exc.code(), exc.details()))
                    time.sleep(0.01)  # a refused call returns at once: do not spin
                    continue
                with self._lock:
                    self.ok[model] += 1


class Gate:
    """Wraps a backend's infer: holds batches while closed, and records the batches it saw."""

    def __init__(self, infer: Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]) -> None:
        self._infer = infer
        self.open = threading.Event()
        self.open.set()
        self.entered = threading.Event()
        self.rows_seen = 0
        self.marker_rows = 0

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch = inputs["input"]
        self.rows_seen += batch.shape[0]
        self.marker_rows += int(np.all(batch == MARKER, axis=(1, 2, 3)).sum())
        self.entered.set()
        assert self.open.wait(60), "gate never opened"
        return self._infer(inputs)


def live_rss_bytes() -> int:
    """This process's RSS after a GC and glibc's malloc_trim: freed memory handed back to the OS,
    so what remains is (mostly) live, and a leak is not hidden in allocator noise."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    return rss_bytes()


def rss_bytes(pid: int | None = None) -> int:
    """Resident set size of a process (this one by default), from /proc."""
    for line in Path(f"/proc/{pid or os.getpid()}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/<pid>/status")


def metric(port: int, name: str, labels: Mapping[str, str] | None = None) -> float:
    """Sum of the samples `name` (matching `labels`) on a /metrics endpoint."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode("utf-8")
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in (labels or {}).items()):
                total += sample.value
    return total


class KilnProcess:
    """`kiln serve` as a child process on 127.0.0.1; `port` is known once it listens."""

    def __init__(self, repo: Path, *flags: str) -> None:
        cmd = [sys.executable, "-m", "serving.dispatch", "serve", "--repo", str(repo), "--host", "127.0.0.1",
               "--no-metrics", "--log-format", "json", *flags]  # fmt: skip
        if "--port" not in flags:
            cmd += ["--port", "0"]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
        self.log: list[str] = []  # every stderr line (JSON records, or a traceback's lines)
        self.port = self._wait_listening()
        self._drain = threading.Thread(target=self._read_rest, daemon=True)
        self._drain.start()

    def _wait_listening(self) -> int:
        assert self.proc.stderr is not None
        lines = []
        for line in self.proc.stderr:  # blocks until the server logs its port (or dies)
            lines.append(line)
            self.log.append(line)
            record = json.loads(line)
            if "grpc_port" in record:
                return int(record["grpc_port"])
        self.proc.stderr.close()
        raise AssertionError(f"kiln serve exited with {self.proc.wait()} before listening: {lines}")

    def _read_rest(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:  # keep the pipe from filling up
            self.log.append(line)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Send `sig` (if still running), wait for the exit, close the pipe; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout=timeout)
        self._drain.join(timeout)
        assert self.proc.stderr is not None
        self.proc.stderr.close()
        return code
