"""Which model versions are live: load from the repository, warm up, route, hot-swap, unload.

Each loaded version owns a backend, a DynamicBatcher and its statistics. Requests are routed by
`get(model, version)`; "" picks the highest READY version. A version becomes routable only after
its warm-up succeeded. Replacing a version (polling, RepositoryModelLoad) loads the new one first,
then removes the old one from the routing table and drains its batcher before closing it, so no
accepted request fails. Callers must call `get` and `batcher.submit` with no `await` in between
(submit enqueues synchronously), which makes the swap race-free on the event loop.

A version that fails to load is UNAVAILABLE with its reason; the other models keep serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import numpy as np

from serving.backends import Backend, BackendOptions, load_backend
from serving.backends.base import numpy_dtype
from serving.batcher import BatchObserver, DynamicBatcher
from serving.config import ServeConfig
from serving.errors import KilnError, ModelNotFoundError, ModelUnavailableError
from serving.grpc_statistics import ModelStats
from serving.manifest import Artefact, Manifest
from serving.metrics import KilnMetrics
from serving.repository import ModelRepository, RepositoryError, VersionPolicy

log = logging.getLogger("kiln.models")

READY, LOADING, UNAVAILABLE, UNLOADING = "READY", "LOADING", "UNAVAILABLE", "UNLOADING"
StateListener = Callable[[str, bool], Awaitable[None]]  # (model, any version ready)


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
    last_compute_seconds: float = 0.0  # of the most recent batch (Classify's timing report)

    @property
    def labels(self) -> tuple[str, ...]:
        """Class labels in output index order."""
        return self.manifest.labels


@dataclass
class VersionState:
    """Index entry of one version (RepositoryIndex)."""

    model: str
    version: int
    state: str
    reason: str = ""


class _Observer:
    """Feeds batch timings to the version's statistics and metrics once it is live (not warm-up)."""

    def __init__(self, stats: ModelStats, extra: BatchObserver | None) -> None:
        self._stats, self._extra = stats, extra
        self.loaded: LoadedVersion | None = None  # set after warm-up: warm-up batches are not counted

    def on_batch(
        self, *, rows: int, requests: int, queue_seconds: Sequence[float], compute_seconds: float
    ) -> None:
        if self.loaded is None:
            return
        self.loaded.last_compute_seconds = compute_seconds
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


