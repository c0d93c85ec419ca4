"""A thin, lazily imported wrapper over the CUDA runtime of `cuda-python` (no torch).

Used by the native TensorRT backend (device buffers, streams, copies) and by the ONNX Runtime CUDA
path (page-locked host staging buffers). Importing this module imports nothing from CUDA;
`CudaRuntime()` does, and raises ModuleNotFoundError with an install hint when it is absent.
"""

from __future__ import annotations

import ctypes
from types import ModuleType
from typing import Any

import numpy as np

__all__ = ["CudaRuntime", "PinnedBuffer", "load_cudart"]


def load_cudart() -> ModuleType:
    """The cuda-python runtime module (new `cuda.bindings` layout first, then the old one)."""
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError as exc:
            raise ModuleNotFoundError("cuda-python is not installed (pip install cuda-python)") from exc
    return cudart


class CudaRuntime:
    """Error-checked calls into the CUDA runtime; every failure raises RuntimeError naming the call."""

    def __init__(self, cudart: ModuleType | None = None) -> None:
        self.rt = cudart if cudart is not None else load_cudart()

    def _call(self, name: str, *args: Any) -> Any:
        result = getattr(self.rt, name)(*args)
        err, rest = (result[0], result[1:]) if isinstance(result, tuple) else (result, ())
        if err != self.rt.cudaError_t.cudaSuccess:
            text = self.rt.cudaGetErrorString(err)[1]
            raise RuntimeError(f"{name} failed: {text.decode() if isinstance(text, bytes) else text}")
        return rest[0] if len(rest) == 1 else rest

    def set_device(self, device_id: int) -> None:
        """Make `device_id` current for this thread."""
        self._call("cudaSetDevice", device_id)

    def device_info(self, device_id: int) -> tuple[str, str]:
        """(GPU name, compute capability "major.minor") of `device_id`."""
        props = self._call("cudaGetDeviceProperties", device_id)
        name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
        return name.rstrip("\x00").strip(), f"{props.major}.{props.minor}"

    def stream_create(self) -> Any:
        """A new non-default CUDA stream."""
        return self._call("cudaStreamCreate")

    def stream_sync(self, stream: Any) -> None:
        """Block until `stream` is idle."""
        self._call("cudaStreamSynchronize", stream)

    def stream_destroy(self, stream: Any) -> None:
        """Destroy `stream`."""
        self._call("cudaStreamDestroy", stream)

    def malloc(self, nbytes: int) -> int:
        """Device memory; returns its address."""
        return int(self._call("cudaMalloc", max(1, nbytes)))

    def free(self, ptr: int) -> None:
        """Free device memory from `malloc`."""
        self._call("cudaFree", ptr)

    def host_alloc(self, nbytes: int) -> int:
        """Page-locked host memory (fast, truly asynchronous copies); returns its address."""
        return int(self._call("cudaMallocHost", max(1, nbytes)))

    def host_free(self, ptr: int) -> None:
        """Free memory from `host_alloc`."""
        self._call("cudaFreeHost", ptr)

    def copy_htod_async(self, dst: int, src: int, nbytes: int, stream: Any) -> None:
        """Enqueue a host-to-device copy on `stream`."""
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._call("cudaMemcpyAsync", dst, src, nbytes, kind, stream)

    def copy_dtoh_async(self, dst: int, src: int, nbytes: int, stream: Any) -> None:
        """Enqueue a device-to-host copy on `stream`."""
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._call("cudaMemcpyAsync", dst, src, nbytes, kind, stream)


class PinnedBuffer:
    """A page-locked host buffer viewed as a numpy array of up to `shape` (first dim = max rows)."""

    def __init__(self, cuda: CudaRuntime, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.cuda, self.shape, self.dtype = cuda, shape, np.dtype(dtype)
        self.nbytes = int(np.prod(shape)) * self.dtype.itemsize
        self.ptr = cuda.host_alloc(self.nbytes)
        raw = (ctypes.c_char * self.nbytes).from_address(self.ptr)
        self.array = np.frombuffer(raw, dtype=self.dtype).reshape(shape)

    def rows(self, n: int) -> np.ndarray:
        """A view of the first `n` rows (contiguous, so its address is `ptr`)."""
        return self.array[:n]

    def free(self) -> None:
        """Release the memory; the array must not be used afterwards."""
        if self.ptr:
            self.array = np.empty((0, *self.shape[1:]), dtype=self.dtype)  # drop the dangling view
            self.cuda.host_free(self.ptr)
            self.ptr = 0
