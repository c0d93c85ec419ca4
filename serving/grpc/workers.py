"""`workers: N`: N server processes behind one port, and the supervisor that keeps them.

Each worker is a whole `Server` (serving.grpc.server) with its own event loop, GIL, models and
ONNX Runtime threads (the cores split between workers x instances), binding the same port with
SO_REUSEPORT: the kernel hands each new *connection* to one worker, so one gRPC channel stays on
one worker, and clients spread only as far as they open connections (docs/design.md, "Serving on
every core"; `max_connection_age_s` makes long-lived channels reconnect and spread).

The supervisor (this process) binds nothing that serves: it holds the port reserved, starts the
workers (spawned: no forked grpc or ORT state), and through one pipe per worker turns health and
readiness on in every worker only once every worker has loaded, and off while one is missing. It
serves the one /metrics, summing the workers (prometheus_client's multiprocess mode, see
serving.grpc.metrics). A worker that dies is logged, counted (`kiln_worker_restarts_total`) and
replaced. SIGTERM/SIGINT are forwarded once to each worker, which drains as a lone server does;
a second signal is forwarded too (the workers then cancel what is in flight). Workers sit in
their own process group, so a terminal's Ctrl-C reaches them only through the supervisor, and a
worker whose supervisor vanished (its pipe closed) drains and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing import get_context
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess

from prometheus_client import CollectorRegistry, multiprocess, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from serving.grpc.config import ServeConfig, usable_cores
from serving.runtime.backends import core_share
from serving.runtime.backends.core_share import CoreTable

log = logging.getLogger("kiln.workers")
LoopFactory = Callable[[], asyncio.AbstractEventLoop] | None
_QUICK_DEATH_S = 10.0  # a worker that dies younger than this is restarted after a pause
_RESTART_PAUSE_S = 1.0  # so that a crash loop costs a worker start per second, not a busy core


def worker_threads(config: ServeConfig) -> int:
    """ORT intra-op threads per instance in each worker: the cores split between all instances."""
    if config.intra_op_threads is not None:
        return config.intra_op_threads
    return max(1, usable_cores() // (config.worker_count() * (config.instances or 1)))


def reserve_port(host: str, port: int) -> socket.socket:
    """A bound, never listening SO_REUSEPORT socket that keeps `port` (0: a free one) for the
    workers; OSError if something else already listens there (SO_REUSEPORT would join it)."""
    family, _, _, _, address = socket.getaddrinfo(
        host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    if port:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                raise OSError(f"cannot bind {host}:{port}: {exc.strerror or exc}") from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(address)
    return sock


def _worker_main(
    config: ServeConfig, conn: Connection, factory: LoopFactory, seat: tuple[str, int, int, int] | None
) -> None:
    """A worker process: one Server, gated by the supervisor's pipe; `seat`: its place in the
    core table (core_share.join's arguments), None when the workers do not share cores."""
    from serving.grpc.request_log import configure_logging

    os.setpgid(0, 0)  # Ctrl-C reaches the supervisor only, which forwards one SIGTERM
    configure_logging(config.log_format, config.log_level)
    if seat is not None:  # before any model loads: their sessions read it
        core_share.join(*seat)
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(_serve_worker(config, conn))


async def _serve_worker(config: ServeConfig, conn: Connection) -> None:
    from serving.grpc.server import Server

    loop = asyncio.get_running_loop()
    server = Server(config, announce=lambda: conn.send("ready"))
    table = core_share.current()
    if table is not None:
        table.on_batch = server.metrics.count_worker_batch
    tasks: set[asyncio.Task[None]] = set()

    def on_message() -> None:
        try:
            serving = conn.recv()
        except (EOFError, OSError):  # the supervisor is gone: no one would stop or replace us
            loop.remove_reader(conn.fileno())
            os.kill(os.getpid(), signal.SIGTERM)  # the server's own drain path
            return
        task = loop.create_task(server.set_serving(bool(serving)))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    loop.add_reader(conn.fileno(), on_message)
    try:
        await server.serve()
    finally:
        loop.remove_reader(conn.fileno())


@dataclass
class _Worker:
    slot: int
    process: BaseProcess
    conn: Connection
    started: float
    ready: bool = False


class SupervisorCollector(Collector):
    """The supervisor's own series: workers live and ready, and restarts."""

    def __init__(self, supervisor: Supervisor) -> None:
        self._supervisor = supervisor

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        workers = list(self._supervisor.workers.values())
        gauge = GaugeMetricFamily("kiln_workers", "Worker processes by state", labels=("state",))
        gauge.add_metric(("running",), len(workers))
        gauge.add_metric(("ready",), sum(w.ready for w in workers))
        yield gauge
        yield CounterMetricFamily(
            "kiln_worker_restarts", "Workers that died and were replaced", value=self._supervisor.restarts
        )


class Supervisor:
    """Starts `config.worker_count()` workers on one port and keeps them; see the module docstring."""

    def __init__(self, config: ServeConfig, loop_factory: LoopFactory = None) -> None:
        self.config = config
        self.count = config.worker_count()
        self.workers: dict[int, _Worker] = {}
        self.restarts = 0
        self._factory = loop_factory
        self._ctx = get_context("spawn")
        self._worker_config = config
        self._held: list[socket.socket] = []
        self._pending: dict[int, float] = {}  # slot -> when to start its replacement
        self._signals: list[int] = []
        self._serving = self._started = False
        self._stop_deadline: float | None = None
        self._metrics_dir = ""
        self._metrics_http = None
        self._cores_dir = ""
        self._cores: tuple[str, int, int] | None = None  # the core table: path, workers, cores

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT and every worker has drained. Returns the exit code."""
        try:
            self._prepare()
        except OSError as exc:
            log.error("cannot serve: %s", exc)
            self._cleanup()
            return 1
        wake_r, wake_w = socket.socketpair()
        wake_w.setblocking(False)
        previous = signal.set_wakeup_fd(wake_w.fileno())
        handlers = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            for slot in range(self.count):
                self._spawn(slot)
            return self._loop(wake_r)
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
            signal.set_wakeup_fd(previous)
            wake_r.close()
            wake_w.close()
            self._cleanup()

    def _prepare(self) -> None:
        """Reserve the ports, point the workers' metrics at a fresh folder, serve /metrics."""
        cfg = self.config
        self._held.append(reserve_port(cfg.host, cfg.port))
        port = self._held[0].getsockname()[1]
        health_port = cfg.health_port
        if health_port is not None:
            self._held.append(reserve_port(cfg.host, health_port))
            health_port = self._held[1].getsockname()[1]
        threads = worker_threads(cfg)
        if threads * (cfg.instances or 1) * self.count > usable_cores():
            log.warning(
                "workers x instances x intra_op_threads = %d x %d x %d exceeds the %d cores",
                self.count, cfg.instances or 1, threads, usable_cores(),
            )  # fmt: skip
        self._worker_config = dataclasses.replace(
            cfg, port=port, health_port=health_port, metrics_port=None, intra_op_threads=threads
        )
        if cfg.workers_share_cores and self.count > 1:  # see serving/runtime/backends/core_share.py
            self._cores_dir = tempfile.mkdtemp(prefix="kiln-cores-")
            table = os.path.join(self._cores_dir, "computing")
            CoreTable.create(table, self.count)
            self._cores = (table, self.count, usable_cores())
        # read by prometheus_client when each spawned worker imports it (serving.grpc.metrics)
        self._metrics_dir = tempfile.mkdtemp(prefix="kiln-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = self._metrics_dir
        if cfg.metrics_port is not None:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry, path=self._metrics_dir)
            registry.register(SupervisorCollector(self))
            self._metrics_http, _ = start_http_server(cfg.metrics_port, addr=cfg.host, registry=registry)

    def _cleanup(self) -> None:
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
        for sock in self._held:
            sock.close()
        if self._metrics_dir:
            os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
            shutil.rmtree(self._metrics_dir, ignore_errors=True)
        if self._cores_dir:
            shutil.rmtree(self._cores_dir, ignore_errors=True)

    def _spawn(self, slot: int) -> None:
        ours, theirs = self._ctx.Pipe()
        process = self._ctx.Process(
            target=_worker_main,
            args=(self._worker_config, theirs, self._factory, self._table_seat(slot)),
            name=f"kiln-worker-{slot}",
        )
        process.start()
        theirs.close()
        self.workers[slot] = _Worker(slot, process, ours, time.monotonic())
        log.info("worker %d started (pid %d)", slot, process.pid, extra={"worker": slot, "pid": process.pid})

    def _table_seat(self, slot: int) -> tuple[str, int, int, int] | None:
        """What core_share.join needs in the worker of `slot`; None without a core table."""
        if self._cores is None:
            return None
        path, slots, cores = self._cores
        return path, slot, slots, cores

    def _loop(self, wake: socket.socket) -> int:
        while self.workers or (self._pending and self._stop_deadline is None):
            waitables: list[object] = [wake]
            for worker in self.workers.values():
                waitables += [worker.conn, worker.process.sentinel]
            for item in wait(waitables, self._timeout()):
                if item is wake:
                    wake.recv(512)
                elif isinstance(item, Connection):
                    self._on_message(item)
                elif self._on_exit(item) and not self._started:
                    log.error("a worker failed before every worker was ready: stopping")
                    self._stop()
                    self._drain_all()
                    return 1
            self._handle_signals()
            self._restart_due()
            if self._stop_deadline is not None and time.monotonic() > self._stop_deadline:
                self._kill_all()
        log.info("kiln stopped (%d workers drained)", self.count)
        return 0

    def _timeout(self) -> float | None:
        moments = list(self._pending.values())
        if self._stop_deadline is not None:
            moments.append(self._stop_deadline)
        return max(0.0, min(moments) - time.monotonic()) if moments else None

    def _on_message(self, conn: Connection) -> None:
        worker = next(w for w in self.workers.values() if w.conn is conn)
        try:
            conn.recv()  # the only message a worker sends: "ready"
        except (EOFError, OSError):
            return  # it is exiting: its sentinel says so
        worker.ready = True
        self._update_serving()

    def _on_exit(self, sentinel: object) -> bool:
        """A worker exited; returns True if it was not asked to."""
        worker = next(w for w in self.workers.values() if w.process.sentinel == sentinel)
        worker.process.join()
        worker.conn.close()
        del self.workers[worker.slot]
        multiprocess.mark_process_dead(worker.process.pid, self._metrics_dir)  # its live gauges go
        code = worker.process.exitcode
        if self._stop_deadline is not None:
            log.info("worker %d drained and exited (code %s)", worker.slot, code)
            return False
        self.restarts += int(self._started)
        lived = time.monotonic() - worker.started
        log.error(
            "worker %d (pid %d) died (exit code %s) after %.1f s: replacing it",
            worker.slot, worker.process.pid, code, lived,
            extra={"worker": worker.slot, "exit_code": code, "restarts": self.restarts},
        )  # fmt: skip
        self._pending[worker.slot] = time.monotonic() + (_RESTART_PAUSE_S if lived < _QUICK_DEATH_S else 0.0)
        self._update_serving()
        return True

    def _update_serving(self) -> None:
        """Serving in every worker iff all `count` are up and ready; told to each on every change
        and to each newly ready worker."""
        serving = len(self.workers) == self.count and all(w.ready for w in self.workers.values())
        serving = serving and self._stop_deadline is None
        for worker in self.workers.values():
            if worker.ready:
                with contextlib.suppress(OSError):  # it is exiting: its sentinel says so
                    worker.conn.send(serving)
        if serving != self._serving:
            self._serving = serving
            log.info("every worker ready: serving" if serving else "a worker is missing: not serving")
        if serving and not self._started:
            self._started = True
            port = self._worker_config.port
            metrics_port = self._metrics_http.server_port if self._metrics_http is not None else None
            log.info(
                "kiln serving on %s:%s with %d workers (metrics port %s)",
                self.config.host, port, self.count, metrics_port,
                extra={"grpc_port": port, "metrics_port": metrics_port, "workers": self.count},
            )  # fmt: skip

    def _restart_due(self) -> None:
        now = time.monotonic()
        for slot, when in list(self._pending.items()):
            if when <= now and self._stop_deadline is None:
                del self._pending[slot]
                self._spawn(slot)

    def _on_signal(self, signum: int, _frame: object) -> None:
        self._signals.append(signum)  # handled in the loop (the wakeup fd ends its wait)

    def _handle_signals(self) -> None:
        while self._signals:
            name = signal.Signals(self._signals.pop(0)).name
            if self._stop_deadline is None:
                log.info("%s received: draining %d workers (grace %.1fs)", name, len(self.workers),
                         self.config.grace_period_s)  # fmt: skip
                self._stop()
            else:
                log.warning("%s received again: the workers cancel what is in flight", name)
                self._signal_all(signal.SIGTERM)

    def _stop(self) -> None:
        self._stop_deadline = time.monotonic() + self.config.grace_period_s + 10.0
        self._pending.clear()
        self._serving = False
        self._signal_all(signal.SIGTERM)

    def _drain_all(self) -> None:
        for worker in list(self.workers.values()):
            worker.process.join(max(0.0, (self._stop_deadline or 0.0) - time.monotonic()))
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()

    def _signal_all(self, sig: signal.Signals) -> None:
        for worker in self.workers.values():
            if worker.process.pid is not None and worker.process.is_alive():
                os.kill(worker.process.pid, sig)

    def _kill_all(self) -> None:
        log.error("workers still running past the grace period: killing them")
        for worker in self.workers.values():
            worker.process.kill()
        self._stop_deadline = time.monotonic() + 5.0
