"""uint8 vs FP32 input for an image model: bytes per request and served ResNet-50 throughput.

    .venv/bin/python benchmarks/uint8_input.py                      # ~4 min on 2 CPU cores
    .venv/bin/python benchmarks/uint8_input.py --concurrency 4,8 --window-ms 4000

One run, one machine, both inputs side by side:
- Models: one random-weight ResNet-50 (224², 1000 classes, BN statistics randomised, BN folded)
  exported to ONNX once, then wrapped the two ways `kiln export` wraps it: "r50_uint8" (the
  default: uint8 NHWC in, scale/normalise/transpose in the graph) and "r50_fp32" (`--fp32-input`:
  normalised float32 NCHW in). Their manifests come from export's own builder. The script checks
  that both files give the same logits for the same pixels before measuring.
- Bytes: the serialised KServe v2 ModelInferRequest of one 224² image (raw_input_contents, as
  tritonclient and perf_analyzer send it) and the matching response.
- Engine: in-process ONNX Runtime (2 intra-op threads) at batch 8, both files interleaved.
- Served: one `kiln serve` holding both models, perf_analyzer over gRPC with --input-data (the
  same random pixels; FP32 gets them host-normalised), models alternated at each concurrency.
Results are appended as a dated section to benchmarks/RESULTS-uint8-input.md (`--results`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
import types
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without install

from benchmarks import serve_bench_lib as lib  # noqa: E402
from benchmarks.engine_lib import interleaved_latencies, ort_session, random_model  # noqa: E402

SIZE, CLASSES = 224, 1000
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
MODELS = {"r50_uint8": True, "r50_fp32": False}  # name -> preprocessing in the graph


def host_preprocess() -> object:
    from export.inputs import HostPreprocess

    return HostPreprocess(mean=MEAN, std=STD, channels=3, height=SIZE, width=SIZE)


def publish_both(repo: Path) -> None:
    """Export the core graph once and publish it with each input (as `kiln export` would)."""
    from export.fold import fold_batchnorms
    from export.manifest_build import build_manifest
    from export.onnx_export import export_onnx, save_onnx
    from export.variants import GraphOptions, finish_graph
    from serving.contract.manifest import Artefact, Provenance
    from serving.contract.repository import publish_version
    from training.models import preset

    core = export_onnx(fold_batchnorms(random_model("resnet50", num_classes=CLASSES))[0], (3, SIZE, SIZE))
    pre = host_preprocess()
    run = types.SimpleNamespace(
        model_config=preset("resnet50", num_classes=CLASSES), class_names=[f"c{i}" for i in range(CLASSES)]
    )
    prov = Provenance(run_id="benchmark", dataset_fingerprint="0" * 64, git_commit=None,
                      created_at=dt.datetime.now(dt.UTC).isoformat(), kiln_version="benchmark")  # fmt: skip
    for name, in_graph in MODELS.items():
        graph = finish_graph(core, GraphOptions(preprocess=pre if in_graph else None))

        def populate(tmp: Path, version: int, graph=graph, in_graph=in_graph, name=name) -> object:
            save_onnx(graph, tmp / "model.onnx")
            art = Artefact.from_file(tmp, "model.onnx", format="onnx", precision="fp32")
            return build_manifest(name=name, version=version, run=run, pre=pre, in_graph=in_graph,
                                  probabilities=False, max_batch=64, artefacts=(art,), provenance=prov,
                                  extra={})  # fmt: skip

        publish_version(repo, name, populate)


def model_path(repo: Path, name: str) -> Path:
    version = max((p for p in (repo / name).iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    return version / "model.onnx"


def pixels(count: int) -> np.ndarray:
    """Photo-like uint8 NHWC pixels (smooth noise scaled up: no saturated or constant rows)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, size=(count, SIZE // 8, SIZE // 8, 3), dtype=np.uint8)
    return np.stack(
        [np.asarray(Image.fromarray(s).resize((SIZE, SIZE), Image.Resampling.BILINEAR)) for s in small]
    )


def feeds(images: np.ndarray) -> dict[str, np.ndarray]:
    """What each model takes for the same pixels."""
    host = host_preprocess()(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    return {"r50_uint8": np.ascontiguousarray(images), "r50_fp32": host}


def wire_bytes(batch: dict[str, np.ndarray]) -> dict[str, dict[str, int]]:
    """Serialised ModelInferRequest/Response sizes of one image (raw contents, as the clients send)."""
    from protos.inference import grpc_service_pb2 as pb

    out = {}
    for name, x in batch.items():
        one = x[:1]
        request = pb.ModelInferRequest(model_name=name, raw_input_contents=[one.tobytes()])
        request.inputs.add(name="input", datatype="UINT8" if x.dtype == np.uint8 else "FP32", shape=one.shape)
        logits = np.zeros(CLASSES, np.float32).tobytes()
        response = pb.ModelInferResponse(model_name=name, model_version="1", raw_output_contents=[logits])
        response.outputs.add(name="logits", datatype="FP32", shape=[1, CLASSES])
        out[name] = {"tensor": one.nbytes, "request": request.ByteSize(), "response": response.ByteSize()}
    return out


def check_and_engine(repo: Path, batch: dict[str, np.ndarray], iters: int) -> dict:
    """Same logits from both files (max |Δ| / max |logit|), then batch-8 images/s interleaved."""
    sessions = {name: ort_session(model_path(repo, name), threads=2) for name in MODELS}
    logits = {name: s.run(None, {"input": batch[name]})[0] for name, s in sessions.items()}
    diff = float(np.abs(logits["r50_uint8"] - logits["r50_fp32"]).max() / np.abs(logits["r50_fp32"]).max())
    agree = float((logits["r50_uint8"].argmax(1) == logits["r50_fp32"].argmax(1)).mean())
    calls = {name: (lambda s=s, x=batch[name]: s.run(None, {"input": x})) for name, s in sessions.items()}
    times = interleaved_latencies(calls, iters=iters, warmup=1)
    rows = len(batch["r50_uint8"])
    engine = {name: rows / float(np.median(t)) for name, t in times.items()}
    return {"rel_diff": diff, "top1_agree": agree, "engine_img_s": engine, "batch": rows}


def input_data(work: Path, batch: dict[str, np.ndarray], samples: int = 4) -> dict[str, Path]:
    """perf_analyzer --input-data files: the same `samples` images for both models."""
    paths = {}
    for name, x in batch.items():
        rows = [{"input": {"content": r.ravel().tolist(), "shape": list(r.shape)}} for r in x[:samples]]
        paths[name] = work / f"{name}-input.json"
        paths[name].write_text(json.dumps({"data": rows}))
    return paths


def served(args: argparse.Namespace, data: dict[str, Path], cpus: set[int]) -> tuple[list[dict], list[str]]:
    """perf_analyzer against one `kiln serve` holding both models, alternating at each concurrency."""
    port = lib.free_port()
    serve = lib.serve_command(port, "--repo", str(args.repo), "--models", *MODELS, "--no-metrics")
    pa = [str(args.perf_analyzer), "-i", "grpc", "-m", "{model}", "--max-trials", "3", "-s", "999"]
    templates = {name: [*pa, "--input-data", str(path)] for name, path in data.items()}
    rows = []
    with lib.running(serve, port, cpus, args.work):
        for c in args.concurrency:
            for name in MODELS:
                m: lib.Measure = lib.measure_pa(
                    templates[name], port, name, c, args.work, cpus, window_ms=args.window_ms
                )
                rows.append({"c": c, "model": name, **m.__dict__})
    commands = [
        " ".join(serve),
        " ".join(templates["r50_uint8"]) + f" -u 127.0.0.1:PORT --concurrency-range C -p {args.window_ms}",
    ]
    return rows, commands


def render(args: argparse.Namespace, res: dict) -> str:
    """The dated markdown section of this run."""
    b, e = res["bytes"], res["engine"]
    lines = [
        f"## {res['date']}: uint8 vs FP32 input, ResNet-50 224² (benchmarks/uint8_input.py)", "",
        f"- Machine: {res['cpu']}; everything pinned to CPUs {sorted(res['cpus'])}; the 2 cores are "
        "shared with other agents' jobs (1-minute load average beside each row)",
        f"- Versions: {res['versions']}",
        f"- Command: `{res['command']}`",
        *[f"- `{c}`" for c in res["commands"]],
        f"- Same pixels through both files: max |Δlogit| / max |logit| = {e['rel_diff']:.1e}, "
        f"top-1 agreement {e['top1_agree']:.0%} ({e['batch']} images)", "",
        "| input | tensor bytes / image | ModelInferRequest bytes | response bytes | engine img/s (batch "
        f"{e['batch']}, 2 threads) |", "|---|---|---|---|---|",
    ]  # fmt: skip
    for name in MODELS:
        lines.append(f"| {name} | {b[name]['tensor']:,} | {b[name]['request']:,} | {b[name]['response']:,} "
                     f"| {e['engine_img_s'][name]:.1f} |")  # fmt: skip
    lines += ["", "| concurrency | input | served inf/s | p50 ms | p99 ms | srv queue ms | srv compute ms "
              "| stable | load |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in res["served"]:
        stable = "yes" if r["stable"] else "no"
        figures = (
            f"{r['throughput']:.1f}",
            *(f"{r[k]:.0f}" for k in ("p50_ms", "p99_ms", "queue_ms", "compute_ms")),
        )
        lines.append(f"| {r['c']} | {r['model']} | {' | '.join(figures)} | {stable} | {r['load']} |")
    return "\n".join(lines) + "\n"


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=ROOT / "benchmarks" / "out" / "uint8-repo")
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "out" / "uint8-work")
    parser.add_argument("--concurrency", type=lambda s: [int(v) for v in s.split(",")], default=[4, 8])
    parser.add_argument("--window-ms", type=int, default=4000, help="perf_analyzer measurement window")
    parser.add_argument("--engine-iters", type=int, default=5)
    parser.add_argument("--perf-analyzer", type=Path, default=lib.DEFAULT_PA)
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "RESULTS-uint8-input.md")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    cpus = os.sched_getaffinity(0)
    started = time.perf_counter()
    if not all((args.repo / name).is_dir() for name in MODELS):
        publish_both(args.repo)
    batch = feeds(pixels(8))
    res = {"date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"), "cpu": lib.cpu_summary(),
           "cpus": cpus, "versions": lib.versions(args.perf_analyzer), "bytes": wire_bytes(batch),
           "command": "python benchmarks/uint8_input.py " + " ".join(argv or sys.argv[1:])}  # fmt: skip
    res["engine"] = check_and_engine(args.repo, batch, args.engine_iters)
    if res["engine"]["top1_agree"] < 1.0 or res["engine"]["rel_diff"] > 1e-4:
        print(f"the two inputs disagree: {res['engine']}", file=sys.stderr)
        return 1
    res["served"], res["commands"] = served(args, input_data(args.work, batch), cpus)
    text = render(args, res)
    print(text)
    print(f"(took {time.perf_counter() - started:.0f} s; load now {lib.load_average()})", file=sys.stderr)
    with args.results.open("a", encoding="utf-8") as fh:
        fh.write("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
