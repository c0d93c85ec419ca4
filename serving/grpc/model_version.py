"""One live model version (LoadedVersion): the runtime's model handle, the batcher that serves it
and its statistics; the batch observer that feeds statistics and metrics; and how `kiln serve`'s
settings become the handle's artefact choice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from serving.contract.manifest import Artefact, Manifest
from serving.contract.serving_defaults import INSTANCES
from serving.grpc.config import BACKEND_FIELDS, ServeConfig
from serving.grpc.statistics import ModelStats
from serving.runtime.backends import Backend, BackendOptions, backend_device
from serving.runtime.batcher import BatchObserver, DynamicBatcher
from serving.runtime.model_handle import ArtefactChoice, ModelHandle


@dataclass(eq=False)
class LoadedVersion:
    """One READY model version: its handle (warmed up), the batcher in front of it, its statistics."""

    handle: ModelHandle
    batcher: DynamicBatcher
    stats: ModelStats
    # The handle's, at hand for the request paths (a handle never changes once loaded).
    model: str = field(init=False)
    version: int = field(init=False)
    manifest: Manifest = field(init=False)
    artefact: Artefact = field(init=False)
    backend: Backend = field(init=False)  # run it through the batcher

    def __post_init__(self) -> None:
        handle = self.handle
        self.model, self.version, self.manifest = handle.model, handle.version, handle.manifest
        self.artefact, self.backend = handle.artefact, handle.backend

    @property
    def labels(self) -> tuple[str, ...]:
        """Class labels in output index order."""
        return self.manifest.labels


class VersionObserver:
    """Feeds batch timings to the version's statistics and metrics (the handle warms up before
    the batcher exists, so warm-up batches never reach them)."""

    def __init__(self, stats: ModelStats, extra: BatchObserver | None) -> None:
        self._stats, self._extra = stats, extra

    def on_batch(
        self, *, rows: int, requests: int, queue_seconds: Sequence[float], compute_seconds: float
    ) -> None:
        self._stats.record_batch(rows=rows, queue_seconds=queue_seconds, compute_seconds=compute_seconds)
        if self._extra is not None:
            self._extra.on_batch(
                rows=rows, requests=requests, queue_seconds=queue_seconds, compute_seconds=compute_seconds
            )

    def on_dropped(self, reason: str, count: int = 1) -> None:
        if self._extra is not None:
            self._extra.on_dropped(reason, count)


def artefact_choice(config: ServeConfig) -> ArtefactChoice:
    """`kiln serve`'s settings as the model handle's artefact choice (the one rule lives there)."""
    return ArtefactChoice(
        device=config.device,
        backend=config.backend,
        precision=config.precision,
        threads=config.intra_op_threads,
        instances=config.instances,
    )


def backend_options(config: ServeConfig) -> BackendOptions:
    """How `kiln serve` runs every artefact: the one mapping from ServeConfig to BackendOptions.

    The GPU settings (BACKEND_FIELDS) pass under their own names; ServeConfig validated them at
    start with BackendOptions' own checks, so this cannot fail on a config that loaded.
    """
    return BackendOptions(
        device=backend_device(config.device),
        instances=config.instances or INSTANCES,
        intra_op_threads=config.intra_op_threads or 0,
        allow_spinning=config.intra_op_spinning,
        lone_batch_spinning=config.lone_batch_spinning,
        single_thread_small_batches=config.single_thread_small_batches,
        share_cores=config.workers_share_cores,  # acts only in a worker given a core table
        # workers without the core table cannot tell their cores apart: pinned, all would share one
        pin_threads=config.pin_ort_threads and (config.workers_share_cores or config.worker_count() == 1),
        share_arena=config.share_ort_arena,
        **{name: getattr(config, name) for name in BACKEND_FIELDS},
    )
