"""Native TensorRT backend: a deserialised engine, one execution context + CUDA stream per instance.

`tensorrt` and `cuda-python` are imported only when a plan is loaded. Before deserialising, the
GPU / compute capability / TensorRT version the plan was built for (recorded in kiln.json) are
compared with the running ones (`plan_incompatibility`, pure and unit-tested): TensorRT plans are
not portable, and a mismatch would otherwise fail obscurely or run slowly.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from serving.contract.manifest_types import TensorRTInfo
from serving.errors import ModelLoadError
from serving.runtime.backends.base import BackendOptions, TensorSpec, datatype_of
from serving.runtime.backends.pool import PooledBackend

__all__ = ["RuntimeTarget", "TensorRTBackend", "check_plan_compatible", "plan_incompatibility"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class RuntimeTarget:
    """What is running here: TensorRT version, GPU name, compute capability ("major.minor")."""

    trt_version: str
    gpu_name: str
    compute_capability: str


def _version_key(version: str) -> tuple[int, ...]:
    """major.minor.patch as ints ("10.7.0.23" -> (10, 7, 0)); the build number does not matter."""
    return tuple(int(p) for p in re.findall(r"\d+", version)[:3])


def plan_incompatibility(
    recorded: TensorRTInfo, running: RuntimeTarget, *, allow_other_gpu: bool = False
) -> str | None:
    """Why a plan built for `recorded` cannot run on `running`, or None when it can."""
    reasons = []
    if _version_key(recorded.version) != _version_key(running.trt_version):
        reasons.append(
            f"built with TensorRT {recorded.version}, this server has TensorRT {running.trt_version}"
        )
    if recorded.compute_capability != running.compute_capability:
        reasons.append(
            f"built for compute capability {recorded.compute_capability}, "
            f"this GPU has {running.compute_capability}"
        )
    if not allow_other_gpu and recorded.gpu_name != running.gpu_name:
        reasons.append(f"built on {recorded.gpu_name!r}, this GPU is {running.gpu_name!r}")
    return "; ".join(reasons) or None


def check_plan_compatible(
    path: str | Path, recorded: TensorRTInfo, running: RuntimeTarget, *, allow_other_gpu: bool = False
) -> None:
    """Raise ModelLoadError naming every mismatch (and the remedy) when the plan cannot run here."""
    reason = plan_incompatibility(recorded, running, allow_other_gpu=allow_other_gpu)
    if reason:
        raise ModelLoadError(f"TensorRT plan {path} cannot run here: {reason}; rebuild it on this machine")


def _import_tensorrt() -> ModuleType:
    try:
        import tensorrt
    except ImportError as exc:
        raise ModelLoadError(
            "the tensorrt Python package is not installed; cannot load a TensorRT plan"
        ) from exc
    return tensorrt


class TensorRTBackend(PooledBackend):
    """A TensorRT plan file; `infer` is thread-safe with up to `instances` calls at once.

    max_batch_size is the smaller of the manifest's limit and the engine profile's maximum.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        max_batch_size: int,
        recorded: TensorRTInfo,
        options: BackendOptions | None = None,
    ) -> None:
        from serving.runtime.backends.cuda_rt import CudaRuntime

        options = options or BackendOptions()
        trt = _import_tensorrt()
        if options.device_id is None:
            raise ModelLoadError(f"a TensorRT plan needs a CUDA device, options.device is {options.device!r}")
        try:
            self._cuda = CudaRuntime()
        except ModuleNotFoundError as exc:
            raise ModelLoadError(str(exc)) from exc
        self._cuda.set_device(options.device_id)
        name, cc = self._cuda.device_info(options.device_id)
        running = RuntimeTarget(trt_version=trt.__version__, gpu_name=name, compute_capability=cc)
        check_plan_compatible(path, recorded, running, allow_other_gpu=options.trt_allow_other_gpu)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(Path(path).read_bytes())
        if self._engine is None:
            raise ModelLoadError(f"TensorRT could not deserialise {path} (see the TensorRT log above)")
        self.inputs, self.outputs = _engine_specs(trt, self._engine)
        profile_max = self._engine.get_tensor_profile_shape(self.inputs[0].name, 0)[2][0]
        self.max_batch_size = min(max_batch_size, int(profile_max))
        self._pool_runners(
            [self._instance(i, options.device_id) for i in range(options.instances)], "TensorRT"
        )

    def _instance(self, index: int, device_id: int) -> _Instance:
        profiles = self._engine.num_optimization_profiles
        return _Instance(
            self._engine,
            self._cuda,
            self.inputs,
            self.outputs,
            self.max_batch_size,
            profile=index % profiles,
            device_id=device_id,
        )

    def close(self) -> None:
        """Wait for running calls (bounded), then free buffers, streams, contexts and the engine."""
        if self._pool.close():
            self._engine = None


def _engine_specs(trt: Any, engine: Any) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    inputs, outputs = [], []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
        shape = tuple(int(d) for d in engine.get_tensor_shape(name))
        if -1 in shape[1:]:
            raise ModelLoadError(f"tensor {name!r} has dynamic non-batch dims {list(shape)}; not supported")
        spec = TensorSpec(name, datatype_of(dtype), (-1, *shape[1:]))
        (inputs if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else outputs).append(spec)
    if not inputs or not outputs:
        raise ModelLoadError("the engine has no inputs or no outputs")
    return tuple(inputs), tuple(outputs)


class _Instance:
    """One execution context with its stream, device buffers and pinned host buffers (max batch)."""

    def __init__(
        self,
        engine: Any,
        cuda: Any,
        inputs: Sequence[TensorSpec],
        outputs: Sequence[TensorSpec],
        max_batch: int,
        *,
        profile: int,
        device_id: int,
    ) -> None:
        from serving.runtime.backends.cuda_rt import PinnedBuffer

        self.cuda, self.inputs, self.outputs = cuda, tuple(inputs), tuple(outputs)
        self.device_id = device_id
        cuda.set_device(device_id)
        self.context = engine.create_execution_context()
        self.stream = cuda.stream_create()
        if profile:
            self.context.set_optimization_profile_async(profile, int(self.stream))
        self.host = {
            s.name: PinnedBuffer(cuda, (max_batch, *s.shape[1:]), s.dtype) for s in (*inputs, *outputs)
        }
        self.device = {name: cuda.malloc(buf.nbytes) for name, buf in self.host.items()}
        for name, ptr in self.device.items():
            self.context.set_tensor_address(name, ptr)

    def run(self, inputs: Mapping[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
        self.cuda.set_device(self.device_id)  # the current device is per thread; workers start on 0
        for spec in self.inputs:
            staged = self.host[spec.name].rows(rows)
            np.copyto(staged, inputs[spec.name])
            self.context.set_input_shape(spec.name, (rows, *spec.shape[1:]))
            self.cuda.copy_htod_async(self.device[spec.name], staged.ctypes.data, staged.nbytes, self.stream)
        if not self.context.execute_async_v3(int(self.stream)):
            raise RuntimeError("execute_async_v3 returned False (see the TensorRT log)")
        for spec in self.outputs:
            out = self.host[spec.name].rows(rows)
            self.cuda.copy_dtoh_async(out.ctypes.data, self.device[spec.name], out.nbytes, self.stream)
        self.cuda.stream_sync(self.stream)
        return {s.name: self.host[s.name].rows(rows).copy() for s in self.outputs}

    def close(self) -> None:
        for ptr in self.device.values():
            self.cuda.free(ptr)
        for buf in self.host.values():
            buf.free()
        self.cuda.stream_destroy(self.stream)
        self.device, self.host, self.context = {}, {}, None
