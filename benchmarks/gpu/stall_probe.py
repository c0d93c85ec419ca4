"""CPU measurements that kill or confirm the scheduler and client hypotheses for the served GPU
stall (docs/gpu.md): the timing backend stands in for the H200 (each batch holds one of two
instances for the engine's ResNet-20 FP16 time, ~1 ms + 5 µs per row) and the server is driven by
perf_analyzer and by `kiln bench --server` (the Python client the H200 run used). A third probe
asks whether ONNX Runtime's `run_with_iobinding` releases the GIL while it runs.

    python benchmarks/gpu/stall_probe.py --repo REPO --model NAME [--out DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # run as a script

from benchmarks.gpu.check_served import PA_TEMPLATE, server  # noqa: E402
from benchmarks.serve_bench_lib import measure_pa  # noqa: E402


def kiln_bench(port: int, model: str, concurrency: list[int], seconds: float) -> str:
    """`kiln bench --server` (Python threads, one channel): its table as printed."""
    levels = ",".join(map(str, concurrency))
    cmd = [sys.executable, "-m", "serving.dispatch", "bench", "--server", f"127.0.0.1:{port}",
           "--model", model, "--concurrency", levels, "--seconds", str(seconds)]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    return done.stdout + done.stderr


def gil_probe(seconds: float = 2.0) -> dict[str, float]:
    """Python-loop progress in a second thread while one thread runs IOBinding batches on the
    CPU EP, relative to the same loop alone: ~1 means the run released the GIL."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((512, 512)).astype(np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x" if i == 0 else f"h{i}", "w"], [f"h{i + 1}"]) for i in range(64)]
    nodes.append(helper.make_node("Identity", ["h64"], ["y"]))
    x_info = helper.make_tensor_value_info("x", TensorProto.FLOAT, [256, 512])
    y_info = helper.make_tensor_value_info("y", TensorProto.FLOAT, [256, 512])
    graph = helper.make_graph(nodes, "chain", [x_info], [y_info], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    x = np.ones((256, 512), np.float32)

    def count(stop: threading.Event, box: list[int]) -> None:
        while not stop.is_set():
            box[0] += 1

    def loop_rate(with_runs: bool) -> float:
        stop, box = threading.Event(), [0]
        thread = threading.Thread(target=count, args=(stop, box))
        thread.start()
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            if with_runs:
                io = session.io_binding()
                io.bind_cpu_input("x", x)
                io.bind_output("y")
                session.run_with_iobinding(io)
            else:
                time.sleep(0.01)
        stop.set()
        thread.join()
        return box[0] / seconds

    alone = loop_rate(False)
    return {
        "loop_alone_per_s": alone,
        "loop_during_runs_per_s": loop_rate(True),
        "onnxruntime": ort.__version__,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "stall-probe")
    parser.add_argument("--base-us", type=int, default=1000)
    parser.add_argument("--per-row-us", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    levels, report = [1, 16, 64], {"gil": gil_probe()}
    null = [
        "--backend",
        "null",
        "--null-base-us",
        str(args.base_us),
        "--null-per-row-us",
        str(args.per_row_us),
    ]
    serve = ["--repo", str(args.repo), "--models", args.model, "--instances", "2", *null]
    pa = [a.replace("{pa}", str(ROOT / ".tools-venv" / "bin" / "kiln-perf-analyzer")) for a in PA_TEMPLATE]
    with server(serve, args.out / "server.log") as (port, _):
        cpus, window = os.sched_getaffinity(0), int(args.seconds * 1000)
        report["perf_analyzer"] = {
            c: dataclasses.asdict(measure_pa(pa, port, args.model, c, args.out, cpus, window_ms=window))
            for c in levels
        }
        report["kiln_bench"] = kiln_bench(port, args.model, levels, args.seconds)
    (args.out / "stall-probe.json").write_text(json.dumps(report, indent=1, default=str))
    print(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
