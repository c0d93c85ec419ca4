"""One model handle: how the server and `kiln score` both bring a model version up.

    resolve (kiln.json read once) -> choose the artefact (one rule) -> verify its sha256
    -> load the backend -> warm up -> classification head

The server wraps a handle in a DynamicBatcher (serving.grpc.model_version.LoadedVersion); scoring
calls it directly (serving.scoring.model.ScoringModel). The server's repository scan has already
read kiln.json, so it starts from that `VersionStatus` (`from_scan`) instead of reading it again.
Everything that can fail raises Kiln's own errors (the repository's errors are KilnErrors too).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from serving.contract.manifest import Artefact, Manifest, ManifestError, verify_artefacts
from serving.contract.repository import (
    ModelRepository,
    ResolvedVersion,
    VersionStatus,
    VersionUnavailable,
)
from serving.contract.version_policy import VersionPolicy
from serving.errors import KilnError, ModelLoadError, ModelUnavailableError
from serving.runtime.backends import (
    Backend,
    BackendOptions,
    NullTiming,
    core_share,
    load_backend,
    zero_inputs,
)
from serving.runtime.topk import ClassificationHead
from serving.runtime.tuning import TuningChoice, batch_sizes_for, eligible, tune

__all__ = [
    "ArtefactChoice",
    "ModelHandle",
    "choose",
    "choose_artefact",
    "from_scan",
    "resolve",
    "verify",
    "warmup_inputs",
]


@dataclass(frozen=True, kw_only=True)
class ArtefactChoice:
    """What the caller asked to run on: `kiln serve`'s device/backend/precision settings, or
    `kiln score --device/--artefact`. Device "auto" chooses as "cpu" does (its CUDA use is decided
    at load time)."""

    device: str = "cpu"  # "cpu" | "cuda" | "cuda:N" | "auto"
    backend: str = "auto"  # "auto" | "onnxruntime" | "tensorrt" | "null" (chooses as "auto")
    precision: str = "auto"  # "auto" | "fp32" | "fp16" | "int8"
    artefact: str | None = None  # an explicit file name of the version wins over the rule
    # precision "auto" on a CPU measures the artefacts that passed the gate (runtime/tuning.py);
    # explicit threads/instances are kept, unset ones are measured too
    measure: bool = True
    threads: int | None = None
    instances: int | None = None


def choose_artefact(manifest: Manifest, choice: ArtefactChoice) -> Artefact:
    """The one artefact choice rule (ModelUnavailableError naming what exists if nothing fits).

    An explicit `artefact` is taken as named. Otherwise: precision "auto" is FP32 on a CPU and
    any precision on a GPU; on a GPU a TensorRT plan goes before ONNX unless the backend is
    named; the first artefact of kiln.json that fits wins.
    """
    have = [(a.path, a.format, a.precision) for a in manifest.artefacts]
    if choice.artefact is not None:
        found = next((a for a in manifest.artefacts if a.path == choice.artefact), None)
        if found is None:
            raise ModelUnavailableError(
                f"model {manifest.name!r} v{manifest.version} has no artefact {choice.artefact!r}; "
                f"have {have}",
                reason="no matching artefact",
            )
        return found
    gpu = choice.device.startswith("cuda")
    precisions = ("fp32",) if choice.precision == "auto" and not gpu else None
    if choice.precision != "auto":
        precisions = (choice.precision,)
    formats = {"onnxruntime": ("onnx",), "tensorrt": ("tensorrt_plan",)}.get(
        choice.backend, ("tensorrt_plan", "onnx") if gpu else ("onnx",)
    )
    for fmt in formats:
        for art in manifest.artefacts:
            if art.format == fmt and (precisions is None or art.precision in precisions):
                return art
    raise ModelUnavailableError(
        f"no artefact for device={choice.device} backend={choice.backend} precision={choice.precision}; "
        f"have {have}",
        reason="no matching artefact",
    )


def choose(
    resolved: ResolvedVersion, choice: ArtefactChoice, *, on_cpu: bool
) -> tuple[ResolvedVersion, Artefact, TuningChoice | None]:
    """The artefact to run, sha256-verified, and, for precision "auto" on a CPU with more than one
    artefact that passed the gate, the measurement that chose it (the fastest, and the threads x
    instances layout: serving/runtime/tuning.py). Otherwise the rule of `choose_artefact`.

    Every artefact the measurement runs is verified first: nothing unverified is ever loaded.
    """
    candidates = eligible(resolved.manifest)
    measured = (
        choice.measure
        and on_cpu
        and choice.precision == "auto"
        and choice.artefact is None
        and choice.backend in ("auto", "onnxruntime")
        and len(candidates) > 1
    )
    if not measured:
        artefact = choose_artefact(resolved.manifest, choice)
        return verify(resolved, artefact), artefact, None
    for artefact in candidates:
        resolved = verify(resolved, artefact)
    tuning = tune(
        resolved.manifest,
        resolved.path,
        batch_sizes=batch_sizes_for(resolved.manifest.max_batch_size),
        threads=choice.threads,
        instances=choice.instances,
        verified=True,  # every candidate, just above
    )
    return resolved, next(a for a in candidates if a.path == tuning.path), tuning


def resolve(
    repository: ModelRepository, model: str, version: int | None, *, policy: VersionPolicy
) -> ResolvedVersion:
    """The version `policy` selects (the highest when `version` is None), kiln.json read once;
    no artefact verified yet (`verify` does the chosen one)."""
    return repository.resolve(model, version, policy=policy, artefacts=())


def from_scan(found: VersionStatus) -> ResolvedVersion:
    """A version from a repository scan, whose kiln.json was read by the scan (not read again)."""
    if found.error is not None or found.manifest is None:
        raise VersionUnavailable(f"model {found.model!r} version {found.version}: {found.error}")
    return ResolvedVersion(
        model=found.model, version=found.version, path=found.path, manifest=found.manifest, verified=()
    )


def verify(resolved: ResolvedVersion, artefact: Artefact) -> ResolvedVersion:
    """Check `artefact`'s size and sha256 against kiln.json (VersionUnavailable on a mismatch)."""
    try:
        verify_artefacts(resolved.manifest, resolved.path, only=[artefact.path])
    except ManifestError as exc:
        raise VersionUnavailable(f"model {resolved.model!r} version {resolved.version}: {exc}") from exc
    return dataclasses.replace(resolved, verified=(*resolved.verified, artefact.path))


