"""Engine sweep of the GPU check: Kiln's own ONNX Runtime backend in-process (host arrays in and
out, exactly what the batcher calls), per input (uint8 / FP32), precision, conv layout (NCHW /
NHWC kernels), CUDA graphs off/on, and batch size. Also fits device time = a + b * rows for the
timing backend, so the served sweep can replay the same device time without a GPU model.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from serving.contract.repository import ModelRepository
from serving.runtime.backends import Backend, BackendOptions, load_backend, numpy_dtype


@dataclass(frozen=True)
class Variant:
    """One engine configuration: which repository model (input), precision, BackendOptions fields."""

    input: str  # "uint8" | "fp32"
    precision: str
    nhwc: bool = False
    graphs: bool = False

    @property
    def label(self) -> str:
        layout = "NHWC" if self.nhwc else "NCHW"
        return f"{self.input} in, {self.precision}, {layout}{', graphs' if self.graphs else ''}"


def variants(gpu: bool, precisions: tuple[str, ...]) -> list[Variant]:
    """GPU: every precision x layout x graphs for uint8 input, NCHW without graphs for FP32 input.
    CPU: NCHW without graphs (NHWC kernels and CUDA graphs are CUDA EP options)."""
    if not gpu:
        return [Variant(kind, p) for kind in ("uint8", "fp32") for p in precisions]
    full = [Variant("uint8", p, n, g) for p in precisions for n in (False, True) for g in (False, True)]
    return full + [Variant("fp32", p) for p in precisions]


def timed(call: Callable[[], object], seconds: float) -> tuple[float, float]:
    """(calls/s, p99 ms) of `call` back to back for `seconds` (at least 10 calls) after 3 warm-ups."""
    for _ in range(3):
        call()
    lat, stop = [], time.perf_counter() + seconds
    while time.perf_counter() < stop or len(lat) < 10:
        t0 = time.perf_counter()
        call()
        lat.append(time.perf_counter() - t0)
    arr = np.asarray(lat)
    return len(arr) / arr.sum(), float(np.percentile(arr, 99) * 1e3)


def sample(backend: Backend, rows: int) -> dict[str, np.ndarray]:
    """Finite inputs of the backend's spec: pixels for uint8, unit normals for floats."""
    rng, out = np.random.default_rng(0), {}
    for spec in backend.inputs:
        shape, dtype = (rows, *spec.shape[1:]), numpy_dtype(spec.datatype)
        values = rng.integers(0, 256, shape) if dtype == np.uint8 else rng.standard_normal(shape)
        out[spec.name] = values.astype(dtype)
    return out


def _load(repo: Path, model: str, variant: Variant, device: str) -> Backend:
    resolved = ModelRepository(repo).resolve(model, None)
    artefact = resolved.manifest.find_artefact("onnx", variant.precision)
    if artefact is None:
        raise ValueError(f"{model} has no ONNX {variant.precision} artefact")
    options = BackendOptions(device=device, cuda_prefer_nhwc=variant.nhwc, cuda_graphs=variant.graphs)
    return load_backend(resolved.manifest, artefact, version_dir=resolved.path, options=options)


def sweep(
    repo: Path, name: str, variants_: list[Variant], batches: list[int], device: str, seconds: float
) -> Iterator[dict]:
    """One row per (variant, batch): images/s and p99 ms per batch; a failed load is one row."""
    for variant in variants_:
        try:
            backend = _load(repo, f"{name}-{variant.input}", variant, device)
        except Exception as exc:  # report the variant, keep the others
            yield {"model": name, "variant": variant.label, "error": repr(exc)[:300]}
            continue
        try:
            for batch in (b for b in batches if b <= backend.max_batch_size):
                feed = sample(backend, batch)
                calls, p99 = timed(lambda f=feed, b=backend: b.infer(f), seconds)
                yield {"model": name, "variant": variant.label, "input": variant.input,
                       "precision": variant.precision, "nhwc": variant.nhwc, "graphs": variant.graphs,
                       "batch": batch, "images_per_s": calls * batch, "p99_ms": p99}  # fmt: skip
        finally:
            backend.close()


def fit_device_time(rows: list[dict]) -> tuple[int, int]:
    """Least-squares a + b * batch (microseconds) over rows' batch time (1/calls), both >= 0."""
    batch = np.array([r["batch"] for r in rows], float)
    seconds = batch / np.array([r["images_per_s"] for r in rows], float)
    b, a = np.polyfit(batch, seconds, 1) if len(rows) > 1 else (0.0, seconds[0])
    return max(0, round(a * 1e6)), max(0, round(b * 1e6))
