"""How an ONNX Runtime session is driven: plain run (CPU), IOBinding (CUDA/TensorRT EP), CUDA graphs.

Each runner belongs to one session and is used by one thread at a time (the backend's free-list
guarantees it): `run(inputs, rows) -> outputs by name`, `close()`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from serving.runtime.backends.base import BackendOptions, TensorSpec
from serving.runtime.backends.cpu_pinning import running_on

__all__ = ["BindingRunner", "CudaGraphRunner", "SessionRunner", "graph_buckets"]

log = logging.getLogger(__name__)


class SessionRunner:
    """Plain `session.run` with numpy feeds (CPU EP, or GPU with IOBinding switched off).
    `caller_cpu`: the core the calling thread moves to for each Run, off its pool threads' pinned
    cores (serving/runtime/backends/cpu_pinning.py)."""

    def __init__(self, session: Any, *, caller_cpu: int | None = None) -> None:
        self.session, self.caller_cpu = session, caller_cpu
        self.names = [o.name for o in session.get_outputs()]

    def run(self, inputs: Mapping[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
        feeds = {name: np.ascontiguousarray(array) for name, array in inputs.items()}
        if self.caller_cpu is None:
            return dict(zip(self.names, self.session.run(self.names, feeds), strict=True))
        with running_on(self.caller_cpu):
            return dict(zip(self.names, self.session.run(self.names, feeds), strict=True))

    def close(self) -> None:
        self.session = None


class _DeviceRunner:
    """What the GPU runners share: built from the session, the model's specs, the batch limit and
    the backend's options (`_build` does the runner's own part); `outputs` are kept for `run`."""

    def __init__(
        self,
        session: Any,
        inputs: Sequence[TensorSpec],
        outputs: Sequence[TensorSpec],
        max_batch: int,
        options: BackendOptions,
    ) -> None:
        self.session, self.outputs = session, tuple(outputs)
        self._build(tuple(inputs), max_batch, options)

    def _build(self, inputs: tuple[TensorSpec, ...], max_batch: int, options: BackendOptions) -> None:
        raise NotImplementedError


class BindingRunner(_DeviceRunner):
    """CUDA/TensorRT EP through IOBinding; host copies use pinned buffers when cuda-python is present.

    With every input and output staged in a pinned buffer (fixed rows per tensor), each bucket's
    binding is made once and reused: a batch is one copy into the staging rows, one
    `run_with_iobinding` (which releases the GIL) and one copy out. Binding per call instead cost
    an `io_binding()` object and a bind per tensor under the GIL on every batch.
    """

    def _build(self, inputs: tuple[TensorSpec, ...], max_batch: int, options: BackendOptions) -> None:
        self.pin_in: dict[str, Any] = {}
        self.pin_out: dict[str, Any] = {}
        self._bound: dict[int, Any] = {}  # bucket size -> its IOBinding over the pinned buffers
        # Every new batch size costs the CUDA EP a slow first run (kernel choice, memory plan),
        # and dynamic batching kept making new sizes (benchmarks/gpu/RESULTS.md, runs 2 and 3).
        # Padding up to a few buckets, each run once here, avoids it.
        self.buckets = graph_buckets(max_batch) if options.pad_to_buckets else []
        if options.pinned_memory:
            self._allocate_pinned(inputs, self.outputs, max_batch)
        for size in self.buckets:  # warm every bucket of this session (the batcher may not reach it)
            dims = {s.name: tuple(d if d > 0 else 1 for d in s.shape[1:]) for s in inputs}
            self.run({s.name: np.zeros((size, *dims[s.name]), s.dtype) for s in inputs}, size)

    def _allocate_pinned(
        self, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec], max_batch: int
    ) -> None:
        from serving.runtime.backends.cuda_rt import CudaRuntime, PinnedBuffer

        try:
            cuda = CudaRuntime()
        except ModuleNotFoundError as exc:
            log.info("pinned staging off: %s", exc)
            return
        for specs, target in ((inputs, self.pin_in), (outputs, self.pin_out)):
            for spec in specs:
                if -1 not in spec.shape[1:]:  # a fixed row size is needed to preallocate
                    target[spec.name] = PinnedBuffer(cuda, (max_batch, *spec.shape[1:]), spec.dtype)

    def run(self, inputs: Mapping[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
        size = next((b for b in self.buckets if b >= rows), rows)  # rows past `rows` are dropped
        if self.pin_in.keys() != inputs.keys() or len(self.pin_out) != len(self.outputs):
            return self._run_unstaged(inputs, rows, size)
        io = self._bound.get(size) or self._bind_staged(size)
        for name, array in inputs.items():  # rows past `rows` keep stale data: computed, dropped
            np.copyto(self.pin_in[name].rows(size)[:rows], array)
        self.session.run_with_iobinding(io)
        return {s.name: self.pin_out[s.name].rows(size)[:rows].copy() for s in self.outputs}

    def _bind_staged(self, size: int) -> Any:
        """The IOBinding of bucket `size` over the pinned buffers' first `size` rows (made once)."""
        io = self.session.io_binding()
        for name, buf in self.pin_in.items():
            io.bind_input(name, "cpu", 0, buf.dtype.type, buf.rows(size).shape, buf.ptr)
        for name, buf in self.pin_out.items():
            io.bind_output(name, "cpu", 0, buf.dtype.type, buf.rows(size).shape, buf.ptr)
        self._bound[size] = io
        return io

    def _run_unstaged(self, inputs: Mapping[str, np.ndarray], rows: int, size: int) -> dict[str, np.ndarray]:
        """No pinned staging (no cuda-python, or a dynamic non-batch dim): bind this call's arrays."""
        io = self.session.io_binding()
        for name, array in inputs.items():
            padded = array
            if size != rows:
                padded = np.zeros((size, *array.shape[1:]), array.dtype)
                padded[:rows] = array
            io.bind_cpu_input(name, np.ascontiguousarray(padded))
        for spec in self.outputs:
            io.bind_output(spec.name, "cpu")
        self.session.run_with_iobinding(io)
        values = io.copy_outputs_to_cpu()
        return {s.name: values[i][:rows] for i, s in enumerate(self.outputs)}

    def close(self) -> None:
        self._bound = {}
        for buf in (*self.pin_in.values(), *self.pin_out.values()):
            buf.free()
        self.pin_in, self.pin_out, self.session = {}, {}, None


