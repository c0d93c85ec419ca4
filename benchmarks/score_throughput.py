"""`kiln score` local engine vs the bare in-process backend on the same images (this CPU).

    .venv/bin/python benchmarks/score_throughput.py                        # ResNet-20 + ResNet-50 (minutes)
    .venv/bin/python benchmarks/score_throughput.py --models resnet20 --images 256   # a smoke run
    .venv/bin/python benchmarks/score_throughput.py --decode                # + threads vs processes

What is compared, for each model (random weights, BN folded, FP32 ONNX, published into a
temporary repository exactly as `kiln export` would):
- bare backend: serving.runtime.backends on arrays decoded and normalised beforehand (no file I/O, no
  decode), in batches of `--batch-size`: the ceiling the engine can reach.
- local engine: `kiln score`'s whole job (read files, decode JPEG, resize, crop, normalise, infer,
  top-k, Parquet shards, ledger) on the same images, same backend options and batch size; the
  clock covers `ScoreJob.run` (model loading excluded, as for the bare backend).
The ratio engine / bare shows what decoding and writing cost. Images are photo-like JPEGs
(400x300 for ResNet-50: resize 256, crop 224; 40x32 for ResNet-20: resize 32, crop 32).

`--decode` also measures decode+preprocess alone with 1 and 2 threads and with a 2-process pool
(arrays pickled back), the measurement behind the engine's choice of threads.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from benchmarks.engine_lib import publish_random
from benchmarks.machine import describe_cpu

MODELS = {  # name: (input size, resize, image width x height, classes)
    "resnet20": (32, 32, (40, 32), 10),
    "resnet50": (224, 256, (400, 300), 1000),
}


def make_images(folder: Path, count: int, size: tuple[int, int]) -> list[Path]:
    """Photo-like JPEGs (smooth noise scaled up), quality 90."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        base = rng.integers(0, 256, size=(max(1, size[1] // 8), max(1, size[0] // 8), 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(base).resize(size, Image.Resampling.BILINEAR).save(buffer, "JPEG", quality=90)
        path = folder / f"img{i:06d}.jpg"
        path.write_bytes(buffer.getvalue())
        paths.append(path)
    return paths


def bare_backend(repo: Path, name: str, paths: list[Path], batch: int, repeat: int) -> float:
    """Images/s of the backend alone on pre-decoded arrays (median of `repeat` passes)."""
    from serving.scoring.model import ScoringModel

    model = ScoringModel.open(repo, name, None, top_k=5)
    rows = np.stack([model.preprocessor.preprocess(p.read_bytes()) for p in paths])
    model.backend.infer({"input": rows[:batch]})  # warm-up
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        for first in range(0, len(rows), batch):
            model.backend.infer({"input": rows[first : first + batch]})
        times.append(time.perf_counter() - start)
    model.close()
    return len(rows) / statistics.median(times)


def local_engine(
    repo: Path, name: str, images: Path, work: Path, batch: int, workers: int, repeat: int
) -> float:
    """Images/s of a whole `kiln score` job (median of `repeat` fresh jobs)."""
    from serving.scoring.job import ScoreConfig, prepare_job

    speeds = []
    for i in range(repeat):
        config = ScoreConfig(
            repo=repo, model=name, inputs=str(images), output=work / f"out-{name}-{i}",
            batch_size=batch, workers=workers, shard_size=10_000, progress=False,
        )  # fmt: skip
        job = prepare_job(config)
        try:
            speeds.append(job.run().images_per_s)
        finally:
            job.close()
    return statistics.median(speeds)


def _decode_chunk(args: tuple[str, list[str]]) -> np.ndarray:
    from serving.contract.manifest import read_manifest
    from serving.runtime.preprocess import Preprocessor

    manifest_path, paths = args
    pre = Preprocessor(read_manifest(manifest_path).input)
    return np.stack([pre.preprocess(Path(p).read_bytes()) for p in paths])


def decode_rates(repo: Path, name: str, paths: list[Path], batch: int) -> dict[str, float]:
    """Decode+preprocess images/s: 1 thread, 2 threads, 2 processes (arrays pickled back)."""
    manifest = str(next((repo / name).glob("*/kiln.json")))
    chunks = [(manifest, [str(p) for p in paths[i : i + batch]]) for i in range(0, len(paths), batch)]
    rates = {}
    pools: dict[str, Executor] = {
        "1 thread": ThreadPoolExecutor(1),
        "2 threads": ThreadPoolExecutor(2),
        "2 processes": ProcessPoolExecutor(2),
    }
    for label, pool in pools.items():
        with pool:
            list(pool.map(_decode_chunk, chunks[:2]))  # warm-up (process start, imports)
            start = time.perf_counter()
            list(pool.map(_decode_chunk, chunks))
            rates[label] = len(paths) / (time.perf_counter() - start)
    return rates


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet20,resnet50", help="comma-separated (default %(default)s)")
    parser.add_argument(
        "--images", type=int, help="images per model (default: 2048 ResNet-20, 256 ResNet-50)"
    )
    parser.add_argument("--batch-size", type=int, help="default: 64 ResNet-20, 16 ResNet-50")
    parser.add_argument("--workers", type=int, default=2, help="engine decode threads (default %(default)s)")
    parser.add_argument(
        "--repeat", type=int, default=3, help="passes; the median is reported (default %(default)s)"
    )
    parser.add_argument("--decode", action="store_true", help="also measure decode threads vs processes")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {sorted(MODELS)}")
    import onnxruntime

    lines = [
        f"machine: {describe_cpu()} ({len(__import__('os').sched_getaffinity(0))} CPUs), "
        f"date: {dt.date.today().isoformat()}, python {platform.python_version()}, "
        f"onnxruntime {onnxruntime.__version__}",
        f"command: {' '.join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])}",
        "",
        "| model | input | images | batch | workers | bare backend img/s | local engine img/s | ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    decode_lines = []
    with tempfile.TemporaryDirectory(prefix="kiln-score-bench-") as tmp:
        work = Path(tmp)
        for name in names:
            size, resize, image_size, classes = MODELS[name]
            count = args.images or (2048 if name == "resnet20" else 256)
            batch = args.batch_size or (64 if name == "resnet20" else 16)
            max_batch = max(batch, 64)
            publish_random(
                work / "repo", name, size=size, classes=classes, resize=resize, max_batch=max_batch
            )
            paths = make_images(work / f"images-{name}", count, image_size)
            bare = bare_backend(work / "repo", name, paths, batch, args.repeat)
            engine = local_engine(
                work / "repo", name, work / f"images-{name}", work, batch, args.workers, args.repeat
            )
            lines.append(
                f"| {name} | {size}² (JPEG {image_size[0]}x{image_size[1]}) | {count} | {batch} | "
                f"{args.workers} | {bare:.1f} | {engine:.1f} | {engine / bare:.1%} |"
            )
            print(lines[-1], file=sys.stderr, flush=True)
            if args.decode:
                rates = decode_rates(work / "repo", name, paths, batch)
                decode_lines.append(f"| {name} | " + " | ".join(f"{rates[k]:.0f}" for k in rates) + " |")
    if decode_lines:
        header = "| model | 1 thread | 2 threads | 2 processes |"
        lines += ["", "decode + preprocess only, images/s:", "", header, "|---|---|---|---|", *decode_lines]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
