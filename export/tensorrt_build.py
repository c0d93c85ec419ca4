"""TensorRT engine build and run (Python API; TensorRT 10 and 11). UNVERIFIED on this project's
build machines: TensorRT cannot be installed there, so this is written against the documented
API and its tests skip when ``tensorrt`` is not importable.

- TensorRT 11 networks are always strongly typed and the FP16/INT8 builder flags are gone: an
  FP16 engine comes from an FP16 ONNX graph, an INT8 engine from a QDQ graph with symmetric
  activations (:func:`export.int8.int8_settings` with ``target="tensorrt"``). On TensorRT 10 the
  network is created STRONGLY_TYPED for the same behaviour.
- TF32 is stated explicitly (off by default, so an FP32 engine computes in FP32).
- One optimisation profile over the batch dim (min 1, opt, max); a persistent timing cache file
  shortens rebuilds; the TensorRT version, GPU name and compute capability go in the manifest
  (engines are not portable across GPUs or TensorRT versions).
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from serving.contract.manifest import TensorRTInfo

__all__ = ["TensorRTError", "build_engine", "gpu_identity", "plan_runner", "tensorrt_missing"]


class TensorRTError(RuntimeError):
    """TensorRT is missing, or the ONNX graph did not parse/build."""


def tensorrt_missing() -> str | None:
    """None when `tensorrt` imports, else the reason (for skips and CLI messages)."""
    try:
        import tensorrt  # noqa: F401
    except ImportError as exc:
        return f"TensorRT Python package not importable ({exc}); engine build skipped"
    return None


def _trt() -> Any:
    reason = tensorrt_missing()
    if reason:
        raise TensorRTError(reason)
    import tensorrt

    return tensorrt


def gpu_identity(device: int = 0) -> tuple[str, str]:
    """(GPU name, 'major.minor' compute capability), via torch.cuda or else nvidia-smi."""
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(device)
            return torch.cuda.get_device_name(device), f"{major}.{minor}"
    except ImportError:
        pass
    query = ["nvidia-smi", f"--id={device}", "--query-gpu=name,compute_cap", "--format=csv,noheader"]
    try:
        out = subprocess.run(query, capture_output=True, text=True, check=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise TensorRTError(
            f"cannot identify the GPU (torch.cuda unavailable, nvidia-smi failed: {exc})"
        ) from exc
    name, _, capability = out.strip().rpartition(",")
    return name.strip(), capability.strip()


def _network(trt: Any, builder: Any, onnx_path: Path, logger: Any) -> tuple[Any, Any]:
    """Parse the ONNX file into a strongly typed network; errors name the parser's messages."""
    major = int(trt.__version__.split(".")[0])
    flags = 0
    if major < 11:  # 11 is always strongly typed (the flag is ignored/deprecated there)
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise TensorRTError(f"TensorRT could not parse {onnx_path}: {errors}")
    return network, parser


def _add_batch_profile(
    builder: Any, config: Any, network: Any, input_name: str, batches: tuple[int, int, int]
) -> None:
    """One optimisation profile: the batch dim ranges over (min, opt, max); other dims fixed."""
    shape = tuple(network.get_input(0).shape)[1:]
    profile = builder.create_optimization_profile()
    low, opt, high = ((b, *shape) for b in batches)
    profile.set_shape(input_name, low, opt, high)
    config.add_optimization_profile(profile)


def build_engine(
    onnx_path: str | Path,
    plan_path: str | Path,
    *,
    max_batch: int,
    opt_batch: int | None = None,
    timing_cache: str | Path | None = None,
    tf32: bool = False,
    workspace_bytes: int = 1 << 30,
    input_name: str = "input",
) -> TensorRTInfo:
    """Build and write a serialized engine for `onnx_path` (batch profile 1..max_batch); returns
    kiln.json's record of what it was built for.

    The timing cache file is read if present and rewritten after the build.
    """
    trt = _trt()
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    opt = min(max(1, opt_batch or max_batch), max_batch)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network, _parser = _network(trt, builder, Path(onnx_path), logger)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if tf32:  # stated either way: TF32 is on by default in TensorRT on Ampere+
        config.set_flag(trt.BuilderFlag.TF32)
    else:
        config.clear_flag(trt.BuilderFlag.TF32)
    _add_batch_profile(builder, config, network, input_name, (1, opt, max_batch))
    cache_file = Path(timing_cache) if timing_cache else None
    cache = config.create_timing_cache(
        cache_file.read_bytes() if cache_file and cache_file.is_file() else b""
    )
    config.set_timing_cache(cache, False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise TensorRTError(f"TensorRT failed to build an engine from {onnx_path} (see its log above)")
    Path(plan_path).write_bytes(bytes(serialized))
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        cache_file.write_bytes(bytes(config.get_timing_cache().serialize()))
    name, capability = gpu_identity()
    return TensorRTInfo(
        version=trt.__version__,
        gpu_name=name,
        compute_capability=capability,
        tf32=tf32,
        batch_profile=(1, opt, max_batch),
    )


def plan_runner(
    plan_path: str | Path, *, output: str = "logits"
) -> tuple[Callable[[np.ndarray], np.ndarray], str]:
    """(batch -> `output` function, runtime description) for a serialized engine.

    Device buffers come from torch.cuda (a CUDA build of torch is needed to run, not to build).
    """
    trt = _trt()
    import torch

    if not torch.cuda.is_available():
        raise TensorRTError("running a TensorRT plan needs a CUDA build of torch (torch.cuda unavailable)")
    logger = trt.Logger(trt.Logger.WARNING)
    engine = trt.Runtime(logger).deserialize_cuda_engine(Path(plan_path).read_bytes())
    if engine is None:
        raise TensorRTError(f"cannot deserialize {plan_path} (built for another GPU or TensorRT version?)")
    context = engine.create_execution_context()
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    if output not in names or len(inputs) != 1:
        raise TensorRTError(f"engine tensors {names} do not have one input and an output {output!r}")

    def run(batch: np.ndarray) -> np.ndarray:
        stream = torch.cuda.current_stream()
        source = torch.from_numpy(np.ascontiguousarray(batch)).cuda()
        context.set_input_shape(inputs[0], tuple(source.shape))
        buffers = {inputs[0]: source}
        for name in names:
            if name != inputs[0]:
                dtype = torch.from_numpy(np.empty(0, dtype=trt.nptype(engine.get_tensor_dtype(name)))).dtype
                buffers[name] = torch.empty(tuple(context.get_tensor_shape(name)), dtype=dtype, device="cuda")
        for name, tensor in buffers.items():
            context.set_tensor_address(name, tensor.data_ptr())
        if not context.execute_async_v3(stream.cuda_stream):
            raise TensorRTError("TensorRT execution failed")
        stream.synchronize()
        return buffers[output].float().cpu().numpy()

    name, _ = gpu_identity()
    return run, f"tensorrt {trt.__version__} on {name}"
