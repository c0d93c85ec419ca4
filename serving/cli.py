"""`kiln serve`: serve a model repository over gRPC (KServe v2 + Classify + health + reflection).

Every flag mirrors a ServeConfig field and is also settable in the YAML file (`--config`) and as
KILN_<FIELD> in the environment; flags win over the environment, which wins over the file. A bad
value exits with status 2 and one line naming it.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable
from typing import Any

from serving.grpc.config import (
    BACKENDS,
    EVENT_LOOPS,
    LOG_FORMATS,
    LOG_LEVELS,
    PRECISIONS,
    ConfigError,
    ServeConfig,
    load_config,
)

# (flag, type, help) for every overridable field; the dest is the field name.
_FLAGS: tuple[tuple[str, Any, str], ...] = (
    ("--repo", str, "model repository folder (required here, in the file or as KILN_REPO)"),
    ("--host", str, "address to bind (default 0.0.0.0)"),
    ("--port", int, "gRPC port (default 8001; 0 picks a free one)"),
    ("--metrics-port", int, "Prometheus /metrics port (default 8002; 0 picks a free one)"),
    ("--health-port", int, "plaintext grpc.health.v1 port for kubelet probes under TLS (default off)"),
    ("--device", str, "cpu, cuda, cuda:N or auto (default cpu)"),
    ("--backend", str, f"artefact backend: {', '.join(BACKENDS)} (default auto)"),
    ("--precision", str, f"artefact precision: {', '.join(PRECISIONS)} (default auto)"),
    ("--null-base-us", int, "backend null: device time per batch in microseconds (default 0)"),
    ("--null-per-row-us", int, "backend null: device time per (padded) row in microseconds (default 0)"),
    ("--instances", int, "model instances per version (default: measured with precision auto, else 1)"),
    ("--intra-op-threads", int, "threads per instance (default: the cores split between all instances)"),
    ("--workers", int, "server processes sharing the port (default: 1 per 4 cores, 1 on a GPU)"),
    ("--cudnn-conv-algo-search", str, "CUDA: HEURISTIC, EXHAUSTIVE or DEFAULT (default HEURISTIC)"),
    ("--onnx-provider", str, "ONNX on a GPU: auto, cuda or tensorrt (the TensorRT EP; default auto)"),
    ("--trt-engine-cache-dir", str, "TensorRT EP: folder that keeps built engines across restarts"),
    ("--trt-workspace-bytes", int, "TensorRT EP: scratch memory for its tactics (default 1 GiB)"),
    (
        "--lone-batch-spinning",
        str,
        "CPU: 1-row batches on a second, spinning session: auto (where faster at load), on or off",
    ),
    (
        "--single-thread-small-batches",
        str,
        "CPU: batches too small for the threads on a one-thread session: auto (measured at load) or off",
    ),
    (
        "--lone-request-inline-max-ms",
        float,
        "a request alone in the server is computed on the event loop if this short (default 2; 0: never)",
    ),
    ("--event-loop", str, f"{', '.join(EVENT_LOOPS)} (default auto: uvloop where installed)"),
    ("--gil-switch-interval-us", int, "Python's GIL switch interval in microseconds (default 200)"),
    ("--max-batch-size", int, "cap on the batch the batcher forms (default: the manifest's)"),
    ("--max-queue-delay-us", int, "longest wait for a fuller batch, in microseconds (default 0: none)"),
    ("--latency-target-ms", float, "p99 queue wait + compute target; replaces the fixed delay (default off)"),
    ("--preferred-batch-sizes", str, "comma-separated batch sizes to prefer, e.g. 4,8,16"),
    ("--max-queue-size", int, "queued requests per model before RESOURCE_EXHAUSTED (default 512)"),
    ("--max-queue-per-client", int, "queued requests one connection may hold per model (default: half)"),
    ("--stream-max-inflight", int, "requests of one stream read but not yet answered (default 64)"),
    ("--max-concurrent-streams", int, "calls one connection may have open at once (default 1024)"),
    ("--version-policy", str, "latest, latest:N, all or specific:V1,V2 (default latest)"),
    ("--poll-interval-s", float, "rescan the repository every N seconds and hot-swap versions (0 = off)"),
    ("--promotion", str, "how a new version takes over: immediate or shadow (default immediate)"),
    ("--shadow-sample", float, "shadow: share of batches copied (whole) to the candidate (default 0.25)"),
    ("--shadow-min-requests", int, "shadow: compared requests before a verdict (default 200)"),
    ("--shadow-min-agreement", float, "shadow: top-1 agreement needed to promote (default 0.99)"),
    ("--shadow-max-latency-ratio", float, "shadow: most candidate/serving p99 compute time (default 2)"),
    ("--shadow-timeout-s", float, "shadow: reject a candidate with no verdict after N s (default 600)"),
    ("--shadow-queue-size", int, "shadow: copied batches outstanding at the candidate (default 16)"),
    ("--model-overrides", str, "YAML {model: {promotion/shadow_*/latency_target_ms: value}}"),
    ("--prediction-classes", int, "classes named in kiln_predictions_total, the rest 'other' (default 20)"),
    ("--drift-window", int, "rows per version kiln_prediction_drift is scored over; 0 = off (default 1000)"),
    (
        "--prediction-flush-interval-s",
        float,
        "longest a served batch waits to be counted in the metrics (default 1)",
    ),
    (
        "--prediction-pending-max-rows",
        int,
        "rows waiting to be counted before the batch worker counts them (16384)",
    ),
    (
        "--prediction-pending-max-bytes",
        int,
        "class-score bytes waiting to be counted, the same (default 8 MiB)",
    ),
    ("--grace-period-s", float, "SIGTERM drain budget in seconds (default 20)"),
    ("--max-connection-age-s", float, "GOAWAY a connection after N s (30 with workers > 1, else 0: never)"),
    ("--max-receive-message-bytes", int, "largest accepted request message (default 64 MiB)"),
    ("--max-send-message-bytes", int, "largest response message (default 64 MiB)"),
    ("--max-image-bytes", int, "largest encoded image for Classify (default 16 MiB)"),
    ("--max-image-pixels", int, "largest decoded or resized image, width x height (default 40 M)"),
    ("--max-image-aspect-ratio", float, "most elongated image a resizing model takes (default 20)"),
    ("--max-preprocessed-bytes", int, "model-input bytes of one Classify request's images (default 256 MiB)"),
    ("--max-images-per-request", int, "most images in one Classify request (default 4096)"),
    ("--preprocess-workers", int, "threads decoding Classify images (default 2)"),
    ("--default-top-k", int, "classes per image when a Classify request gives none (default 5)"),
    ("--tls-cert", str, "server certificate (PEM); enables TLS with --tls-key"),
    ("--tls-key", str, "server private key (PEM)"),
    ("--tls-client-ca", str, "CA (PEM) that client certificates must chain to (mTLS)"),
    ("--auth-token-file", str, "file holding the bearer token clients must send (or KILN_AUTH_TOKEN)"),
    (
        "--admin-token-file",
        str,
        "file holding the token RepositoryModelLoad/Unload need as x-kiln-admin-token (or KILN_ADMIN_TOKEN)",
    ),
    ("--log-format", str, f"{' or '.join(LOG_FORMATS)} (default text)"),
    ("--log-level", str, f"{', '.join(LOG_LEVELS)} (default info)"),
)
_SWITCHES = (
    ("warmup", "warm-up inference on load"),
    ("reflection", "gRPC server reflection"),
    ("repository_control", "the RepositoryModelLoad/Unload RPCs"),
    ("intra_op_spinning", "ONNX Runtime intra-op spinning within a batch (default off)"),
    ("pin_ort_threads", "ONNX Runtime: a core per intra-op thread, the caller beside them (default on)"),
    ("share_ort_arena", "ONNX Runtime: one CPU memory arena for the process's sessions (default on)"),
    ("workers_share_cores", "workers > 1: a batch on every core while the other workers idle (default on)"),
    ("batch_pipelining", "under load, batches of half the outstanding rows, two in flight (default on)"),
    ("iobinding", "CUDA: IOBinding (default on)"),
    ("pinned_memory", "CUDA: page-locked staging buffers for host copies (default on)"),
    ("pad_to_buckets", "GPU and null backend: batches padded to power-of-two buckets (default on)"),
    ("cuda_graphs", "CUDA: one CUDA graph per batch bucket (default off)"),
    ("cuda_prefer_nhwc", "CUDA: NHWC convolution kernels (default off)"),
    ("cuda_tf32", "CUDA: TF32 tensor cores for FP32 convolutions (default on)"),
    ("trt_allow_other_gpu", "TensorRT: plans built on another GPU model of the same compute capability"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the `kiln serve` flags (all default to None: unset flags never override)."""
    parser.add_argument("--config", metavar="FILE", help="YAML file of settings (field names as keys)")
    parser.add_argument("--models", nargs="+", metavar="NAME", help="serve only these models")
    for flag, kind, text in _FLAGS:
        parser.add_argument(flag, type=kind, default=None, help=text)
    for name, text in _SWITCHES:
        flag = name.replace("_", "-")
        parser.add_argument(f"--{flag}", dest=name, action="store_true", default=None, help=f"enable {text}")
        parser.add_argument(f"--no-{flag}", dest=name, action="store_false", help=f"disable {text}")
    parser.add_argument("--no-metrics", action="store_true", help="do not serve /metrics")
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved config as JSON and exit"
    )


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    names = [flag[2:].replace("-", "_") for flag, _, _ in _FLAGS] + [name for name, _ in _SWITCHES]
    values = {name: getattr(args, name) for name in names}
    values["models"] = tuple(args.models) if args.models else None
    if args.no_metrics:
        values["metrics_port"] = "none"
    return values


def loop_factory(config: ServeConfig) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop factory when asked for (or "auto" and installed); None = asyncio's own."""
    if config.event_loop == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if config.event_loop == "uvloop":
            raise ConfigError("event_loop: uvloop is not installed (pip install uvloop)") from None
        return None
    return uvloop.new_event_loop


def run(args: argparse.Namespace) -> int:
    """Resolve and validate the config, then serve until SIGTERM/SIGINT. Returns the exit code."""
    try:
        config = load_config(config_file=args.config, overrides=_overrides(args))
        factory = loop_factory(config)
    except ConfigError as exc:
        print(f"kiln serve: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        import json

        print(json.dumps(config.to_dict(), indent=2))
        return 0
    from serving.grpc.request_log import configure_logging
    from serving.grpc.server import Server

    configure_logging(config.log_format, config.log_level)
    if config.worker_count() > 1:
        from serving.grpc.workers import Supervisor

        return Supervisor(config, factory).run()
    try:
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(Server(config).serve())
    except OSError as exc:  # e.g. the port is taken
        logging.getLogger("kiln.server").error("cannot serve: %s", exc)
        return 1
    return 0
