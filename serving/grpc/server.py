"""The server lifecycle, uvicorn style: `ServeConfig -> Server(config) -> await serve()`.

start():   load every model (sha256-verified, warmed up) -> bind gRPC (TLS if configured) ->
           /metrics -> health SERVING. A model that fails to load is UNAVAILABLE with its reason;
           the others serve.
shutdown(): health NOT_SERVING (probes and load balancers stop sending) and the drain gate
           (serving.grpc.admission) answers every new inference call UNAVAILABLE, while the calls
           already admitted finish with their results -> then the gRPC server stops (nothing of
           Kiln's is left for it to cancel) -> batchers and backends close. All of it within
           `grace_period_s`: past it, what is still queued is answered UNAVAILABLE and the rest
           cancelled. SIGTERM and SIGINT call it; a second signal skips the wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable
from importlib import metadata

import grpc
from prometheus_client import CollectorRegistry, start_http_server

from protos.inference import grpc_service_pb2_grpc as pb_grpc
from protos.kiln.classify.v1 import classify_pb2_grpc as cpb_grpc
from serving.grpc.admission import Admission
from serving.grpc.classify import ClassifierServicer
from serving.grpc.config import ServeConfig
from serving.grpc.inference import InferenceServicer
from serving.grpc.metrics import KilnMetrics
from serving.grpc.model_manager import ModelManager
from serving.grpc.process_state import SWITCH_INTERVAL, frozen_heap
from serving.grpc.security import BearerTokenInterceptor, server_credentials
from serving.grpc.standard import Health, enable_reflection
from serving.grpc.status_map import add_mapped_service

log = logging.getLogger("kiln.server")


def server_version() -> str:
    """The installed kiln-serve version ("0+unknown" when running from a source tree)."""
    try:
        return metadata.version("kiln-serve")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def grpc_options(config: ServeConfig, *, shared_port: bool = False) -> list[tuple[str, int]]:
    """Channel arguments: message size limits and the maximum connection age (config.connection_age_s).
    `shared_port`: a worker of serving.grpc.workers, binding the port beside its siblings."""
    options = [
        ("grpc.max_receive_message_length", config.max_receive_message_bytes),
        ("grpc.max_send_message_length", config.max_send_message_bytes),
        # alone, a second server on the same port must fail, not share it
        ("grpc.so_reuseport", int(shared_port)),
        ("grpc.max_concurrent_streams", config.max_concurrent_streams),
    ]
    age_s = config.connection_age_s()
    if age_s is not None:
        # GOAWAY at that age: new calls move to a new connection, the calls in flight finish on the
        # old one however long they take (grpc's default grace, unbounded). A grace of its own cut
        # every stream older than age + grace with UNAVAILABLE: a bulk ClassifyStream or a
        # perf_analyzer --streaming run of over two minutes against the Kubernetes setting (60 s).
        options.append(("grpc.max_connection_age_ms", int(age_s * 1000)))
    return options


class Server:
    """One Kiln server process; see the module docstring."""

    def __init__(
        self,
        config: ServeConfig,
        *,
        registry: CollectorRegistry | None = None,
        announce: Callable[[], None] | None = None,
    ) -> None:
        self.config = config
        # set: a supervised worker (serving.grpc.workers) that tells its supervisor it has loaded
        # and turns serving on only when told (set_serving), once every worker has loaded
        self._announce = announce
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = KilnMetrics(self.registry)
        self.health = Health()
        self.admission = Admission()
        self.manager = ModelManager(config, on_state_change=self.health.set_model, metrics=self.metrics)
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.health_port: int | None = None
        self._grpc: grpc.aio.Server | None = None
        self._health_grpc: grpc.aio.Server | None = None
        self._classifier: ClassifierServicer | None = None
        self._metrics_http = None
        self._ready = self._stopping = False
        self._stopped = asyncio.Event()
        self._shutdown_task: asyncio.Task[None] | None = None
        self._force_task: asyncio.Task[None] | None = None
        self._poll_task: asyncio.Task[None] | None = None
        self._holds_switch_interval = False  # given back by shutdown()

    @property
    def ready(self) -> bool:
        """True between the end of start() and the beginning of shutdown()."""
        return self._ready

    async def start(self) -> None:
        """Load models, bind the ports and become ready (see the module docstring)."""
        cfg = self.config
        await self.health.set_server(False)
        await self.manager.load_all()
        if self._stopping:  # SIGTERM arrived while models were loading: never open the port
            return
        self._grpc = self._build_grpc()
        address = f"{cfg.host}:{cfg.port}"
        try:
            if cfg.tls_cert is not None and cfg.tls_key is not None:
                creds = server_credentials(cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca)
                self.port = self._grpc.add_secure_port(address, creds)
            else:
                self.port = self._grpc.add_insecure_port(address)
        except RuntimeError as exc:  # grpc reports a taken port as RuntimeError
            await self.manager.close(drain=False)
            raise OSError(f"cannot bind gRPC to {address}: {exc}") from None
        await self._grpc.start()
        if cfg.health_port is not None:
            await self._start_health_listener(cfg.host, cfg.health_port)
        if cfg.metrics_port is not None:
            self._metrics_http, _ = start_http_server(cfg.metrics_port, addr=cfg.host, registry=self.registry)
            self.metrics_port = self._metrics_http.server_port
        if cfg.poll_interval_s > 0:
            self._poll_task = asyncio.create_task(self.manager.poll_forever(cfg.poll_interval_s))
        SWITCH_INTERVAL.hold(cfg.gil_switch_interval_us / 1e6)  # see ServeConfig; shutdown() restores
        self._holds_switch_interval = True
        if self._announce is None:
            await self.set_serving(True)
        else:
            self._announce()
        states = {s.model: s.state for s in self.manager.index()}
        log.info(
            "kiln serving on %s:%s (tls=%s, metrics port %s), models %s",
            cfg.host,
            self.port,
            cfg.tls_cert is not None,
            self.metrics_port,
            states,
            extra={"grpc_port": self.port, "metrics_port": self.metrics_port},
        )

    async def set_serving(self, serving: bool) -> None:
        """Readiness and health on or off (a no-op before start() has bound or once stopping)."""
        if self._stopping or self._grpc is None:
            return
        self._ready = serving
        await self.health.set_server(serving)
        for loaded in self.manager.loaded():
            await self.health.set_model(loaded.model, serving)

    async def _start_health_listener(self, host: str, port: int) -> None:
        """Health only, without TLS or token: what kubelet's gRPC probes can reach."""
        self._health_grpc = grpc.aio.server()
        self.health.add_to_server(self._health_grpc)
        try:
            self.health_port = self._health_grpc.add_insecure_port(f"{host}:{port}")
        except RuntimeError as exc:
            raise OSError(f"cannot bind the health port {host}:{port}: {exc}") from None
        await self._health_grpc.start()

    def _build_grpc(self) -> grpc.aio.Server:
        cfg = self.config
        # Interceptors cost a coroutine per call, so only the token check (which must decide per
        # call) is one; error mapping is wrapped around each handler at registration instead.
        token = cfg.token()
        interceptors = [BearerTokenInterceptor(token)] if token is not None else None
        options = grpc_options(cfg, shared_port=self._announce is not None)
        server = grpc.aio.server(interceptors=interceptors, options=options)
        inference = InferenceServicer(
            self.manager,
            cfg,
            server_version=server_version(),
            is_ready=lambda: self._ready,
            metrics=self.metrics,
            admission=self.admission,
        )
        add_mapped_service(pb_grpc.add_GRPCInferenceServiceServicer_to_server, inference, server)
        self._classifier = ClassifierServicer(
            self.manager, cfg, metrics=self.metrics, admission=self.admission
        )
        add_mapped_service(cpb_grpc.add_ClassifierServicer_to_server, self._classifier, server)
        self.health.add_to_server(server)  # grpc's own servicers map their own errors
        if cfg.reflection:
            enable_reflection(server)
        return server

    async def serve(self) -> None:
        """start(), then run until SIGTERM/SIGINT, then shut down gracefully."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            await self.start()
            with frozen_heap():  # what start() loaded lives as long as the server (process_state)
                await self.wait_stopped()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            if not self._stopped.is_set():
                await self.shutdown(0)

    def _on_signal(self, sig: signal.Signals) -> None:
        if self._shutdown_task is None:
            log.info("%s received: draining (grace %.1fs)", sig.name, self.config.grace_period_s)
            self._shutdown_task = asyncio.create_task(self.shutdown())
        else:
            log.warning("%s received again: cancelling in-flight requests", sig.name)
            if self._grpc is not None:  # makes the running shutdown's stop(grace) return at once
                self._force_task = asyncio.create_task(self._grpc.stop(0))

    async def shutdown(self, grace: float | None = None) -> None:
        """Stop gracefully within `grace` seconds (default: config.grace_period_s)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + (self.config.grace_period_s if grace is None else grace)
        self._stopping, self._ready = True, False
        self.admission.begin_drain()
        self.manager.hurry()
        await self.health.shutting_down()
        if self._poll_task is not None:
            self._poll_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poll_task
        if not await self.admission.wait_idle(end - loop.time()):
            log.warning(
                "grace period over with %d calls unanswered: queued requests get UNAVAILABLE, "
                "the rest are cancelled",
                self.admission.active,
            )
            self.manager.fail_queued()
        if self._grpc is not None:
            # Nothing of Kiln's is in flight now (or the grace is over); what remains is brief
            # (health, metadata), or answers just failed above that still need writing.
            await self._grpc.stop(max(end - loop.time(), 0.2))
        self._log_drained()
        try:  # a batch still computing at the grace's end (a big model on a CPU) is not waited for
            await asyncio.wait_for(self.manager.close(drain=True), max(end + 0.2 - loop.time(), 0.1))
        except TimeoutError:
            log.warning("grace period over with a batch still computing: exiting without it")
        if self._health_grpc is not None:  # last: probes see NOT_SERVING throughout the drain
            await self._health_grpc.stop(0)
        if self._classifier is not None:
            self._classifier.close()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
            self._metrics_http = None
        if self._holds_switch_interval:
            SWITCH_INTERVAL.release()
            self._holds_switch_interval = False
        self._stopped.set()
        log.info("kiln stopped")

    def _log_drained(self) -> None:
        for loaded in self.manager.loaded():
            stats = loaded.stats.to_proto().inference_stats
            log.info(
                "drained %s v%d: %d succeeded, %d failed since start",
                loaded.model,
                loaded.version,
                stats.success.count,
                stats.fail.count,
                extra={"model": loaded.model, "success": stats.success.count, "fail": stats.fail.count},
            )

    async def wait_stopped(self) -> None:
        """Return once shutdown() has finished."""
        await self._stopped.wait()
