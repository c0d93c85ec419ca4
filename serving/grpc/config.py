"""`kiln serve` configuration: one frozen dataclass, resolved as defaults <- YAML file <- KILN_* env
<- command-line flags, validated at start with messages that name the bad value and its source.

Every field is settable from each source under the same name (`max_batch_size` in YAML,
`KILN_MAX_BATCH_SIZE` in the environment, `--max-batch-size` on the command line). Secrets are
the exception: the bearer token comes from a file (`auth_token_file`) or the `KILN_AUTH_TOKEN`
environment variable only, never from a flag (flags are visible in `ps`).

A few settings (MODEL_SETTINGS: the promotion policy and the latency target) can also differ per
model, under `model_overrides`, a mapping of model name to settings; a model not named there, and
a setting a model does not name, takes the server-wide value. In the environment and on the
command line the mapping is YAML (or JSON) text, and it replaces the file's mapping as a whole:

    model_overrides:
      resnet50: {promotion: shadow, shadow_min_agreement: 0.995, latency_target_ms: 25}

`ServeConfig.for_model(name)` is the config a model runs with (the overrides applied, validated
at start like the rest).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import os
import reprlib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from serving.contract import serving_defaults
from serving.contract.version_policy import VersionPolicy, VersionPolicyError
from serving.runtime.backends.base import LONE_BATCH_SPINNING, SINGLE_THREAD_SMALL_BATCHES
from serving.runtime.distribution import DEFAULT_PREDICTION_CLASSES

ENV_PREFIX = "KILN_"
DEVICES_HINT = "'cpu', 'cuda', 'cuda:N' or 'auto'"
BACKENDS = ("auto", "onnxruntime", "tensorrt", "null")  # null: the timing backend (no compute)
PRECISIONS = ("auto", "fp32", "fp16", "int8")
LOG_FORMATS = ("text", "json")
EVENT_LOOPS = ("auto", "uvloop", "asyncio")
LOG_LEVELS = ("debug", "info", "warning", "error")
PROMOTIONS = ("immediate", "shadow")
# max_connection_age_s's default with workers > 1: the kernel hands each new connection to one
# worker, so clients whose connections all landed on one worker re-roll within this long
WORKERS_CONNECTION_AGE_S = 30.0
# the settings model_overrides may set for one model (the rest are server-wide)
MODEL_SETTINGS = (
    "promotion",
    "shadow_sample",
    "shadow_min_requests",
    "shadow_min_agreement",
    "shadow_max_latency_ratio",
    "shadow_timeout_s",
    "shadow_queue_size",
    "latency_target_ms",
)
_SECRET_FIELDS = frozenset({"auth_token", "admin_token"})
# ServeConfig fields that BackendOptions takes under the same name (serving/grpc/model_version.py)
BACKEND_FIELDS = (
    "iobinding",
    "pinned_memory",
    "pad_to_buckets",
    "cuda_graphs",
    "cuda_prefer_nhwc",
    "cuda_tf32",
    "cudnn_conv_algo_search",
    "onnx_provider",
    "trt_engine_cache_dir",
    "trt_workspace_bytes",
    "trt_allow_other_gpu",
)
_MIB = 1024 * 1024


class ConfigError(ValueError):
    """A bad configuration value; the message names the source, the key and the value."""


@dataclass(frozen=True, kw_only=True)
class ServeConfig:
    """Everything `kiln serve` needs; see the module docstring for how it is resolved."""

    repo: Path
    host: str = "0.0.0.0"  # all interfaces, as Triton: the server usually runs in a container
    port: int = 8001  # 0 = pick a free port (tests)
    metrics_port: int | None = 8002  # None disables /metrics; 0 = pick a free port
    # a plaintext listener serving only grpc.health.v1: kubelet gRPC probes cannot speak TLS
    health_port: int | None = None  # None = off (probes use the main port); 0 = pick a free port
    # models and versions
    models: tuple[str, ...] = ()  # load only these (empty: every model in the repository)
    # "latest", "latest:N", "all" or "specific:1,3"; parsed once into .policy
    version_policy: str = str(serving_defaults.VERSION_POLICY)
    poll_interval_s: float = 0.0  # > 0: rescan the repository and hot-swap new versions
    # how a new version of a serving model takes over (serving/grpc/shadow.py; per model too):
    # "immediate" once warm, or "shadow": it first answers a sampled copy of live traffic after
    # the serving version did, and is promoted only if its top-1 agrees and it is fast enough
    promotion: str = "immediate"
    shadow_sample: float = 0.25  # share of computed batches copied (whole) to the candidate
    shadow_min_requests: int = 200  # compared requests before a verdict
    shadow_min_agreement: float = 0.99  # top-1 agreement (rows) the candidate needs
    shadow_max_latency_ratio: float = 2.0  # candidate p99 compute time per batch / the serving one's
    shadow_timeout_s: float = 600.0  # no verdict by then: rejected
    shadow_queue_size: int = 16  # copied batches outstanding at the candidate; more are dropped
    # per-model values of MODEL_SETTINGS, {model: {setting: value}} (see the module docstring)
    model_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    # kiln_predictions_total labels the first N classes by name, the rest "other"; 0: no
    # prediction metrics (serving/grpc/predictions.py)
    prediction_classes: int = DEFAULT_PREDICTION_CLASSES  # kiln score's too
    # rows per version in the sliding window kiln_prediction_drift scores; 0: no drift gauge
    drift_window: int = 1000
    # computed batches' class outputs wait to be counted (serving/grpc/predictions.py): at most this
    # long, and the batch worker counts them at once past this many rows or bytes of scores
    prediction_flush_interval_s: float = 1.0
    prediction_pending_max_rows: int = 16_384
    prediction_pending_max_bytes: int = 8 << 20
    # execution
    device: str = serving_defaults.DEVICE
    backend: str = "auto"
    # backend "null" (serving/runtime/backends/null_backend.py): each batch holds an instance for
    # null_base_us + null_per_row_us * rows and answers zeros; measures the server's own overhead
    null_base_us: int = 0
    null_per_row_us: int = 0
    # artefact precision to load; "auto": on a CPU the fastest artefact that passed the gate, measured
    # at load (serving/runtime/tuning.py); on a GPU the first that fits
    precision: str = "auto"
    # None: with precision auto on a CPU, measured with the precision (1 x cores vs cores x 1);
    # otherwise serving_defaults.INSTANCES
    instances: int | None = None
    intra_op_threads: int | None = None  # per instance; None splits the cores between workers x instances
    # server processes sharing the port (SO_REUSEPORT: the kernel spreads connections, not calls;
    # docs/design.md "Serving on every core"); None: worker_count() picks from the cores
    workers: int | None = None
    # CPU, workers > 1: a worker runs a batch on every core while all the others have idled for a
    # while (one worker holding every connection otherwise computes at its share's speed), at one
    # more session of each model per instance (serving/runtime/backends/core_share.py)
    workers_share_cores: bool = True
    # ORT intra-op threads busy-wait between the ops of a batch (they stop when it returns): a lone
    # small request is faster, but under load they take the cores that the gRPC event loop needs
    # (benchmarks/RESULTS-serving.md: ResNet-20 on 2 cores, c1 +14 %, c16 -2 %, c64 -6 %).
    intra_op_spinning: bool = False
    # CPU, ORT sessions of 2+ threads: each pool thread pinned to a core, the thread calling Run
    # moved beside them for the Run; woken after an idle spell, an unpinned pool thread often
    # queued on its caller's core for milliseconds (serving/runtime/backends/cpu_pinning.py)
    pin_ort_threads: bool = True
    # CPU: ORT's CPU sessions of a process (a worker's wide session beside its own, twins) allocate
    # from one memory arena instead of one each, each grown to the largest batch it ran
    # (serving/runtime/backends/ort_arena.py)
    share_ort_arena: bool = True
    # CPU: 1-row batches (what a server without load computes) run on a second, spinning session
    # per instance, so a lone request gets spinning's speed without its cost under load, at twice
    # the model's memory; "auto": where that measured faster at load (small models), "on", "off"
    # (serving/runtime/backends/batch_sessions.py)
    lone_batch_spinning: str = "auto"
    # CPU: batches too small to use the instance's threads well (under 75 % parallel efficiency,
    # measured at load: ResNet-20 on 2 threads up to 8 rows) run on a one-thread session, leaving
    # the other cores to the event loop; "auto" or "off" (serving/runtime/backends/batch_sessions.py)
    single_thread_small_batches: str = "auto"
    # a request alone in the process (no other in flight, none beside another for 0.1 s) is computed
    # on the event loop, without the batcher thread's hand-offs, if its model's recent lone batches
    # took at most this per batch; 0: never (serving/runtime/solo.py)
    lone_request_inline_max_ms: float = 2.0
    # GPU execution: handed to BackendOptions under the same names (BACKEND_FIELDS); what each
    # does on the CUDA path, and why its default, is in docs/gpu.md
    iobinding: bool = True
    pinned_memory: bool = True
    pad_to_buckets: bool = True  # the null backend pads too, so it also acts off the GPU
    cuda_graphs: bool = False
    cuda_prefer_nhwc: bool = False
    cuda_tf32: bool = True
    cudnn_conv_algo_search: str = "HEURISTIC"
    onnx_provider: str = "auto"  # ONNX artefacts on a GPU: "auto"/"cuda" CUDA EP, "tensorrt" TensorRT EP
    trt_engine_cache_dir: Path | None = None
    trt_workspace_bytes: int = 1 << 30
    trt_allow_other_gpu: bool = False
    # How long Python lets one thread hold the GIL while another wants it. The batch workers
    # need it briefly after each inference; at Python's default (5 ms) they waited behind the
    # busy event loop and the model idled (measured: benchmarks/RESULTS-serving.md).
    gil_switch_interval_us: int = 200
    # uvloop's event loop costs less per gRPC event than asyncio's, so more requests are served
    # (measured: benchmarks/RESULTS-serving.md); "auto" uses it where it is installed.
    event_loop: str = "auto"
    warmup: bool = True
    # dynamic batching
    max_batch_size: int | None = None  # None: the manifest's value
    # 0 (Triton's default): a batch leaves as soon as an instance is free, so batches grow only
    # from requests that arrive while the instances are busy, and a lone request never waits.
    # Under 1 ms the wait is rounded up to 1 ms anyway (asyncio's epoll timeout resolution).
    max_queue_delay_us: int = serving_defaults.MAX_QUEUE_DELAY_US
    # set: instead of max_queue_delay_us, each batch waits only as long as its oldest request can
    # still be answered within this many ms at p99 (compute time learnt online; see
    # serving/runtime/latency_target.py); None keeps the fixed delay
    latency_target_ms: float | None = None
    preferred_batch_sizes: tuple[int, ...] = serving_defaults.PREFERRED_BATCH_SIZES
    # under sustained load a batch takes at most half the rows outstanding, so one batch computes
    # while the event loop answers the other (serving/runtime/batcher.py, "Pipelining")
    batch_pipelining: bool = True
    # queued requests (not rows) per model version before RESOURCE_EXHAUSTED
    max_queue_size: int = serving_defaults.MAX_QUEUE_SIZE
    # queued requests one client (one gRPC connection) may hold per model version; None: half of
    # max_queue_size, so one client can never fill the queue alone (batches are filled round-robin
    # across clients too, see serving/runtime/batcher.py)
    max_queue_per_client: int | None = None
    # requests of one ModelStreamInfer/ClassifyStream stream computed or computing whose answers
    # gRPC has not yet taken: a client that stops reading stops its stream's compute at this bound
    stream_max_inflight: int = 64
    # HTTP/2 streams (calls, unary ones included) one connection may have open at once (grpc's own
    # default is unlimited); grpc's Python client fails calls past it with UNAVAILABLE, not queue
    # them, so the default sits far above what one client connection normally opens
    max_concurrent_streams: int = 1024
    # Classify preprocessing
    preprocess_workers: int = 2
    max_image_bytes: int = 16 * _MIB
    max_image_pixels: int = 40_000_000  # decompression-bomb guard (decoded and resized width * height)
    # longer side / shorter side of a Classify image for a model that resizes: the resize keeps
    # the ratio, so a few-KB 1x2,000,000 strip would become gigabytes (serving/runtime/preprocess.py)
    max_image_aspect_ratio: float = 20.0
    # model-input bytes the images of one Classify request become (images x row): 4096 raw 1x1
    # images (a 50 KB message) would otherwise make 2.4 GB of rows for a 224x224 FP32 model
    max_preprocessed_bytes: int = 256 * _MIB
    max_images_per_request: int = 4096  # per Classify request (bulk jobs: ClassifyStream, kiln score)
    default_top_k: int = 5
    # transport
    max_receive_message_bytes: int = 64 * _MIB
    max_send_message_bytes: int = 64 * _MIB
    # GOAWAY after this long: long-lived clients re-resolve and rebalance; calls in flight (streams
    # too) finish on the old connection (grpc/server.py grpc_options). None: WORKERS_CONNECTION_AGE_S
    # with workers > 1, else never; 0: never
    max_connection_age_s: float | None = None
    # SIGTERM drain budget (below Kubernetes' default 30 s): the process is gone within it
    grace_period_s: float = 20.0
    reflection: bool = True
    # RepositoryModelLoad/Unload. Off by default (Triton's default model-control mode "none"):
    # they answer UNIMPLEMENTED, since anyone who reaches the port could unload every model; turn
    # it on with admin_token_file where operators load and unload (SECURITY.md)
    repository_control: bool = False
    # security
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # set: clients must present a certificate signed by it (mTLS)
    auth_token_file: Path | None = None
    auth_token: str | None = field(default=None, repr=False)
    # set: RepositoryModelLoad/Unload also need metadata `x-kiln-admin-token: <token>`
    admin_token_file: Path | None = None
    admin_token: str | None = field(default=None, repr=False)
    # logging
    log_format: str = "text"
    log_level: str = "info"

    def __post_init__(self) -> None:
        _validate(self)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of the resolved values, secrets redacted."""
        result: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "max_queue_per_client":
                value = self.queue_per_client()  # the effective value, default resolved
            elif f.name == "workers":
                value = self.worker_count()
            elif f.name == "max_connection_age_s":
                value = self.connection_age_s() or 0  # 0: never (as a config file reads it back)
            elif f.name in _SECRET_FIELDS and value is not None:
                value = "<redacted>"
            elif isinstance(value, Path):
                value = str(value)
            elif isinstance(value, tuple):
                value = list(value)
            result[f.name] = value
        return result

    def for_model(self, model: str) -> ServeConfig:
        """The settings `model` runs with: these, with its model_overrides applied."""
        return self._model_configs.get(model, self)

    @functools.cached_property
    def _model_configs(self) -> dict[str, ServeConfig]:
        """One validated config per model named in model_overrides (built once, by validation)."""
        resolved = {}
        for model, settings in self.model_overrides.items():
            try:
                resolved[model] = dataclasses.replace(self, model_overrides={}, **settings)
            except ConfigError as exc:
                raise ConfigError(f"model_overrides.{model}.{exc}") from None
        return resolved

    @functools.cached_property
    def policy(self) -> VersionPolicy:
        """version_policy parsed (once, by validation): what the model manager and ModelConfig use."""
        return VersionPolicy.parse(self.version_policy)

    def queue_per_client(self) -> int:
        """max_queue_per_client, or its default: half the queue (at least 1)."""
        if self.max_queue_per_client is not None:
            return self.max_queue_per_client
        return max(1, self.max_queue_size // 2)

    def worker_count(self) -> int:
        """workers, or its default: one per 4 cores (a worker's event loop plus ~3 ONNX Runtime
        threads; on 2 shared cores the gain of a second worker was not clear of the noise,
        benchmarks/RESULTS-serving.md), capped at 8; 1 on a GPU (each worker would hold its own
        copy of every model), with repository_control (a load would reach one worker only) or
        with shadow promotion (each worker would reach its own verdict)."""
        if self.workers is not None:
            return self.workers
        if (
            self.repository_control
            or self.shadow_promotion()
            or self.device != "cpu"
            or self.backend == "tensorrt"
        ):
            return 1
        return max(1, min(8, usable_cores() // 4))

    def connection_age_s(self) -> float | None:
        """max_connection_age_s, or its default: WORKERS_CONNECTION_AGE_S with workers > 1, where
        SO_REUSEPORT pins each connection to the worker the kernel hashed it to (docs/design.md,
        "Serving on every core"); None: never."""
        if self.max_connection_age_s is not None:
            return self.max_connection_age_s or None
        return WORKERS_CONNECTION_AGE_S if self.worker_count() > 1 else None

    def shadow_promotion(self) -> bool:
        """Whether any model is promoted by shadow verdict (server-wide or in model_overrides)."""
        overrides = self.model_overrides if isinstance(self.model_overrides, Mapping) else {}
        return self.promotion == "shadow" or any(
            isinstance(settings, Mapping) and settings.get("promotion") == "shadow"
            for settings in overrides.values()
        )

    def token(self) -> str | None:
        """The bearer token clients must send (from auth_token or auth_token_file), or None."""
        return _secret(self.auth_token, self.auth_token_file)

    def admin_secret(self) -> str | None:
        """The token RepositoryModelLoad/Unload need (from admin_token or admin_token_file), or None."""
        return _secret(self.admin_token, self.admin_token_file)


def _secret(value: str | None, path: Path | None) -> str | None:
    """A token given inline, else read (stripped) from its file, else None."""
    if value is not None:
        return value
    if path is not None:
        return path.read_text(encoding="utf-8").strip()
    return None


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, not the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _fail(name: str, detail: str) -> typing.NoReturn:
    raise ConfigError(f"{name}: {detail}")


def _check_range(cfg: ServeConfig, name: str, low: float, high: float | None = None) -> None:
    value = getattr(cfg, name)
    if value is None:
        return
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        _fail(name, f"must be {bound}, got {value}")


def _validate(cfg: ServeConfig) -> None:
    """Check each value; raise ConfigError naming the first bad one."""
    if not cfg.repo.is_dir():
        _fail("repo", f"not a directory: {cfg.repo}")
    if not cfg.host:
        _fail("host", "must not be empty")
    for name in ("port", "metrics_port", "health_port"):
        _check_range(cfg, name, 0, 65535)
    if cfg.metrics_port and cfg.metrics_port == cfg.port:
        _fail("metrics_port", f"must differ from port ({cfg.port})")
    if cfg.health_port and cfg.health_port in (cfg.port, cfg.metrics_port):
        _fail("health_port", f"must differ from port and metrics_port ({cfg.port}, {cfg.metrics_port})")
    _check_version_policy(cfg)
    if not (cfg.device in ("cpu", "cuda", "auto") or _is_cuda_index(cfg.device)):
        _fail("device", f"expected {DEVICES_HINT}, got {cfg.device!r}")
    for name, choices in (
        ("backend", BACKENDS),
        ("precision", PRECISIONS),
        ("log_format", LOG_FORMATS),
        ("event_loop", EVENT_LOOPS),
        ("lone_batch_spinning", LONE_BATCH_SPINNING),
        ("single_thread_small_batches", SINGLE_THREAD_SMALL_BATCHES),
        ("log_level", LOG_LEVELS),
        ("promotion", PROMOTIONS),
    ):
        if getattr(cfg, name) not in choices:
            _fail(name, f"expected one of {list(choices)}, got {getattr(cfg, name)!r}")
    for name in ("instances", "preprocess_workers", "max_queue_size", "default_top_k", "max_batch_size"):
        _check_range(cfg, name, 1)
    _check_range(cfg, "max_queue_per_client", 1, cfg.max_queue_size)
    _check_range(cfg, "stream_max_inflight", 1, 65536)
    _check_range(cfg, "workers", 1, 256)
    if cfg.worker_count() > 1 and cfg.repository_control:
        _fail(
            "workers",
            "repository_control needs workers: 1 (a RepositoryModelLoad would reach one "
            "worker only); with more, publish into the repository and let poll_interval_s load it",
        )
    _check_range(cfg, "max_concurrent_streams", 1, 2**31 - 1)
    for name in ("max_image_bytes", "max_image_pixels", "max_images_per_request", "intra_op_threads"):
        _check_range(cfg, name, 1)
    for name in ("max_receive_message_bytes", "max_send_message_bytes"):
        _check_range(cfg, name, 1024, 2**31 - 1)
    _check_range(cfg, "max_queue_delay_us", 0, 10_000_000)
    _check_range(cfg, "lone_request_inline_max_ms", 0, 1000)
    _check_shadow(cfg)
    _check_range(cfg, "latency_target_ms", 0.1, 60_000)
    if cfg.worker_count() > 1 and cfg.shadow_promotion():
        # each worker would judge its own connections' share and could decide differently,
        # leaving workers serving different versions of one model
        _fail(
            "workers",
            "promotion: shadow needs workers: 1 (each worker would reach its own verdict on the "
            "candidate, and workers could end up serving different versions); use promotion: "
            "immediate with more workers",
        )
    _check_model_overrides(cfg)
    _check_range(cfg, "max_image_aspect_ratio", 1.0, 1e6)
    _check_range(cfg, "max_preprocessed_bytes", 1024)
    _check_range(cfg, "gil_switch_interval_us", 1, 100_000)
    _check_range(cfg, "null_base_us", 0, 10_000_000)
    _check_range(cfg, "null_per_row_us", 0, 1_000_000)
    if cfg.backend != "null" and (cfg.null_base_us or cfg.null_per_row_us):
        _fail("null_base_us", f"null_base_us/null_per_row_us need backend 'null', not {cfg.backend!r}")
    for name in ("poll_interval_s", "grace_period_s"):
        _check_range(cfg, name, 0.0)
    age = cfg.max_connection_age_s
    if age is not None and (age < 0 or 0 < age < 0.001):
        _fail("max_connection_age_s", f"must be 0 (never) or >= 0.001, got {age}")
    if any(size < 1 for size in cfg.preferred_batch_sizes):
        _fail("preferred_batch_sizes", f"sizes must be >= 1, got {list(cfg.preferred_batch_sizes)}")
    _validate_security(cfg)
    _validate_backend(cfg)


def _validate_backend(cfg: ServeConfig) -> None:
    """BackendOptions' own checks, at start; and no GPU setting silently ignored on a CPU."""
    from serving.runtime.backends.base import BackendOptions  # the one validator of these values

    try:
        BackendOptions(**{name: getattr(cfg, name) for name in BACKEND_FIELDS})
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if cfg.device == "cpu" and cfg.backend != "null":
        defaults = {f.name: f.default for f in dataclasses.fields(ServeConfig)}
        changed = [n for n in BACKEND_FIELDS if n != "pad_to_buckets" and getattr(cfg, n) != defaults[n]]
        if changed:
            _fail(changed[0], "acts on a CUDA device only, and device is 'cpu' (set device: cuda)")
    if cfg.trt_engine_cache_dir is not None and not cfg.trt_engine_cache_dir.is_dir():
        _fail("trt_engine_cache_dir", f"not a directory: {cfg.trt_engine_cache_dir}")


def _validate_security(cfg: ServeConfig) -> None:
    if (cfg.tls_cert is None) != (cfg.tls_key is None):
        _fail("tls_cert", "tls_cert and tls_key must be given together")
    if cfg.tls_client_ca is not None and cfg.tls_cert is None:
        _fail("tls_client_ca", "mTLS needs the server's own tls_cert and tls_key too")
    for name in ("tls_cert", "tls_key", "tls_client_ca", "auth_token_file", "admin_token_file"):
        path = getattr(cfg, name)
        if path is not None and not path.is_file():
            _fail(name, f"file not found: {path}")
    if cfg.auth_token is not None and cfg.auth_token_file is not None:
        _fail("auth_token_file", "give the token either in a file or in KILN_AUTH_TOKEN, not both")
    token = cfg.token()
    if token is not None and len(token) < 8:
        _fail("auth_token", "the bearer token must be at least 8 characters")
    if cfg.admin_token is not None and cfg.admin_token_file is not None:
        _fail("admin_token_file", "give the admin token either in a file or in KILN_ADMIN_TOKEN, not both")
    admin = cfg.admin_secret()
    if admin is not None and len(admin) < 8:
        _fail("admin_token", "the admin token must be at least 8 characters")
    if admin is not None and admin == token:
        _fail("admin_token", "the admin token must differ from the bearer token (or it guards nothing)")


def _is_cuda_index(device: str) -> bool:
    prefix, _, index = device.partition(":")
    return prefix == "cuda" and index.isdigit()


def _check_shadow(cfg: ServeConfig) -> None:
    if not 0 < cfg.shadow_sample <= 1:
        _fail("shadow_sample", f"must be in (0, 1], got {cfg.shadow_sample}")
    _check_range(cfg, "shadow_min_requests", 1, 10_000_000)
    _check_range(cfg, "shadow_min_agreement", 0.0, 1.0)
    _check_range(cfg, "shadow_max_latency_ratio", 0.01, 1000.0)
    _check_range(cfg, "shadow_timeout_s", 0.1, 7 * 86400)
    _check_range(cfg, "shadow_queue_size", 1, 65536)
    _check_range(cfg, "prediction_classes", 0, 1000)
    _check_range(cfg, "drift_window", 0, 1_000_000)
    _check_range(cfg, "prediction_flush_interval_s", 0.01, 60)
    _check_range(cfg, "prediction_pending_max_rows", 1, 10_000_000)
    _check_range(cfg, "prediction_pending_max_bytes", 1024, 1 << 30)


def _check_model_overrides(cfg: ServeConfig) -> None:
    """Each model's overrides name MODEL_SETTINGS only, and give values that validate."""
    if not isinstance(cfg.model_overrides, Mapping):
        _fail("model_overrides", f"expected a mapping of model name to settings, got {cfg.model_overrides!r}")
    for model, settings in cfg.model_overrides.items():
        if not isinstance(settings, Mapping):
            _fail(f"model_overrides.{model}", f"expected a mapping of settings, got {settings!r}")
        for key in settings:
            if key not in MODEL_SETTINGS:
                _fail(
                    f"model_overrides.{model}.{key}",
                    f"not a per-model setting (those are {', '.join(MODEL_SETTINGS)})",
                )
    _ = cfg._model_configs  # each validated now; cached on cfg


def _check_version_policy(cfg: ServeConfig) -> None:
    try:
        _ = cfg.policy  # the contract's one parser; the parsed value stays cached on cfg
    except VersionPolicyError as exc:
        _fail("version_policy", str(exc))


# ---- resolution: defaults <- file <- environment <- flags --------------------------------------


def field_names() -> tuple[str, ...]:
    """Names of every config field (YAML keys; flags and env vars derive from them)."""
    return tuple(f.name for f in dataclasses.fields(ServeConfig))


def load_config(
    *,
    config_file: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> ServeConfig:
    """Resolve a ServeConfig: defaults <- YAML `config_file` <- KILN_* in `env` <- `overrides`.

    `env` defaults to os.environ; `overrides` (from flags) skips None values, so unset flags
    never mask the file or the environment. Raises ConfigError naming source, key and value.
    """
    hints = typing.get_type_hints(ServeConfig)
    values: dict[str, Any] = {}
    if config_file is not None:
        values.update(_from_file(Path(config_file), hints))
    values.update(_from_env(os.environ if env is None else env, hints))
    for key, raw in (overrides or {}).items():
        if raw is not None:
            values[key] = _coerce(raw, hints[_known(key, "flag")], f"--{key.replace('_', '-')}")
    if "repo" not in values:
        raise ConfigError(
            "repo: no model repository given (use --repo DIR, KILN_REPO or 'repo:' in the file)"
        )
    return ServeConfig(**values)


def _known(key: str, source: str) -> str:
    if key in field_names():
        return key
    close = difflib.get_close_matches(key, field_names(), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ConfigError(f"{source}: unknown setting {key!r}{hint}")


def _yaml_mapping(raw: Any, source: str, what: str) -> dict[Any, Any]:
    """A mapping from YAML text (a file's, a variable's or a flag's) or an already parsed value."""
    if isinstance(raw, str):
        import yaml  # only needed when YAML text is given

        try:
            raw = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{source}: invalid YAML ({exc})") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of {what}, got {reprlib.repr(raw)}")
    return raw


def _from_file(path: Path, hints: dict[str, Any]) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"config file {path}: cannot read ({exc.strerror or exc})") from None
    data = _yaml_mapping(text, f"config file {path}", "settings")
    result: dict[str, Any] = {}
    for key, raw in data.items():
        name = _known(str(key).replace("-", "_"), f"config file {path}")
        if name in _SECRET_FIELDS:
            raise ConfigError(
                f"config file {path}: {name} must come from {name}_file or {ENV_PREFIX}{name.upper()}"
            )
        if name == "backend" and raw is None:
            raw = "null"  # YAML reads an unquoted `backend: null` as None: it means the timing backend
        value = _coerce(raw, hints[name], f"{path}: {name}")
        if isinstance(value, Path) and not value.is_absolute():
            value = path.parent / value  # relative paths in the file are relative to the file
        result[name] = value
    return result


def _from_env(env: Mapping[str, str], hints: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for name in field_names():
        key = ENV_PREFIX + name.upper()
        if key in env:
            result[name] = _coerce(env[key], hints[name], key)
    return result


def _coerce(raw: Any, hint: Any, source: str) -> Any:
    """Convert a YAML value or a string (env/flag) to the field's type; ConfigError if impossible."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) is dict:
        return _model_overrides(raw, source)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if raw is None or (isinstance(raw, str) and raw.strip().lower() in ("", "none", "null")):
            return None
        return _coerce(raw, next(a for a in args if a is not type(None)), source)
    if typing.get_origin(hint) is tuple:
        items = raw.split(",") if isinstance(raw, str) else raw
        if not isinstance(items, list | tuple):
            raise ConfigError(f"{source}: expected a list, got {raw!r}")
        items = [item.strip() if isinstance(item, str) else item for item in items]
        return tuple(_coerce(item, args[0], source) for item in items if item != "")
    try:
        return _scalar(raw, hint)
    except (TypeError, ValueError):
        kind = {int: "an integer", float: "a number", bool: "true/false"}.get(hint, hint.__name__)
        raise ConfigError(f"{source}: expected {kind}, got {raw!r}") from None


def _model_overrides(raw: Any, source: str) -> dict[str, dict[str, Any]]:
    """model_overrides from YAML, or from YAML/JSON text (environment, flag), values coerced."""
    raw = _yaml_mapping(raw, source, "model name to settings")
    hints = typing.get_type_hints(ServeConfig)
    result: dict[str, dict[str, Any]] = {}
    for model, settings in raw.items():
        if not isinstance(settings, dict):
            raise ConfigError(f"{source}: {model}: expected a mapping of settings, got {settings!r}")
        result[str(model)] = {
            # an unknown name stays as given: validation names it with the settings that exist
            name: _coerce(value, hints[name], f"{source}: {model}.{name}")
            if name in MODEL_SETTINGS
            else value
            for name, value in ((str(k).replace("-", "_"), v) for k, v in settings.items())
        }
    return result


def _scalar(raw: Any, hint: type) -> Any:
    if hint is bool:
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ValueError(raw)
    if hint is int:
        if isinstance(raw, bool | float):
            raise ValueError(raw)
        return int(str(raw).strip().replace("_", ""))
    if hint is float:
        if isinstance(raw, bool) or not math.isfinite(float(raw)):
            raise ValueError(raw)
        return float(raw)
    if hint is Path:
        if not isinstance(raw, str | os.PathLike) or not str(raw):
            raise ValueError(raw)
        return Path(raw).expanduser()
    if hint is str:
        if not isinstance(raw, str):
            raise ValueError(raw)
        return raw.strip()
    raise TypeError(hint)
