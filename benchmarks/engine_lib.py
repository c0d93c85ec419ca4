"""Shared pieces of the engine benchmarks (export_engines.py, zoo_engines.py, and the served and
scoring ones): a random-weight model, one published as `kiln export` would, ONNX Runtime CPU
sessions, and timing (one engine at a time, or interleaved)."""

from __future__ import annotations

import datetime as dt
import os
import resource
import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def random_model(name: str, **overrides: Any) -> Any:
    """Eval-mode model of preset `name` with random weights (seed 0) and randomised BN statistics.

    Fresh BN layers have mean 0 / var 1, which would make folding an identity; random statistics
    make the folded weights differ from the originals, as they do after training.
    """
    import torch

    from training.models import build_model, preset

    torch.manual_seed(0)
    model = build_model(preset(name, **overrides)).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for bn in (m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)):
            bn.running_mean.normal_(0, 0.1, generator=gen)
            bn.running_var.uniform_(0.5, 1.5, generator=gen)
    return model


def publish_random(repo: Path, name: str, *, size: int, classes: int, resize: int, max_batch: int) -> None:
    """Preset `name` with random weights (seed 0; fresh BN statistics, so folding is an identity),
    BN folded, exported to FP32 ONNX ([N, 3, size, size] in, logits out) and published into `repo`
    as `kiln export` would, with ImageNet normalisation after a resize to `resize` and a centre
    crop of `size`."""
    import torch

    from export.fold import fold_batchnorms
    from export.onnx_export import export_onnx, save_onnx
    from serving.contract.manifest import Artefact, InputSpec, Manifest, OutputSpec, Preprocessing, Provenance
    from serving.contract.repository import publish_version
    from training.models import build_model, preset

    torch.manual_seed(0)
    model = build_model(preset(name, num_classes=classes)).eval()
    proto = export_onnx(fold_batchnorms(model)[0], (3, size, size))

    def populate(tmp: Path, version: int) -> Manifest:
        save_onnx(proto, tmp / "model.onnx")
        return Manifest(
            name=name, version=version, architecture={"preset": name},
            labels=tuple(f"class{i}" for i in range(classes)),
            input=InputSpec(
                name="input", datatype="FP32", layout="NCHW", shape=(-1, 3, size, size),
                preprocessing=Preprocessing(resize=resize, crop=size, mean=IMAGENET_MEAN, std=IMAGENET_STD),
            ),
            outputs=(OutputSpec(name="logits", datatype="FP32", shape=(-1, classes)),),
            artefacts=(Artefact.from_file(tmp, "model.onnx", format="onnx", precision="fp32"),),
            max_batch_size=max_batch,
            provenance=Provenance(
                run_id="benchmark", dataset_fingerprint="0" * 64, git_commit=None,
                created_at=dt.datetime.now(dt.UTC).isoformat(), kiln_version="benchmark",
            ),
        )  # fmt: skip

    publish_version(repo, name, populate)


def ort_session(path: Path, threads: int, optimize: bool = True) -> Any:
    """ORT CPU session with `threads` intra-op threads; graph optimisations all (or none)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def throughput(fn: Callable[[], object], batch: int, iters: int, warmup: int) -> float:
    """Images per second: batch / median latency of `iters` timed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return batch / statistics.median(times)


def interleaved_latencies(
    fns: Mapping[str, Callable[[], object]], iters: int, warmup: int, settle_s: float = 0.02
) -> dict[str, list[float]]:
    """Seconds per call of each function, timed in rounds (one call of each per round).

    Interleaving makes a change of machine load hit every engine alike; the order rotates from
    round to round so no engine always runs first. The pause before each timed call lets the
    previous engine's spinning worker threads (OpenMP, ORT's pool) go idle so they do not compete
    with the next one.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    keys = list(fns)
    times: dict[str, list[float]] = {key: [] for key in keys}
    for round_ in range(iters):
        shift = round_ % len(keys)
        for key in keys[shift:] + keys[:shift]:
            fn = fns[key]
            time.sleep(settle_s)
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
    return times


class OtherCpu:
    """CPU used by everything but this process while the `with` block ran, in cores.

    The load average counts this benchmark's own threads; this does not: whole-machine busy time
    (/proc/stat, steal excluded) minus this process's user+system time. `others` and `steal`
    stay None where /proc/stat cannot be read.
    """

    def __init__(self) -> None:
        self.others: float | None = None
        self.steal: float | None = None
        self._start: tuple[float, float, float, float] | None = None

    @staticmethod
    def _snapshot() -> tuple[float, float, float, float] | None:
        try:
            first = Path("/proc/stat").read_text(encoding="ascii").split("\n", 1)[0].split()
        except OSError:
            return None
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in first[1:9])
        tick = os.sysconf("SC_CLK_TCK")
        own = resource.getrusage(resource.RUSAGE_SELF)
        busy = (user + nice + system + irq + softirq) / tick
        return time.monotonic(), busy, steal / tick, own.ru_utime + own.ru_stime

    def __enter__(self) -> OtherCpu:
        self._start = self._snapshot()
        return self

    def __exit__(self, *exc: object) -> None:
        end = self._snapshot()
        if self._start is None or end is None:
            return
        wall = max(end[0] - self._start[0], 1e-9)
        busy, steal, own = (end[i] - self._start[i] for i in (1, 2, 3))
        self.others = max(busy - own, 0.0) / wall
        self.steal = steal / wall


def load_average() -> float:
    """The 1-minute load average (0.0 where the OS has none)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return 0.0
