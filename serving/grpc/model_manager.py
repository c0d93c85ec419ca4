"""Which model versions are live: load from the repository, warm up, route, hot-swap, unload.

Each loaded version owns a model handle (serving.runtime.model_handle: the verified, loaded and
warmed-up artefact), a DynamicBatcher in front of it and its statistics. Requests are routed by
`get(model, version)`; "" picks the highest READY version. A version becomes routable only after
its warm-up succeeded. Replacing a version (polling, RepositoryModelLoad) loads the new one first,
then removes the old one from the routing table and drains its batcher before closing it, so no
accepted request fails. Callers must call `get` and `batcher.submit` with no `await` in between
(submit enqueues synchronously), which makes the swap race-free on the event loop.

With `promotion: shadow` a new version of a serving model first becomes a CANDIDATE: loaded and
warmed but not routed, it answers sampled copies of live requests (`mirror`) until it is promoted
(the same swap as above), or REJECTED with the reason and closed while the serving version stays;
polling does not retry a rejected version until its files change. The mechanics and the verdict
live in serving/grpc/shadow.py; RepositoryModelLoad with parameter `promote: true` forces it.

A version that fails to load is UNAVAILABLE with its reason; the other models keep serving.
Problems of the repository (a broken version, the kiln.json of a serving version gone) are logged
at WARNING once per version and reason, however often a poll or a client's RepositoryModelLoad
finds them again: a client cannot make the server repeat them, and ERROR stays for the server's
own faults.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

from serving.contract.repository import (
    ModelRepository,
    RepositoryError,
    VersionPolicy,
    VersionStatus,
    check_model_name,
)
from serving.errors import (
    InvalidInputError,
    KilnError,
    ModelLoadError,
    ModelNotFoundError,
    ModelUnavailableError,
)
from serving.grpc.config import ServeConfig
from serving.grpc.metrics import KilnMetrics
from serving.grpc.model_version import (
    LoadedVersion,
    VersionObserver,
    artefact_choice,
    backend_options,
)
from serving.grpc.predictions import PredictionTap, prediction_metrics
from serving.grpc.shadow import CANDIDATE, REJECTED, Rollouts
from serving.grpc.statistics import ModelStats
from serving.runtime.backends.null_backend import null_timing
from serving.runtime.batcher import DynamicBatcher
from serving.runtime.model_handle import ModelHandle, from_scan
from serving.runtime.solo import SoloGate

log = logging.getLogger("kiln.models")

READY, LOADING, UNAVAILABLE, UNLOADING = "READY", "LOADING", "UNAVAILABLE", "UNLOADING"
MAX_VERSION_DIGITS = 18  # int() of a longer digit string is slow (or refused past 4300 digits)
StateListener = Callable[[str, bool], Awaitable[None]]  # (model, any version ready)


@dataclass
class VersionState:
    """Index entry of one version (RepositoryIndex)."""

    model: str
    version: int
    state: str
    reason: str = ""


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
        self.policy: VersionPolicy = config.policy  # parsed once, by ServeConfig's validation
        self._on_state_change = on_state_change
        self._metrics = metrics
        self._live: dict[str, dict[int, LoadedVersion]] = {}
        self._states: dict[tuple[str, int], VersionState] = {}
        self._model_errors: dict[str, str] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._unloaded: set[str] = set()  # explicitly unloaded: polling leaves them alone
        self._warned: dict[tuple[str, str, int], str] = {}  # (kind, model, version) -> reason said
        self._stopped = False
        # shadow rollouts (serving/grpc/shadow.py): candidates and rejections, verdicts on this
        # table; each model's promotion policy from config.for_model
        self._rollouts = Rollouts(self, config, metrics)
        # one gate for every model's batcher: a request alone in the process is computed on the
        # event loop (serving/runtime/solo.py)
        inline_ms = config.lone_request_inline_max_ms
        self._solo = SoloGate(inline_ms / 1000) if inline_ms > 0 else None

    # -- routing -------------------------------------------------------------------------------

    def get(self, model: str, version: str = "") -> LoadedVersion:
        """The READY version to serve (NOT_FOUND for unknown names/versions, UNAVAILABLE if not ready)."""
        live = self._live.get(model)
        if not version:
            if live:
                return live[max(live)]
            self._raise_absent(model, None)
        if not (version.isascii() and version.isdigit() and len(version) <= MAX_VERSION_DIGITS):
            raise ModelNotFoundError(f"model {model!r} has no version {version!r} (versions are integers)")
        loaded = live.get(int(version)) if live else None
        if loaded is None:
            self._raise_absent(model, int(version))
        return loaded

    def _raise_absent(self, model: str, version: int | None) -> None:
        _check_name(model)  # on the miss path only: a bad name is named as such, at no cost to hits
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
        for candidate in self._rollouts.candidates.values():  # the running numbers, as of now
            state = self._states.get((candidate.model, candidate.version))
            if state is not None and state.state == CANDIDATE:
                state.reason = candidate.reason()
        entries = [VersionState(m, 0, UNAVAILABLE, reason) for m, reason in self._model_errors.items()]
        return sorted(entries + list(self._states.values()), key=lambda s: (s.model, s.version))

    # -- loading ---------------------------------------------------------------------------------

    async def load_all(self) -> None:
        """Load every model of the repository (or config.models) under the version policy."""
        names = list(self.config.models) or self.repository.model_names()
        for name in names:
            try:
                await self.load(name)
            except (ModelUnavailableError, ModelLoadError):
                pass  # recorded UNAVAILABLE with its reason (and logged); the others keep loading
            except InvalidInputError as exc:  # a folder whose name is no model name
                self._model_errors[name] = str(exc)

    async def load(self, model: str, *, retry_failed: bool = True, promote: bool = False) -> None:
        """(Re)load `model`: bring up the versions the policy selects, then retire the others.

        Old versions are retired only once a selected version is READY, so a broken new version
        never takes a working model down. `retry_failed=False` (polling) leaves versions that
        already failed alone. Raises ModelNotFoundError if the folder is absent,
        ModelUnavailableError with the reasons if no version is ready, and (retry_failed only)
        ModelLoadError if a selected version failed while others still serve: an operator's
        explicit load must not answer OK when the version asked for was refused. `promote`
        skips shadowing: a candidate is promoted now, a new version serves once warm.
        """
        _check_name(model)  # before any path, lock or state is made from a client-chosen name
        if self._stopped:
            raise ModelUnavailableError("the server is shutting down", reason="stopped")
        self._unloaded.discard(model)
        async with self.lock(model):
            status = await asyncio.to_thread(self.repository.scan_model, model, self.policy)
            if not status.path.is_dir():
                raise ModelNotFoundError(f"model {model!r} not found in repository {self.config.repo}")
            self._model_errors.pop(model, None)
            if status.error and not status.versions:
                self._model_errors[model] = status.error
            found = {v.version: v for v in status.versions}
            wanted = set(found)
            live = self._live.setdefault(model, {})
            await self._bring_up_new(model, found, wanted, retry_failed=retry_failed, promote=promote)
            if wanted & set(live):
                for version in sorted(set(live) - wanted):
                    await self._retire(model, version)
                for key in [k for k in self._states if k[0] == model and k[1] not in wanted | set(live)]:
                    del self._states[key]
            elif live:  # each failed version was said once when it failed
                log.debug("model %s: no newly selected version is ready; serving %s", model, sorted(live))
            self._check_serving_on_disk(model, [v for v in status.versions if v.version in live])
            await self._notify(model)
        if not self._live.get(model):
            self._raise_absent(model, None)
        failed = [
            s for s in (self._states.get((model, v)) for v in sorted(wanted)) if s and s.state == UNAVAILABLE
        ]
        if failed and retry_failed:
            reasons = "; ".join(f"version {s.version} failed to load: {s.reason}" for s in failed)
            raise ModelLoadError(f"model {model!r}: {reasons}; still serving {sorted(self._live[model])}")

    async def unload(self, model: str) -> None:
        """Drain and unload every version of `model` (NOT_FOUND if it is not known)."""
        _check_name(model)
        if model not in self._live and not any(m == model for m, _ in self._states):
            raise ModelNotFoundError(f"model {model!r} is not loaded")
        async with self.lock(model):
            await self._rollouts.drop(model)
            for version in sorted(self._live.get(model, {})):
                await self._retire(model, version)
            for key in [k for k in self._states if k[0] == model]:
                del self._states[key]
            self._live.pop(model, None)
            self._model_errors[model] = "unloaded (RepositoryModelLoad brings it back)"
            self._unloaded.add(model)
            await self._notify(model)

    async def _bring_up_new(
        self, model: str, found: Mapping[int, VersionStatus], wanted: set[int], *, retry_failed: bool,
        promote: bool,
    ) -> None:  # fmt: skip
        """Bring up the selected versions not yet live: at once, or the newest as a candidate."""
        live = self._live.setdefault(model, {})
        new = sorted(wanted - set(live))
        rollouts = self._rollouts
        candidate = rollouts.candidates.get(model)
        if candidate is not None:
            if promote and candidate.version in wanted:
                await rollouts.promote(candidate, candidate.tally.summary(), result="forced")
                return
            if candidate.version != max(new, default=None):
                await rollouts.reject(candidate, "superseded by a newer version or no longer selected")
            else:
                return  # still shadowing
        if rollouts.policy(model) is not None and live and not promote:
            if new:
                await self._maybe_candidate(found[new[-1]], wanted, retry_failed=retry_failed)
            return
        for version in new:
            previous = self._states.get((model, version))
            if retry_failed or previous is None or previous.state != UNAVAILABLE:
                rollouts.rejected.pop((model, version), None)
                await self._load_version(found[version])

    async def _maybe_candidate(self, found: VersionStatus, wanted: set[int], *, retry_failed: bool) -> None:
        """Load `found` as a candidate unless polling already saw it fail or rejected these very files."""
        previous = self._states.get((found.model, found.version))
        if not retry_failed and previous is not None:
            if previous.state == UNAVAILABLE:
                return
            rejected = self._rollouts.rejected.get((found.model, found.version))
            if previous.state == REJECTED and rejected == _files(found):
                return
        loaded = await self._load_or_fail(found)
        if loaded is not None:
            self._rollouts.start(loaded, wanted=frozenset(wanted), fingerprint=_files(found))

    # -- the routing table a rollout changes (serving.grpc.shadow.RoutingTable) -------------------

    @property
    def stopped(self) -> bool:
        """The server is shutting down."""
        return self._stopped

    def lock(self, model: str) -> asyncio.Lock:
        """The lock every load, unload and verdict of `model` holds."""
        return self._locks.setdefault(model, asyncio.Lock())

    def route(self, loaded: LoadedVersion) -> None:
        """Make `loaded` routable and READY."""
        self._live.setdefault(loaded.model, {})[loaded.version] = loaded
        self._states[(loaded.model, loaded.version)] = VersionState(loaded.model, loaded.version, READY)
        self._mark_ready(loaded)

    def mark(self, model: str, version: int, state: str, reason: str = "") -> None:
        """Set the version's index entry."""
        self._states[(model, version)] = VersionState(model, version, state, reason)

    def serving(self, model: str) -> list[int]:
        """The routable versions of `model`, ascending."""
        return sorted(self._live.get(model, {}))

    async def retire_except(self, model: str, keep: frozenset[int]) -> None:
        """Retire the versions of `model` not in `keep`, then tell the listeners."""
        for old in sorted(set(self._live.get(model, {})) - keep):
            await self._retire(model, old)
            self._states.pop((model, old), None)  # gone from the index now, as a scan would drop it
        await self._notify(model)

    async def _load_version(self, found: VersionStatus) -> None:
        loaded = await self._load_or_fail(found)
        if loaded is not None:
            self.route(loaded)

    async def _load_or_fail(self, found: VersionStatus) -> LoadedVersion | None:
        """The version loaded and warmed (state LOADING), or None with it UNAVAILABLE and said."""
        model, version = found.model, found.version
        state = self._states[(model, version)] = VersionState(model, version, LOADING)
        self._set_metric_state(model, version, "loading")
        try:
            loaded = await self._bring_up(found)
        except (KilnError, ValueError, OSError) as exc:  # the repository's errors are KilnErrors
            state.state, state.reason = UNAVAILABLE, str(exc)
            self._set_metric_state(model, version, "failed")
            serving = sorted(self._live.get(model, {}))
            self._warn_once(
                ("load", model, version),
                state.reason,
                "model %s v%d failed to load: %s%s",
                model,
                version,
                exc,
                f"; still serving {serving}" if serving else "",
            )
            return None
        self._warned.pop(("load", model, version), None)  # a later failure is news again
        return loaded

    def _mark_ready(self, loaded: LoadedVersion) -> None:
        """Metrics and log of a version that now serves."""
        model, version = loaded.model, loaded.version
        self._set_metric_state(model, version, "ready")
        if self._metrics is not None:
            self._metrics.track_queue_depth(model, str(version), lambda: loaded.batcher.queue_depth)
        self._report_artefact(loaded)

    def _report_artefact(self, loaded: LoadedVersion) -> None:
        """Log (and put in kiln_model_artefact_info) what a version serves, and why."""
        tuning, options = loaded.handle.tuning, loaded.handle.options
        threads = options.threads_per_instance if options is not None else 0
        layout = (threads, loaded.backend.instances)
        chosen_by = "rule" if tuning is None else ("cached" if tuning.cached else "measured")
        if self._metrics is not None:
            art = loaded.artefact
            self._metrics.set_artefact(
                loaded.model, str(loaded.version), art.path, art.precision, layout, chosen_by
            )
        why = f": precision auto, {tuning.reason}" + (" (cached)" if tuning.cached else "") if tuning else ""
        log.info("model %s v%d ready (%s%s)", loaded.model, loaded.version, loaded.artefact.path, why)

    async def _bring_up(self, found: VersionStatus) -> LoadedVersion:
        """The model handle (choose the artefact, verify its sha256, load, warm up), then its batcher."""
        resolved = from_scan(found)  # kiln.json as the scan read it: one read per load
        cfg = self.config
        options = backend_options(cfg)
        handle = await asyncio.to_thread(
            ModelHandle.open, resolved, artefact_choice(cfg), options=options, null_timing=null_timing(cfg)
        )
        try:
            return await self._start_batcher(handle)
        except BaseException:
            handle.close()
            raise

    async def _start_batcher(self, handle: ModelHandle) -> LoadedVersion:
        cfg, backend = self.config, handle.backend
        max_batch = min(cfg.max_batch_size or backend.max_batch_size, backend.max_batch_size)
        if cfg.warmup:  # before the batcher exists, so warm-up never counts in statistics or metrics
            await asyncio.to_thread(handle.warm_up, sorted({1, max_batch}))
        model, version = handle.model, str(handle.version)
        stats = ModelStats(model, version)
        extra = self._metrics.batch_observer(model, version) if self._metrics else None
        recorder = prediction_metrics(
            self._metrics,
            cfg.prediction_classes,
            cfg.drift_window,
            flush_interval_s=cfg.prediction_flush_interval_s,
            max_pending_rows=cfg.prediction_pending_max_rows,
            max_pending_bytes=cfg.prediction_pending_max_bytes,
        )
        target_ms = cfg.for_model(model).latency_target_ms  # per model (model_overrides)
        tap = None if recorder is None else PredictionTap(recorder)
        shadow_tap = self._rollouts.tap(model, handle.version)  # copies to a candidate (promotion: shadow)
        batcher = DynamicBatcher(
            backend,
            max_batch_size=max_batch,
            max_queue_delay_us=cfg.max_queue_delay_us,
            latency_target_us=None if target_ms is None else int(target_ms * 1000),
            taps=[t for t in (tap, shadow_tap) if t is not None],
            preferred_batch_sizes=[b for b in cfg.preferred_batch_sizes if b <= max_batch],
            max_queue_size=cfg.max_queue_size,
            max_queue_per_client=cfg.queue_per_client(),
            observer=VersionObserver(stats, extra),
            name=model,
            solo=self._solo,
            pipeline=cfg.batch_pipelining,
        )
        loaded = LoadedVersion(handle, batcher, stats)
        if tap is not None:
            tap.loaded = loaded
        batcher.start()
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
        await asyncio.to_thread(loaded.handle.close)
        if self._metrics is not None:
            self._metrics.forget(model, str(version))
        self._set_metric_state(model, version, "unloaded")
        log.info("model %s v%d unloaded", model, version)

    def _warn_once(self, key: tuple[str, str, int], reason: str, message: str, *args: object) -> None:
        """WARNING unless this reason was already said for `key` (a version of a repository model)."""
        if self._warned.get(key) != reason:
            self._warned[key] = reason
            log.warning(message, *args)

    def _check_serving_on_disk(self, model: str, on_disk: Sequence[VersionStatus]) -> None:
        """Say (once) when a serving version's kiln.json is gone or broken; it keeps serving.

        The loaded copy answers on, but a restart would not bring it back: its index entry says so
        in `reason` until the folder is whole again.
        """
        for found in on_disk:
            state, key = self._states.get((model, found.version)), ("disk", model, found.version)
            if state is None or state.state != READY:
                continue
            if found.error:
                state.reason = f"serving the copy loaded earlier, but on disk: {found.error}"
                self._warn_once(key, found.error, "model %s v%d: %s", model, found.version, state.reason)
            elif self._warned.pop(key, None) is not None:
                state.reason = ""
                log.info("model %s v%d: its folder is whole again", model, found.version)

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
            try:
                names = set(self.config.models) or set(await asyncio.to_thread(self.repository.model_names))
            except OSError as exc:
                log.warning("poll: cannot list the repository: %s", exc)
                continue
            for name in sorted((names | set(self._live)) - self._unloaded):
                try:
                    await self.load(name, retry_failed=False)
                except (KilnError, OSError) as exc:
                    log.debug("poll: %s", exc)

    def hurry(self) -> None:
        """Every batcher stops waiting for fuller batches (the server is draining)."""
        for loaded in self.loaded():
            loaded.batcher.hurry()

    def fail_queued(self) -> None:
        """Answer every queued request of every version UNAVAILABLE (the drain's time is up)."""
        for loaded in self.loaded():
            loaded.batcher.fail_queued(f"model {loaded.model!r} stopped: the server is shutting down")

    async def close(self, *, drain: bool = True) -> None:
        """Stop every batcher (draining queued work) and close every backend."""
        self._stopped = True
        await self._rollouts.close()
        for model in list(self._live):
            for version in sorted(self._live.get(model, {})):
                loaded = self._live[model].pop(version)
                await loaded.batcher.stop(drain=drain)
                await asyncio.to_thread(loaded.handle.close)
        self._live.clear()


def _files(found: VersionStatus) -> tuple[str, ...]:
    """What identifies a version's files: its artefacts' checksums as kiln.json states them."""
    return tuple(a.sha256 for a in found.manifest.artefacts) if found.manifest is not None else ()


def _check_name(model: str) -> None:
    """InvalidInputError unless `model` is a safe repository folder name (no '/', '..', NUL...)."""
    try:
        check_model_name(model)
    except RepositoryError as exc:
        raise InvalidInputError(str(exc)) from None
