"""`precision: auto` on a CPU: the fastest artefact that passed the gate, measured on this machine.

Which artefact is fastest depends on the CPU far more than on the model: INT8 gains most where
the CPU has VNNI or AMX and little on AVX2 alone, and FP16 runs through FP32 casts on ONNX
Runtime's CPU provider (figures: benchmarks/RESULTS.md, RESULTS-zoo.md, RESULTS-tuning.md). So
instead of a rule, each eligible ONNX artefact of the version is run
briefly (a bounded time per artefact and layout) at the batch sizes the batcher forms, with each
threads × instances layout the cores allow unless those are set, and the fastest wins.

Eligible: ONNX artefacts whose parity passed the gate. An artefact published past its tolerance
with `--force` is never chosen automatically (an explicit `precision:` still loads it).

The result is cached beside the repository (`.kiln-tuning.json`), keyed by the machine (CPU
model, its ISA flags that matter here, core count, ONNX Runtime version) and the artefacts'
sha256, so a restart does not measure again and a new CPU or a new artefact does.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from serving.contract.manifest import Artefact, Manifest
from serving.runtime.backends import FULL_BATCHES, BackendOptions, load_backend, zero_inputs

__all__ = ["CACHE_FILE", "Layout", "Machine", "Trial", "TuningChoice", "eligible", "this_machine", "tune"]

log = logging.getLogger(__name__)

CACHE_FILE = ".kiln-tuning.json"
# ISA features that decide which precision is fastest (VNNI/AMX: INT8 dot products; BF16/FP16).
_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16", "amx_int8", "amx_bf16")


@dataclass(frozen=True)
class Machine:
    """What the measurement depends on; its key is part of the cache key."""

    cpu: str
    flags: tuple[str, ...]
    cores: int
    onnxruntime: str

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


def this_machine() -> Machine:
    """The CPU model, its relevant ISA flags and usable cores, and the ONNX Runtime version."""
    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                cpu = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:  # not Linux: the model name from platform is the best there is
        pass
    import onnxruntime

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return Machine(cpu, tuple(f for f in _FLAGS if f in flags), cores, onnxruntime.__version__)


@dataclass(frozen=True)
class Layout:
    """Intra-op threads per instance × instances."""

    threads: int
    instances: int


@dataclass(frozen=True)
class Trial:
    """One artefact in one layout: images per second at each measured batch size."""

    path: str
    precision: str
    layout: Layout
    images_per_s: dict[int, float]

    @property
    def score(self) -> float:
        """Geometric mean over the batch sizes: no one size dominates the choice."""
        rates = np.array(list(self.images_per_s.values()), dtype=np.float64)
        return float(np.exp(np.log(np.maximum(rates, 1e-9)).mean()))


@dataclass(frozen=True)
class TuningChoice:
    """What `precision: auto` serves, and the table it was chosen from."""

    path: str
    precision: str
    layout: Layout
    reason: str
    machine: Machine
    trials: tuple[Trial, ...] = field(default=())
    cached: bool = False


def batch_sizes_for(max_batch_size: int) -> tuple[int, ...]:
    """The batch sizes the choice is measured at: a lone request, a typical batch, a full one."""
    return tuple(sorted({1, min(8, max_batch_size), max_batch_size}))


def eligible(manifest: Manifest) -> list[Artefact]:
    """ONNX artefacts whose parity passed (forced ones never qualify for an automatic choice)."""
    return [
        a
        for a in manifest.artefacts
        if a.format == "onnx" and (a.parity is None or (a.parity.passed and not a.parity.forced))
    ]


def layouts(cores: int, threads: int | None, instances: int | None) -> list[Layout]:
    """The layouts to try: the explicit one, or all threads in one instance vs one per instance."""
    if threads or instances:
        inst = instances or 1
        return [Layout(threads or max(1, cores // inst), inst)]
    return [Layout(cores, 1)] if cores < 2 else [Layout(cores, 1), Layout(1, cores)]


def _measure(
    manifest: Manifest,
    version_dir: Path,
    artefact: Artefact,
    layout: Layout,
    batch_sizes: Sequence[int],
    seconds: float,
    *,
    verify: bool,
) -> Trial:
    # one session per instance: extra ones for small batches would only lengthen the measurement
    options = BackendOptions(
        device="cpu", instances=layout.instances, intra_op_threads=layout.threads, **FULL_BATCHES
    )
    # nothing unverified is ever run: `kiln bench` calls tune() without having verified
    backend = load_backend(manifest, artefact, version_dir=version_dir, options=options, verify=verify)
    try:
        rates = {}
        for rows in batch_sizes:
            inputs = zero_inputs(backend.inputs, rows)
            backend.infer(inputs)  # first call per shape pays allocation: not measured
            rates[rows] = rows * _calls_per_second(backend.infer, inputs, layout.instances, seconds)
        return Trial(artefact.path, artefact.precision, layout, rates)
    finally:
        backend.close()


def _calls_per_second(infer, inputs, workers: int, seconds: float) -> float:  # type: ignore[no-untyped-def]
    """Calls per second of `infer` from `workers` threads (one per instance) for about `seconds`."""
    counts = [0] * workers
    stop_at = time.perf_counter() + seconds

    def loop(i: int) -> None:
        while time.perf_counter() < stop_at:
            infer(inputs)
            counts[i] += 1

    start = time.perf_counter()
    threads = [threading.Thread(target=loop, args=(i,)) for i in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - start)


def _cache_key(
    machine: Machine, artefacts: Sequence[Artefact], batch_sizes: Sequence[int], lay: list[Layout]
) -> str:
    parts = [machine.key(), *sorted(a.sha256 for a in artefacts), repr(list(batch_sizes)), repr(lay)]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_cache(path: Path, key: str, choice: TuningChoice) -> None:
    """Best effort, atomic: a read-only repository (a mounted volume) just measures again next time."""
    data = _read_cache(path)
    data[key] = asdict(choice) | {"cached": False}
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        log.info("tuning result not cached (%s): the next start measures again", exc)
        tmp.unlink(missing_ok=True)


def _from_dict(data: dict) -> TuningChoice:
    def trial(t: dict) -> Trial:
        rates = {int(k): float(v) for k, v in t["images_per_s"].items()}
        return Trial(t["path"], t["precision"], Layout(**t["layout"]), rates)

    return TuningChoice(
        path=data["path"],
        precision=data["precision"],
        layout=Layout(**data["layout"]),
        reason=data["reason"],
        machine=Machine(**{**data["machine"], "flags": tuple(data["machine"]["flags"])}),
        trials=tuple(trial(t) for t in data["trials"]),
        cached=True,
    )


def tune(
    manifest: Manifest,
    version_dir: str | os.PathLike[str],
    *,
    batch_sizes: Sequence[int],
    seconds_per_trial: float = 0.1,
    threads: int | None = None,
    instances: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    verified: bool = False,
) -> TuningChoice:
    """Measure (or read from the cache) and choose; see the module docstring.

    `batch_sizes`: the sizes the batcher will form (e.g. 1, a middle one, max_batch_size).
    `threads`/`instances`: explicit settings win; None lets the measurement choose.
    `verified`: the caller has checked every eligible artefact's sha256 (else each is checked here).
    """
    candidates = eligible(manifest)
    if not candidates:
        raise ValueError("no ONNX artefact of this version passed the gate: nothing to choose from")
    machine, version_dir = this_machine(), Path(version_dir)
    tried = layouts(machine.cores, threads, instances)
    cache = Path(cache_dir if cache_dir is not None else version_dir.parent.parent) / CACHE_FILE
    key = _cache_key(machine, candidates, batch_sizes, tried)
    if (hit := _read_cache(cache).get(key)) is not None:
        try:
            return _from_dict(hit)
        except (KeyError, TypeError, ValueError):
            log.info("ignoring an unreadable tuning cache entry in %s", cache)
    trials = tuple(
        _measure(manifest, version_dir, art, lay, batch_sizes, seconds_per_trial, verify=not verified)
        for art in candidates
        for lay in tried
    )
    best = max(trials, key=lambda t: t.score)
    fp32 = max((t for t in trials if t.precision == "fp32"), key=lambda t: t.score, default=None)
    versus = f", {best.score / fp32.score:.2f}x fp32" if fp32 is not None and best is not fp32 else ""
    reason = (
        f"fastest of {len(trials)} trials on {machine.cpu} ({', '.join(machine.flags) or 'no vnni/amx'}): "
        f"{best.precision} {best.layout.threads} threads x {best.layout.instances} instances, "
        f"{best.score:.0f} img/s{versus}"
    )
    choice = TuningChoice(best.path, best.precision, best.layout, reason, machine, trials)
    _write_cache(cache, key, choice)
    return choice