def warmup_inputs(backend: Backend, rows: int) -> dict[str, np.ndarray]:
    """Zero inputs of `rows` rows for every backend input (dynamic non-batch dims become 1)."""
    return zero_inputs(backend.inputs, rows)


@dataclass(eq=False)
class ModelHandle:
    """A verified, loaded artefact of one model version; see the module docstring."""

    model: str
    version: int
    manifest: Manifest  # kiln.json, as read once
    artefact: Artefact
    backend: Backend
    tuning: TuningChoice | None = None  # how precision "auto" chose, when it measured
    options: BackendOptions | None = None  # how the backend runs (after the measurement's layout)

    @classmethod
    def open(
        cls,
        resolved: ResolvedVersion,
        choice: ArtefactChoice,
        *,
        options: BackendOptions,
        null_timing: NullTiming | None = None,
    ) -> ModelHandle:
        """Choose the artefact, verify it and load it (blocking: run it off the event loop).

        In a worker of several sharing the cores, by one worker at a time (core_share): precision
        "auto" times its candidates here and the sessions time their "auto" extras, and two
        workers timing at once each read the other's load; in turn, the next worker finds the
        first's choice in the tuning cache and serves the same artefact."""
        on_cpu = options.device == "cpu" and null_timing is None
        with core_share.one_worker_at_a_time():
            verified, artefact, tuning = choose(resolved, choice, on_cpu=on_cpu)
            if tuning is not None:
                layout = tuning.layout
                options = dataclasses.replace(
                    options, instances=layout.instances, intra_op_threads=layout.threads
                )
            handle = cls.load(verified, artefact, options=options, null_timing=null_timing)
        handle.tuning, handle.options = tuning, options
        return handle

    @classmethod
    def load(
        cls,
        verified: ResolvedVersion,
        artefact: Artefact,
        *,
        options: BackendOptions,
        null_timing: NullTiming | None = None,
    ) -> ModelHandle:
        """Load an artefact `verify` has checked (`null_timing`: the timing backend, no compute)."""
        if artefact.path not in verified.verified:
            raise ModelLoadError(f"{verified.model} v{verified.version}: {artefact.path} was not verified")
        backend = load_backend(
            verified.manifest, artefact, version_dir=verified.path, options=options, null_timing=null_timing
        )
        return cls(verified.model, verified.version, verified.manifest, artefact, backend)

    @cached_property
    def head(self) -> ClassificationHead:
        """Outputs -> class scores and top-k (InvalidInputError if the model has no class output)."""
        return ClassificationHead.of(self.manifest)

    def warm_up(self, sizes: Iterable[int]) -> None:
        """One batch of zeros per size through the backend, so first-call costs (allocations,
        kernel choice) are paid before the first request; ModelLoadError if it fails. By one
        worker at a time where workers share the cores: another may be timing meanwhile."""
        with core_share.one_worker_at_a_time():
            self._warm_up(sizes)

    def _warm_up(self, sizes: Iterable[int]) -> None:
        for rows in sizes:
            try:
                outputs = self.backend.infer(warmup_inputs(self.backend, rows))
                _check_rows(outputs, rows)
            except KilnError:
                raise
            except Exception as exc:  # the backend's own error type: the version cannot serve
                raise ModelLoadError(
                    f"{self.model} v{self.version}: warm-up of {rows} rows failed: {exc}"
                ) from exc

    def close(self) -> None:
        """Release the backend."""
        self.backend.close()


def _check_rows(outputs: Mapping[str, np.ndarray], rows: int) -> None:
    for name, array in outputs.items():
        if array.ndim == 0 or array.shape[0] != rows:
            raise ModelLoadError(f"warm-up output {name!r} has batch {array.shape[:1]}, expected {rows} rows")