class ModelManager:
    """Loads and routes model versions; all methods run on the server's event loop."""

    def __init__(
        self,
        config: ServeConfig,
        *,
        on_state_change: StateListener | None = None,
        metrics: KilnMetrics | None = None,
    ) -> None:
        self.config = config
        self.repository = ModelRepository(config.repo)
        self.policy = VersionPolicy.parse(config.version_policy)
        self._on_state_change = on_state_change
        self._metrics = metrics
        self._live: dict[str, dict[int, LoadedVersion]] = {}
        self._states: dict[tuple[str, int], VersionState] = {}
        self._model_errors: dict[str, str] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._stopped = False

    # -- routing -------------------------------------------------------------------------------

    def get(self, model: str, version: str = "") -> LoadedVersion:
        """The READY version to serve (NOT_FOUND for unknown names/versions, UNAVAILABLE if not ready)."""
        live = self._live.get(model)
        if not version:
            if live:
                return live[max(live)]
            self._raise_absent(model, None)
        if not version.isdigit():
            raise ModelNotFoundError(f"model {model!r} has no version {version!r} (versions are integers)")
        loaded = live.get(int(version)) if live else None
        if loaded is None:
            self._raise_absent(model, int(version))
        return loaded

    def _raise_absent(self, model: str, version: int | None) -> None:
        known = [s for (m, _), s in self._states.items() if m == model]
        if version is not None:
            state = self._states.get((model, version))
            if state is None:
                have = sorted(s.version for s in known)
                raise ModelNotFoundError(f"model {model!r} has no version {version} (versions: {have})")
            raise ModelUnavailableError(
                f"model {model!r} version {version} is {state.state}: {state.reason}",
                reason=state.state.lower(),
            )
        if known or model in self._model_errors:
            reasons = (
                "; ".join(f"v{s.version} {s.state}: {s.reason}" for s in known) or self._model_errors[model]
            )
            raise ModelUnavailableError(f"model {model!r} is not ready ({reasons})", reason="unavailable")
        raise ModelNotFoundError(f"model {model!r} not found; serving {sorted(self._live)}")

    def is_ready(self, model: str, version: str = "") -> bool:
        """True when get() would succeed."""
        try:
            self.get(model, version)
        except KilnError:
            return False
        return True

    def versions(self, model: str) -> list[int]:
        """Known versions of `model` (any state), ascending."""
        return sorted(v for (m, v) in self._states if m == model)

    def loaded(self) -> list[LoadedVersion]:
        """Every READY version."""
        return [lv for versions in self._live.values() for lv in versions.values()]

    def index(self) -> list[VersionState]:
        """Every known version with its state, plus models that could not be read at all."""
        entries = [VersionState(m, 0, UNAVAILABLE, reason) for m, reason in self._model_errors.items()]
        return sorted(entries + list(self._states.values()), key=lambda s: (s.model, s.version))

    # -- loading ---------------------------------------------------------------------------------

    async def load_all(self) -> None:
        """Load every model of the repository (or config.models) under the version policy."""
        names = list(self.config.models) or self.repository.model_names()
        for name in names:
            # A failure is recorded UNAVAILABLE with its reason (and logged); the others keep loading.
            with contextlib.suppress(ModelUnavailableError):
                await self.load(name)

    async def load(self, model: str) -> None:
        """(Re)load `model`: bring up the versions the policy selects, retire the others.

        Raises ModelNotFoundError if the folder is absent; a version that fails to load is
        recorded UNAVAILABLE (its reason is in the index) and, if none is ready, this raises
        ModelUnavailableError with the reasons.
        """
        if self._stopped:
            raise ModelUnavailableError("the server is shutting down", reason="stopped")
        async with self._locks.setdefault(model, asyncio.Lock()):
            status = await asyncio.to_thread(self.repository.scan_model, model, self.policy)
            if not status.path.is_dir():
                raise ModelNotFoundError(f"model {model!r} not found in repository {self.config.repo}")
            self._model_errors.pop(model, None)
            if status.error and not status.versions:
                self._model_errors[model] = status.error
            wanted = {v.version for v in status.versions}
            for version in sorted(wanted):
                if version not in self._live.get(model, {}):
                    await self._load_version(model, version)
            for version in sorted(set(self._live.get(model, {})) - wanted):
                await self._retire(model, version)
            for key in [k for k in self._states if k[0] == model and k[1] not in wanted]:
                del self._states[key]
            await self._notify(model)
        if not self._live.get(model):
            self._raise_absent(model, None)

    async def unload(self, model: str) -> None:
        """Drain and unload every version of `model` (NOT_FOUND if it is not known)."""
        if model not in self._live and not any(m == model for m, _ in self._states):
            raise ModelNotFoundError(f"model {model!r} is not loaded")
        async with self._locks.setdefault(model, asyncio.Lock()):
            for version in sorted(self._live.get(model, {})):
                await self._retire(model, version)
            for key in [k for k in self._states if k[0] == model]:
                del self._states[key]
            self._live.pop(model, None)
            self._model_errors[model] = "unloaded (RepositoryModelLoad brings it back)"
            await self._notify(model)

    async def _load_version(self, model: str, version: int) -> None:
        state = self._states[(model, version)] = VersionState(model, version, LOADING)
        self._set_metric_state(model, version, "loading")
        try:
            loaded = await self._bring_up(model, version)
        except (KilnError, RepositoryError, ValueError, OSError) as exc:
            state.state, state.reason = UNAVAILABLE, str(exc)
            self._set_metric_state(model, version, "failed")
            log.error("model %s v%d failed to load: %s", model, version, exc)
            return
        self._live.setdefault(model, {})[version] = loaded
        state.state, state.reason = READY, ""
        self._set_metric_state(model, version, "ready")
        if self._metrics is not None:
            self._metrics.track_queue_depth(model, str(version), lambda: loaded.batcher.queue_depth)
        log.info("model %s v%d ready (%s)", model, version, loaded.artefact.path)

    async def _bring_up(self, model: str, version: int) -> LoadedVersion:
        """Resolve + verify sha256, load the backend, start the batcher, warm up."""
        resolved = await asyncio.to_thread(
            self.repository.resolve, model, version, policy=self.policy, artefacts=()
        )
        artefact = choose_artefact(resolved.manifest, self.config)
        await asyncio.to_thread(
            self.repository.resolve, model, version, policy=self.policy, artefacts=[artefact.path]
        )
        cfg = self.config
        options = BackendOptions(
            device=_backend_device(cfg.device),
            instances=cfg.instances,
            intra_op_threads=cfg.intra_op_threads or 0,
        )
        backend = await asyncio.to_thread(
            load_backend, resolved.manifest, artefact, version_dir=resolved.path, options=options
        )
        try:
            return await self._start_batcher(model, version, resolved.manifest, artefact, backend)
        except BaseException:
            backend.close()
            raise

    async def _start_batcher(
        self, model: str, version: int, manifest: Manifest, artefact: Artefact, backend: Backend
    ) -> LoadedVersion:
        cfg = self.config
        max_batch = min(cfg.max_batch_size or backend.max_batch_size, backend.max_batch_size)
        stats = ModelStats(model, str(version))
        extra = self._metrics.batch_observer(model, str(version)) if self._metrics else None
        observer = _Observer(stats, extra)
        batcher = DynamicBatcher(
            backend,
            max_batch_size=max_batch,
            max_queue_delay_us=cfg.max_queue_delay_us,
            preferred_batch_sizes=[b for b in cfg.preferred_batch_sizes if b <= max_batch],
            max_queue_size=cfg.max_queue_size,
            observer=observer,
            name=model,
        )
        batcher.start()
        loaded = LoadedVersion(model, version, manifest, artefact, backend, batcher, stats)
        try:
            if cfg.warmup:
                for rows in sorted({1, max_batch}):
                    await batcher.submit(warmup_inputs(backend, rows))
        except BaseException:
            await batcher.stop(drain=False)
            raise
        observer.loaded = loaded
        return loaded

    async def _retire(self, model: str, version: int) -> None:
        loaded = self._live.get(model, {}).pop(version, None)
        if loaded is None:
            return
        state = self._states.get((model, version))
        if state is not None:
            state.state = UNLOADING
        await self._notify(model)
        self._set_metric_state(model, version, "unloading")
        await loaded.batcher.stop(drain=True)
        await asyncio.to_thread(loaded.backend.close)
        if self._metrics is not None:
            self._metrics.forget(model, str(version))
        self._set_metric_state(model, version, "unloaded")
        log.info("model %s v%d unloaded", model, version)

    def _set_metric_state(self, model: str, version: int, state: str) -> None:
        if self._metrics is not None:
            self._metrics.set_load_state(model, str(version), state)

    async def _notify(self, model: str) -> None:
        if self._on_state_change is not None:
            await self._on_state_change(model, bool(self._live.get(model)))

    # -- polling and shutdown --------------------------------------------------------------------

    async def poll_forever(self, interval_s: float) -> None:
        """Rescan every `interval_s`: load new models/versions, retire deselected ones."""
        while not self._stopped:
            await asyncio.sleep(interval_s)
            names = set(self.config.models) or set(await asyncio.to_thread(self.repository.model_names))
            for name in sorted(names | set(self._live)):
                try:
                    await self.load(name)
                except KilnError as exc:
                    log.warning("poll: %s", exc)

    async def close(self, *, drain: bool = True) -> None:
        """Stop every batcher (draining queued work) and close every backend."""
        self._stopped = True
        for model in list(self._live):
            for version in sorted(self._live.get(model, {})):
                loaded = self._live[model].pop(version)
                await loaded.batcher.stop(drain=drain)
                await asyncio.to_thread(loaded.backend.close)
        self._live.clear()


def _backend_device(device: str) -> str:
    """ServeConfig's device to the backends' spelling ("auto" picks CUDA when ORT has it)."""
    if device != "auto":
        return device
    try:
        import onnxruntime

        return "cuda" if "CUDAExecutionProvider" in onnxruntime.get_available_providers() else "cpu"
    except ImportError:
        return "cpu"
