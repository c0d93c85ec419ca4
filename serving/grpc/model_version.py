"""One live model version (LoadedVersion) and the helpers that bring it up: which artefact to
load for the configured device/backend/precision, the warm-up inputs, and the batch observer that
feeds its statistics and metrics (warm-up batches excluded).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from serving.contract.manifest import Artefact, Manifest
from serving.errors import ModelUnavailableError
from serving.grpc.config import BACKEND_FIELDS, ServeConfig
from serving.grpc.statistics import ModelStats
from serving.runtime.backends import Backend, BackendOptions
from serving.runtime.backends.base import numpy_dtype
from serving.runtime.batcher import BatchObserver, DynamicBatcher


@dataclass(eq=False)
class LoadedVersion:
    """One READY model version: what a request needs to run."""

    model: str
    version: int
    manifest: Manifest
    artefact: Artefact
    backend: Backend
    batcher: DynamicBatcher
    stats: ModelStats

    @property
    def labels(self) -> tuple[str, ...]:
        """Class labels in output index order."""
        return self.manifest.labels


class VersionObserver:
    """Feeds batch timings to the version's statistics and metrics once it is live (not warm-up)."""

    def __init__(self, stats: ModelStats, extra: BatchObserver | None) -> None:
        self._stats, self._extra = stats, extra
        self.loaded: LoadedVersion | None = None  # set after warm-up: warm-up batches are not counted

    def on_batch(
        self, *, rows: int, requests: int, queue_seconds: Sequence[float], compute_seconds: float
    ) -> None:
        if self.loaded is None:
            return
        self._stats.record_batch(rows=rows, queue_seconds=queue_seconds, compute_seconds=compute_seconds)
        if self._extra is not None:
            self._extra.on_batch(
                rows=rows, requests=requests, queue_seconds=queue_seconds, compute_seconds=compute_seconds
            )

    def on_dropped(self, reason: str, count: int = 1) -> None:
        if self.loaded is not None and self._extra is not None:
            self._extra.on_dropped(reason, count)


def choose_artefact(manifest: Manifest, config: ServeConfig) -> Artefact:
    """The artefact to load for this device/backend/precision (ModelUnavailableError if none)."""
    gpu = config.device.startswith("cuda")
    precisions = ("fp32",) if config.precision == "auto" and not gpu else None
    if config.precision != "auto":
        precisions = (config.precision,)
    formats = {"onnxruntime": ("onnx",), "tensorrt": ("tensorrt_plan",)}.get(
        config.backend, ("tensorrt_plan", "onnx") if gpu else ("onnx",)
    )
    for fmt in formats:
        for art in manifest.artefacts:
            if art.format == fmt and (precisions is None or art.precision in precisions):
                return art
    have = [(a.path, a.format, a.precision) for a in manifest.artefacts]
    raise ModelUnavailableError(
        f"no artefact for device={config.device} backend={config.backend} precision={config.precision}; "
        f"have {have}",
        reason="no matching artefact",
    )


def warmup_inputs(backend: Backend, rows: int) -> dict[str, np.ndarray]:
    """Zero inputs of `rows` rows for every backend input (dynamic non-batch dims become 1)."""
    return {
        spec.name: np.zeros(
            (rows, *(d if d > 0 else 1 for d in spec.shape[1:])), dtype=numpy_dtype(spec.datatype)
        )
        for spec in backend.inputs
    }


def backend_device(device: str) -> str:
    """ServeConfig's device to the backends' spelling ("auto" picks CUDA when ORT has it)."""
    if device != "auto":
        return device
    try:
        import onnxruntime

        return "cuda" if "CUDAExecutionProvider" in onnxruntime.get_available_providers() else "cpu"
    except ImportError:
        return "cpu"


def backend_options(config: ServeConfig) -> BackendOptions:
    """How `kiln serve` runs every artefact: the one mapping from ServeConfig to BackendOptions.

    The GPU settings (BACKEND_FIELDS) pass under their own names; ServeConfig validated them at
    start with BackendOptions' own checks, so this cannot fail on a config that loaded.
    """
    return BackendOptions(
        device=backend_device(config.device),
        instances=config.instances,
        intra_op_threads=config.intra_op_threads or 0,
        allow_spinning=config.intra_op_spinning,
        **{name: getattr(config, name) for name in BACKEND_FIELDS},
    )