class CudaGraphRunner(_DeviceRunner):
    """ORT CUDA EP with CUDA graphs: one captured graph per batch bucket, inputs padded up to it.

    A graph replays fixed device addresses, so each bucket owns device OrtValues bound once; a
    batch is copied into its bucket's input (rows past the batch keep stale data: every row is
    computed independently and the extra rows are dropped).
    """

    def _build(self, inputs: tuple[TensorSpec, ...], max_batch: int, options: BackendOptions) -> None:
        import onnxruntime as ort

        session, device_id = self.session, options.device_id or 0
        self.buckets: list[tuple[int, dict[str, Any], dict[str, Any], dict[str, np.ndarray], Any, Any]] = []
        for graph_id, size in enumerate(graph_buckets(max_batch)):
            host = {s.name: np.zeros((size, *s.shape[1:]), s.dtype) for s in inputs}
            dev_in = {n: ort.OrtValue.ortvalue_from_numpy(a, "cuda", device_id) for n, a in host.items()}
            dev_out = {
                s.name: ort.OrtValue.ortvalue_from_shape_and_type(
                    (size, *s.shape[1:]), s.dtype.type, "cuda", device_id
                )
                for s in self.outputs
            }
            io = session.io_binding()
            for name, value in dev_in.items():
                io.bind_ortvalue_input(name, value)
            for name, value in dev_out.items():
                io.bind_ortvalue_output(name, value)
            run_options = ort.RunOptions()
            run_options.add_run_config_entry("gpu_graph_id", str(graph_id))
            for _ in range(2):  # ORT runs once normally, then captures on the next run
                session.run_with_iobinding(io, run_options)
            self.buckets.append((size, dev_in, dev_out, host, io, run_options))

    def run(self, inputs: Mapping[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
        _, dev_in, dev_out, host, io, run_options = next(b for b in self.buckets if b[0] >= rows)
        for name, array in inputs.items():
            host[name][:rows] = array
            dev_in[name].update_inplace(host[name])
        self.session.run_with_iobinding(io, run_options)
        return {s.name: dev_out[s.name].numpy()[:rows] for s in self.outputs}

    def close(self) -> None:
        self.buckets, self.session = [], None


def graph_buckets(max_batch: int) -> list[int]:
    """Powers of two below `max_batch`, then `max_batch` itself."""
    sizes, size = [], 1
    while size < max_batch:
        sizes.append(size)
        size *= 2
    return [*sizes, max_batch]
