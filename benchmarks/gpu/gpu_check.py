"""GPU proof on a lent H100/H200, in one run: ONNX Runtime CUDA EP engine figures beside PyTorch
eager, numerical parity against the CPU reference, then `kiln serve --device cuda` under load.

    bash benchmarks/gpu/run.sh        # on the GPU machine: installs carried wheels, then this

Steps (each appends to OUT/gpu-results.md as it finishes, so a cut-off run still reports):
1. `kiln train` (on the GPU) + `kiln export --precision fp32,fp16` for CIFAR ResNet-20 at 32²
   and ResNet-50 at 224² (synthetic data, 10 classes: the figures are about speed and parity);
2. engine figures per precision and batch: Kiln's ORT CUDA backend (IOBinding + pinned staging;
   CUDA graphs as a second variant) and PyTorch eager (channels_last; FP16 = `.half()`);
3. parity: CUDA EP vs CPU EP on the same held-out-like inputs (max |Δlogit|, top-1 agreement);
4. served: `kiln serve --device cuda:0` and `kiln bench --server` at concurrency 1/16/64.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
PY = sys.executable

MODELS = {  # name -> (preset, image size)
    "resnet20": ("resnet20", 32),
    "resnet50": ("resnet50", 224),
}


def log(out: Path, text: str) -> None:
    print(text, flush=True)
    with (out / "gpu-results.md").open("a", encoding="utf-8") as fh:
        fh.write(text + "\n")


def sh(cmd: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def prepare(name: str, work: Path, repo: Path, out: Path) -> bool:
    preset, size = MODELS[name]
    runs = work / "runs"
    train = [PY, "-m", "serving.dispatch", "train", "--model", preset, "--data", "synthetic",
             "--channels", "3", "--image-size", str(size), "--num-samples", "640", "--num-classes", "10",
             "--epochs", "1", "--batch-size", "64", "--device", "cuda", "--runs-dir", str(runs),
             "--name", name, "--no-progress"]  # fmt: skip
    export = [PY, "-m", "serving.dispatch", "export", str(runs / name), "--repo", str(repo), "--name", name,
              "--precision", "fp32,fp16", "--max-batch", "256", "--fp32-input", "--no-progress"]  # fmt: skip
    for cmd in (train, export):
        t0 = time.perf_counter()
        res = sh(cmd, 900)
        took = time.perf_counter() - t0
        tail = (res.stdout + res.stderr).strip().splitlines()[-12:]
        log(out, f"- `{' '.join(cmd[2:5])} …` rc={res.returncode} in {took:.1f} s")
        if res.returncode != 0:
            log(out, "```\n" + "\n".join(tail) + "\n```")
            return False
    log(out, "```\n" + "\n".join(res.stdout.strip().splitlines()[-12:]) + "\n```")
    return True


def timed(call, seconds: float) -> tuple[float, float]:
    """(calls/s, p99 latency ms) of `call` run back to back for `seconds` after a warm-up."""
    for _ in range(5):
        call()
    lat = []
    stop = time.perf_counter() + seconds
    while time.perf_counter() < stop or len(lat) < 10:
        t0 = time.perf_counter()
        call()
        lat.append(time.perf_counter() - t0)
    arr = np.asarray(lat)
    return len(arr) / arr.sum(), float(np.percentile(arr, 99) * 1e3)


VARIANTS = {  # column -> (precision, BackendOptions fields)
    "ORT CUDA fp32": ("fp32", {}),
    "fp32 + graphs": ("fp32", {"cuda_graphs": True}),
    "ORT CUDA fp16": ("fp16", {}),
    "fp16 + graphs": ("fp16", {"cuda_graphs": True}),
    "fp16 NHWC": ("fp16", {"cuda_prefer_nhwc": True}),
    "fp16 NHWC + graphs": ("fp16", {"cuda_prefer_nhwc": True, "cuda_graphs": True}),
}


def engine(name: str, repo: Path, batches: list[int], seconds: float, out: Path, results: dict) -> None:
    import torch

    from serving.contract.repository import ModelRepository
    from serving.runtime.backends import BackendOptions, load_backend
    from training.checkpoint import load_model

    resolved = ModelRepository(repo).resolve(name, None)
    model, _ = load_model(ROOT / "benchmarks" / "out" / "gpu-work" / "runs" / name, which="best")
    model = model.eval().cuda().to(memory_format=torch.channels_last)
    _, size = MODELS[name]
    rng = np.random.default_rng(0)
    log(
        out,
        f"\n### {name} ({size}x{size}), engine only, images/s (p99 ms per batch); host arrays in and out\n",
    )
    log(out, "| batch | " + " | ".join(VARIANTS) + " | torch eager fp32 | torch eager fp16 |")
    log(out, "|---" * (len(VARIANTS) + 3) + "|")
    backends = {}
    for column, (precision, fields) in VARIANTS.items():
        art = resolved.manifest.find_artefact("onnx", precision)
        try:
            opts = BackendOptions(device="cuda:0", **fields)
            backends[column] = load_backend(resolved.manifest, art, version_dir=resolved.path, options=opts)
        except Exception as exc:  # report the variant, keep the others
            log(out, f"- {column}: load failed: {exc!r}")
    in_name = resolved.manifest.input.name
    for batch in batches:
        x = rng.standard_normal((batch, 3, size, size)).astype(np.float32)
        row = []
        for column in VARIANTS:
            be = backends.get(column)
            if be is None:
                row.append("-")
                continue
            feed = {in_name: x.astype(np.float16) if be.inputs[0].datatype == "FP16" else x}
            ips, p99 = timed(lambda b=be, f=feed: b.infer(f), seconds)
            row.append(f"{ips * batch:,.0f} ({p99:.2f})")
            results[f"{name}/{column}/b{batch}"] = ips * batch
        xt = torch.from_numpy(x).cuda().to(memory_format=torch.channels_last)
        for half in (False, True):
            m = model.half() if half else model.float()
            inp = xt.half() if half else xt

            def step(m=m, inp=inp) -> None:
                with torch.inference_mode():
                    m(inp)
                torch.cuda.synchronize()

            ips, p99 = timed(step, seconds)
            row.append(f"{ips * batch:,.0f} ({p99:.2f})")
            results[f"{name}/torch-eager-{'fp16' if half else 'fp32'}/b{batch}"] = ips * batch
        model.float()
        log(out, f"| {batch} | " + " | ".join(row) + " |")
    # parity: CUDA EP vs CPU EP on the same inputs (the export gate already compared CPU vs PyTorch)
    x = rng.standard_normal((32, 3, size, size)).astype(np.float32)
    log(out, "\nParity on 32 random inputs vs ORT CPU fp32 (max |Δlogit| / max |logit|, top-1 agreement):\n")
    fp32 = resolved.manifest.find_artefact("onnx", "fp32")
    cpu = load_backend(resolved.manifest, fp32, version_dir=resolved.path)
    ref = next(iter(cpu.infer({in_name: x}).values()))
    cpu.close()
    for column, be in backends.items():
        feed = {in_name: x.astype(np.float16) if be.inputs[0].datatype == "FP16" else x}
        got = next(iter(be.infer(feed).values())).astype(np.float32)
        diff = float(np.abs(got - ref).max())
        agree = float((got.argmax(1) == ref.argmax(1)).mean())
        scale = float(np.abs(ref).max())
        log(out, f"- {column}: max |Δ| {diff:.2e} of max |logit| {scale:.2e}, top-1 agreement {agree:.3f}")
        results[f"{name}/parity/{column}"] = {"max_abs": diff, "max_logit": scale, "top1": agree}
        be.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def served(name: str, repo: Path, precision: str, out: Path, seconds: float, results: dict) -> None:
    port, mport = free_port(), free_port()
    cmd = [PY, "-m", "serving.dispatch", "serve", "--repo", str(repo), "--models", name, "--device", "cuda:0",
           "--precision", precision, "--host", "127.0.0.1", "--port", str(port), "--metrics-port", str(mport),
           "--log-level", "warning", "--instances", "2"]  # fmt: skip
    server = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        import grpc

        grpc.channel_ready_future(grpc.insecure_channel(f"127.0.0.1:{port}")).result(timeout=180)
        for batch in (1, 8):
            target = ["--server", f"127.0.0.1:{port}", "--model", name, "--concurrency", "1,16,64"]
            bench = [
                PY,
                "-m",
                "serving.dispatch",
                "bench",
                *target,
                "--batch",
                str(batch),
                "--seconds",
                str(seconds),
            ]
            res = sh(bench, 300)
            log(out, f"\n`kiln serve --device cuda:0 --precision {precision} --instances 2`, "
                     f"`kiln bench --server` batch {batch} per request (rc={res.returncode}):\n```\n"
                     f"{(res.stdout + res.stderr).strip()}\n```")  # fmt: skip
        metrics = sh(["curl", "-s", f"127.0.0.1:{mport}/metrics"], 30).stdout
        keep = [
            ln
            for ln in metrics.splitlines()
            if ln.startswith(("kiln_gpu", "kiln_batch_size_sum", "kiln_batch_size_count"))
        ]
        log(out, "```\n" + "\n".join(keep[:20]) + "\n```")
        results[f"{name}/served-{precision}"] = "see gpu-results.md"
    except Exception as exc:  # report, keep going
        log(out, f"served {name} {precision} failed: {exc!r}")
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            text, _ = server.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            text, _ = server.communicate()
        if server.returncode not in (0, -signal.SIGTERM):
            log(out, f"server exit {server.returncode}:\n```\n{text[-3000:]}\n```")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ROOT / "benchmarks" / "out")))
    p.add_argument("--models", default="resnet20,resnet50")
    p.add_argument("--batches", default="1,8,32,128,256")
    p.add_argument("--seconds", type=float, default=1.0)
    p.add_argument("--skip-served", action="store_true")
    p.add_argument("--engine-models", default=None, help="models for the engine table (default: --models)")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    work = ROOT / "benchmarks" / "out" / "gpu-work"
    repo = work / "repo"
    batches = [int(b) for b in args.batches.split(",")]
    results: dict = {}
    log(args.out, f"## GPU check {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")
    for name in args.models.split(","):
        if not (repo / name).is_dir() and not prepare(name, work, repo, args.out):
            continue
        if args.engine_models is not None and name not in args.engine_models.split(","):
            continue
        try:
            engine(name, repo, batches, args.seconds, args.out, results)
        except Exception as exc:
            log(args.out, f"engine {name} failed: {exc!r}")
        (args.out / "gpu-results.json").write_text(json.dumps(results, indent=1))
    if not args.skip_served:
        for name in args.models.split(","):
            served(name, repo, "fp16", args.out, args.seconds * 2, results)
    (args.out / "gpu-results.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
