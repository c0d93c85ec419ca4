"""The GPU check in one run that fits a lent GPU's 15 minutes; its CPU mode (`--cpu`: CPU
provider, tiny model, a few seconds per step) is the same code, run by
tests/integration/test_gpu_check_cpu.py so that it cannot rot.

    bash benchmarks/gpu/run.sh                 # on the GPU machine (installs the carried wheels)
    python benchmarks/gpu/check.py --cpu --out /tmp/gpu-check-cpu

Steps, each writing its figures to OUT as it finishes (a run cut off still reports):
1. machine and versions (machine.json);
2. models: `kiln train` one epoch on synthetic images, `kiln export` with uint8 input (the
   default) and with `--fp32-input` (ResNet-20 32², ResNet-50 224²; FP32 and FP16);
3. engine sweep (check_engine.py): input x precision x NCHW/NHWC x CUDA graphs x batch 1-256;
4. served sweep (check_served.py), perf_analyzer over gRPC at concurrency 1/16/64: the batcher
   on, the batcher off (max_batch_size 1), and the timing backend holding each batch for the
   engine's own fitted device time (so the server's share is separated from the GPU's), with a
   py-spy dump and `nvidia-smi dmon` during concurrency 16.
results.json holds every figure; results.md the tables. docs/gpu.md says what each one decides.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # run as a script

from benchmarks.gpu import check_engine, check_models, check_served  # noqa: E402
from benchmarks.gpu.check_report import write_markdown  # noqa: E402


def machine() -> dict:
    """GPU, CPU and the versions that decide the figures."""
    import grpc
    import numpy
    import onnxruntime

    info = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "python": platform.python_version(),
        "cpus": len(os.sched_getaffinity(0)),
        "cpu": platform.processor() or platform.machine(),
        "onnxruntime": onnxruntime.__version__,
        "providers": onnxruntime.get_available_providers(),
        "grpcio": grpc.__version__,
        "numpy": numpy.__version__,
    }
    if shutil.which("nvidia-smi"):
        query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
        info["gpu"] = subprocess.run(query, capture_output=True, text=True).stdout.strip()
    return info


def perf_analyzer() -> str | None:
    """$KILN_PERF_ANALYZER, perf_analyzer on PATH, else the tools venv's wrapper (make tools)."""
    tools = ROOT / ".tools-venv" / "bin" / "kiln-perf-analyzer"
    found = [os.environ.get("KILN_PERF_ANALYZER"), shutil.which("kiln-perf-analyzer")]
    found.append(shutil.which("perf_analyzer"))
    return next((c for c in found if c), str(tools) if tools.is_file() else None)


class Results:
    """results.json and results.md, rewritten after every figure (a run cut off still reports)."""

    def __init__(self, out: Path) -> None:
        self.out, self.data = out, {"engine": [], "served": [], "timing": {}}

    def add(self, key: str, value: object) -> None:
        target = self.data[key]
        target.append(value) if isinstance(target, list) else target.update(value)  # type: ignore[arg-type]
        (self.out / "results.json").write_text(json.dumps(self.data, indent=1))
        write_markdown(self.data, self.out / "results.md")


def served_modes(gpu: bool, precision: str, timing: tuple[int, int]) -> dict[str, list[str]]:
    """kiln serve flags per served mode: batcher on, batcher off, timing backend (same batcher),
    and on a GPU one instance instead of two (a later flag wins)."""
    device = ["cuda:0", "--instances", "2"] if gpu else ["cpu", "--intra-op-threads", "1"]
    base = ["--device", *device, "--precision", precision]
    null = ["--backend", "null", "--null-base-us", str(timing[0]), "--null-per-row-us", str(timing[1])]
    modes = {
        "batcher": base,
        "no-batcher": [*base, "--max-batch-size", "1"],
        "timing-backend": [*base, *null],
    }
    if gpu:  # two sessions at once on one GPU vs one (docs/gpu.md, H1)
        modes["one-instance"] = [*base, "--instances", "1"]
    return modes


def run(args: argparse.Namespace) -> Results:
    """All steps; see the module docstring."""
    gpu, out, work = not args.cpu, args.out, args.out / "work"
    work.mkdir(parents=True, exist_ok=True)
    results = Results(out)
    results.add("timing", {"machine": machine()})
    specs = check_models.GPU_MODELS if gpu else check_models.CPU_MODELS
    device, batches = ("cuda:0", args.batches) if gpu else ("cpu", [1, 2, 4, 8])
    pa = perf_analyzer()
    repo = work / "repo"
    for spec in specs:
        results.add("timing", {f"prepare-{spec.name}": check_models.prepare(spec, device, work, repo)})
        rows, variants = [], check_engine.variants(gpu, spec.precisions)
        for row in check_engine.sweep(repo, spec.name, variants, batches, device, args.seconds):
            rows.append(row)
            results.add("engine", row)
        served_precision = spec.precisions[-1]  # fp16 on the GPU, fp32 on the CPU
        base = [r for r in rows if r.get("variant") == check_engine.Variant("uint8", served_precision).label]
        timing = check_engine.fit_device_time(base)
        results.add("timing", {f"device-time-{spec.name}": {"base_us": timing[0], "per_row_us": timing[1]}})
        if pa is None:
            results.add("served", {"model": spec.name, "error": "perf_analyzer not found (make tools)"})
            continue
        modes = served_modes(gpu, served_precision, timing)
        name = check_models.repo_name(spec, "uint8")
        for row in check_served.sweep(pa, repo, name, modes, args.concurrency, out, args.window_ms):
            results.add("served", row)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_out = Path(os.environ.get("OUT", ROOT / "benchmarks" / "out" / "gpu"))
    parser.add_argument("--out", type=Path, default=default_out)
    parser.add_argument("--cpu", action="store_true", help="CPU provider, tiny model (the script's test)")
    parser.add_argument("--batches", default="1,2,4,8,16,32,64,128,256")
    parser.add_argument("--seconds", type=float, default=0.2, help="per engine point")
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--window-ms", type=int, default=800, help="perf_analyzer measurement window")
    args = parser.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
