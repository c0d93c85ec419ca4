"""ONNX Runtime backend: CPU EP, CUDA EP (IOBinding, pinned staging, CUDA graphs), TensorRT EP.

One InferenceSession per instance, each with its own intra-op thread pool (on CPU the cores are
split between instances) or its own CUDA stream; `infer` checks a free instance out of a queue, so
up to `instances` calls run in parallel from the batcher's worker threads. docs/gpu.md walks the
CUDA path and says why each provider option below is set as it is.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from serving.errors import ModelLoadError
from serving.runtime.backends import core_share
from serving.runtime.backends.base import BackendOptions, TensorSpec
from serving.runtime.backends.batch_sessions import SizedRunner, sized_runners
from serving.runtime.backends.core_share import SharedCoresRunner
from serving.runtime.backends.cpu_pinning import CoreBlock, core_blocks, process_cpus
from serving.runtime.backends.ort_arena import use_shared_arena
from serving.runtime.backends.ort_runners import BindingRunner, CudaGraphRunner, SessionRunner
from serving.runtime.backends.pool import PooledBackend

__all__ = ["ORT_DATATYPES", "OnnxRuntimeBackend", "cuda_ep_options", "session_specs"]

log = logging.getLogger(__name__)

ORT_DATATYPES = {
    "tensor(float)": "FP32",
    "tensor(float16)": "FP16",
    "tensor(double)": "FP64",
    "tensor(bfloat16)": "BF16",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(bool)": "BOOL",
}
_PROVIDER_NAMES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


def session_specs(session: Any) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """Input and output specs of an ORT session (symbolic dims become -1)."""

    def spec(arg: Any) -> TensorSpec:
        if arg.type not in ORT_DATATYPES:
            raise ModelLoadError(f"tensor {arg.name!r} has unsupported type {arg.type}")
        shape = tuple(d if isinstance(d, int) and d > 0 else -1 for d in arg.shape)
        return TensorSpec(arg.name, ORT_DATATYPES[arg.type], shape)

    return tuple(map(spec, session.get_inputs())), tuple(map(spec, session.get_outputs()))


class OnnxRuntimeBackend(PooledBackend):
    """An ONNX file run by ONNX Runtime; see the module docstring.

    `precision` is the artefact's (kiln.json): the TensorRT EP may use FP16 or INT8 kernels only
    for the artefact whose numerics the export gate proved at that precision.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        max_batch_size: int,
        options: BackendOptions | None = None,
        precision: str = "fp32",
    ) -> None:
        import onnxruntime as ort  # imported here: keeps `import serving.runtime.backends` cheap

        self._options = options or BackendOptions()
        self.max_batch_size, self._precision = max_batch_size, precision
        kind = _provider_kind(self._options)
        available = ort.get_available_providers()
        if _PROVIDER_NAMES[kind] not in available:
            raise ModelLoadError(
                f"{_PROVIDER_NAMES[kind]} is not available in this onnxruntime (has {available})"
            )
        # one worker of several sharing the cores: its core table (ModelHandle.open loads one worker
        # at a time, see core_share)
        self._table = core_share.current() if self._options.share_cores else None
        blocks = [self._block(kind, None, i) for i in range(self._options.instances)]
        if any(blocks):
            log.info("%s: ONNX Runtime threads pinned, per instance (caller, pool): %s", path,
                     [(b.caller, list(b.pool)) for b in blocks if b is not None])  # fmt: skip
        self.core_blocks = tuple(blocks)  # where each instance's usual session runs (None: unpinned)
        sessions = [self._session(ort, Path(path), kind, block=b) for b in blocks]
        self.inputs, self.outputs = session_specs(sessions[0])
        self._provider = kind
        runners = self._runners(ort, Path(path), sessions, blocks, kind)
        # instances with extra sessions for some batch sizes (serving/runtime/backends/batch_sessions.py)
        # instances of a worker sharing the cores with others (serving/runtime/backends/core_share.py)
        self.shared_runners = tuple(r for r in runners if isinstance(r, SharedCoresRunner))
        inner = [r.own if isinstance(r, SharedCoresRunner) else r for r in runners]
        self.sized_runners = tuple(r for r in inner if isinstance(r, SizedRunner))
        self._pool_runners(runners, engine="onnxruntime")

    def _block(self, kind: str, threads: int | None, instance: int) -> CoreBlock | None:
        """The cores of `instance`'s session of `threads` threads (None: the instance's usual
        count) where `pin_threads` applies: CPU sessions of 2+ threads whose blocks make exactly the
        process's CPUs (cpu_pinning.core_blocks)."""
        opts = self._options
        if kind != "cpu" or not opts.pin_threads:
            return None
        threads = threads or opts.threads_per_instance
        table = self._table
        # one worker of several sharing the cores starts on its own share (core_share); its own
        # sessions split the CPUs with the other workers, its wide ones (more threads) take them all
        first = 0 if table is None else table.slot * opts.instances * opts.threads_per_instance
        workers = table.slots if table is not None and threads == opts.threads_per_instance else 1
        blocks = core_blocks(process_cpus(), threads, opts.instances, first=first, workers=workers)
        return None if blocks is None else blocks[instance]

    def _session(
        self,
        ort: Any,
        path: Path,
        kind: str,
        *,
        spinning: bool | None = None,
        threads: int | None = None,
        block: CoreBlock | None = None,
    ) -> Any:
        opts = self._options
        spin = "1" if (opts.allow_spinning if spinning is None else spinning) else "0"
        so = ort.SessionOptions()
        so.intra_op_num_threads = (threads or opts.threads_per_instance) if kind == "cpu" else 1
        if block is not None:  # one core per pool thread (cpu_pinning)
            so.add_session_config_entry("session.intra_op_thread_affinities", block.ort_affinities)
        # Sequential: one batch is one chain of convs; inter-op threads would only add wake-ups.
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3  # errors only: ORT's warnings are noise in server logs
        so.add_session_config_entry("session.intra_op.allow_spinning", spin)
        so.add_session_config_entry("session.inter_op.allow_spinning", spin)
        # With spinning on, stop it when a Run returns: the pool spins between the ops of a batch
        # (ResNet-20 batch 1: 0.84 ms spinning off, 0.54 ms on) without burning the cores between
        # batches (~31 ms of CPU after each Run otherwise), where the event loop and gRPC need them
        # (benchmarks/ort_spinning.py, RESULTS-serving.md)
        so.add_session_config_entry("session.force_spinning_stop", "1")
        if kind == "cpu" and opts.share_arena:  # one arena for the process's CPU sessions (ort_arena)
            use_shared_arena(ort, so)
        try:
            session = ort.InferenceSession(str(path), sess_options=so, providers=self._providers(kind, path))
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph/NoSuchFile types
            raise ModelLoadError(f"onnxruntime cannot load {path}: {exc}") from exc
        if _PROVIDER_NAMES[kind] not in session.get_providers():
            raise ModelLoadError(
                f"{path}: onnxruntime fell back to {session.get_providers()} (wanted {kind})"
            )
        return session

    def _providers(self, kind: str, path: Path) -> list[Any]:
        opts = self._options
        if kind == "cpu":
            return ["CPUExecutionProvider"]
        cuda = cuda_ep_options(opts)
        providers: list[Any] = [("CUDAExecutionProvider", cuda), "CPUExecutionProvider"]
        if kind == "tensorrt":
            providers.insert(0, ("TensorrtExecutionProvider", self._trt_options(path)))
        return providers

    def _trt_options(self, path: Path) -> dict[str, Any]:
        import onnxruntime as ort

        opts = self._options
        # A throw-away CPU session reads the input shapes (onnx itself is not a serving dependency).
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        probe = ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
        dims = {i.name: i.shape[1:] for i in probe.get_inputs()}

        def profile(batch: int) -> str:
            return ",".join(f"{n}:{'x'.join(map(str, [batch, *d]))}" for n, d in dims.items())

        trt: dict[str, Any] = {
            "device_id": opts.device_id or 0,
            "trt_fp16_enable": self._precision == "fp16",
            "trt_int8_enable": self._precision == "int8",  # the artefact's QDQ scales, no calibration
            "trt_max_workspace_size": opts.trt_workspace_bytes,
            "trt_profile_min_shapes": profile(1),
            "trt_profile_opt_shapes": profile(self.max_batch_size),
            "trt_profile_max_shapes": profile(self.max_batch_size),
        }
        if opts.trt_engine_cache_dir:
            cache = str(opts.trt_engine_cache_dir)
            trt |= {"trt_engine_cache_enable": True, "trt_engine_cache_path": cache}
            trt |= {"trt_timing_cache_enable": True, "trt_timing_cache_path": cache}
        return trt

    def _runners(
        self, ort: Any, path: Path, sessions: list[Any], blocks: list[CoreBlock | None], kind: str
    ) -> list[Any]:
        opts = self._options
        if kind != "cpu" and opts.iobinding:
            runner = CudaGraphRunner if opts.cuda_graphs else BindingRunner
            return [runner(s, self.inputs, self.outputs, self.max_batch_size, opts) for s in sessions]
        plain = [SessionRunner(s, caller_cpu=_caller(b)) for s, b in zip(sessions, blocks, strict=True)]
        if kind != "cpu":
            return plain

        def make(spinning: bool, threads: int, instance: int) -> SessionRunner:
            block = self._block(kind, threads, instance)
            session = self._session(ort, path, kind, spinning=spinning, threads=threads, block=block)
            return SessionRunner(session, caller_cpu=_caller(block))

        def sized(runners: list[SessionRunner], threads: int) -> list[Any]:
            return sized_runners(
                runners, make, self.inputs, lone=opts.lone_batch_spinning,
                single=opts.single_thread_small_batches, spinning=opts.allow_spinning,
                threads=threads, max_batch=self.max_batch_size, name=str(path),
            )  # fmt: skip

        own = sized(plain, opts.threads_per_instance)
        # one worker of several: the others' cores when they idle
        table = self._table
        if table is None:
            return own
        wide_threads = max(1, table.cores // len(plain))  # every core, split between the instances
        if wide_threads <= opts.threads_per_instance:
            return [SharedCoresRunner(r, None, table) for r in own]
        # on every core, the sessions a one-worker server would have (small batches still on one
        # thread while the loop has work, a spinning twin for lone rows, where measured worth it)
        wide = sized([make(opts.allow_spinning, wide_threads, i) for i in range(len(plain))], wide_threads)
        return [SharedCoresRunner(r, w, table) for r, w in zip(own, wide, strict=True)]

    @property
    def provider(self) -> str:
        """ "cpu" | "cuda" | "tensorrt"."""
        return self._provider


def _caller(block: CoreBlock | None) -> int | None:
    return None if block is None else block.caller


def cuda_ep_options(options: BackendOptions) -> dict[str, Any]:
    """The CUDA EP's provider options for `options` (docs/gpu.md says why each is set)."""
    return {
        "device_id": options.device_id or 0,
        "cudnn_conv_algo_search": options.cudnn_conv_algo_search,
        "enable_cuda_graph": int(options.cuda_graphs),
        "use_tf32": int(options.cuda_tf32),
        "prefer_nhwc": int(options.cuda_prefer_nhwc),
        # One stream (and one cuBLAS/cuDNN handle pair) per session, made with the session.
        # Otherwise ORT >= 1.30 makes them per calling thread at its first run: the batcher's
        # workers then ran cold streams in served traffic, since warm-up ran on the loading
        # thread, and two workers x two sessions made four (docs/gpu.md, H3). Safe: the
        # InstancePool never runs one session from two threads at once.
        "use_ep_level_unified_stream": 1,
    }


def _provider_kind(options: BackendOptions) -> str:
    if options.device_id is None:
        if options.onnx_provider != "auto":
            raise ModelLoadError(f"onnx_provider {options.onnx_provider!r} needs a CUDA device, not 'cpu'")
        return "cpu"
    return "cuda" if options.onnx_provider == "auto" else options.onnx_provider
