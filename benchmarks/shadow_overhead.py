"""Serving p99 with and without a shadow candidate under the same perf_analyzer load, in one run.

    .venv/bin/python benchmarks/shadow_overhead.py                    # ResNet-20, concurrency 4
    .venv/bin/python benchmarks/shadow_overhead.py --concurrency 8 --sample 0.5

One `kiln serve --promotion shadow` (polling) serves version 1 of the model; perf_analyzer (gRPC,
sync) measures it. Then version 2 (the same files re-published: it would agree) appears in the
repository, becomes a CANDIDATE that never reaches a verdict (min_requests out of reach), and
the same load is measured again while `--sample` of the computed batches are copied to it, and
once more after RepositoryModelLoad forced v2 in (no candidate: brackets the box's drift). The
issue's bound (17): the serving p99 may rise by no more than the sampled share of compute, i.e.
p99(with) <= p99(without) * (1 + sample). Appended to benchmarks/RESULTS-rollouts.md.

The model comes from `--source` (a repository holding it, e.g. the one serve_throughput.py or
precision_auto.py built); only its version 1 is copied into a scratch repository.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import os
import shutil
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without install

from benchmarks import serve_bench_lib as lib  # noqa: E402
from benchmarks.serve_throughput import input_data, model_files  # noqa: E402


def publish_copy(source: Path, repo: Path, model: str, version: int) -> None:
    """Publish version 1 of `source` as `version` of `model` in `repo` (atomically, as export does)."""
    from serving.contract.manifest import read_manifest
    from serving.contract.repository import publish_version

    src = source / model / "1"
    manifest = read_manifest(src / "kiln.json")

    def populate(tmp: Path, number: int) -> object:
        for artefact in manifest.artefacts:
            shutil.copyfile(src / artefact.path, tmp / artefact.path)
        return dataclasses.replace(manifest, version=number)

    publish_version(repo, model, populate, version=version)


def wait_for_candidate(port: int, model: str, timeout_s: float = 300.0) -> None:
    """Until RepositoryIndex shows version 2 of `model` as a CANDIDATE."""
    from serving.clients.client import KilnClient

    deadline = time.monotonic() + timeout_s
    with KilnClient(f"127.0.0.1:{port}") as client:
        while time.monotonic() < deadline:
            states = {(m.name, m.version): m.state for m in client.repository_index().models}
            if states.get((model, "2")) == "CANDIDATE":
                return
            time.sleep(0.5)
    raise RuntimeError(f"version 2 of {model} did not become a candidate in {timeout_s:g} s")


def shadow_counts(metrics_port: int) -> dict[str, float]:
    """kiln_shadow_requests_total by outcome, from the server's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    return {
        sample.labels["outcome"]: sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "kiln_shadow_requests"
        for sample in family.samples
        if sample.name.endswith("_total")
    }


Measures = list[tuple[str, lib.Measure]]


def run(args: argparse.Namespace, work: Path) -> tuple[Measures, dict[str, float], list[str]]:
    """Without a candidate, with one, and without again (v2 forced in): one server, one load, back
    to back; plus the candidate's copy counts and the commands."""
    repo = work / "repo"
    publish_copy(args.source, repo, args.model, 1)
    _, input_name, shape, _ = model_files(repo, args.model)
    data = input_data(work / "input.json", input_name, shape)
    port, metrics_port = lib.free_port(), lib.free_port()
    serve = lib.serve_command(
        port, "--repo", str(repo), "--metrics-port", str(metrics_port), "--poll-interval-s", "0.5",
        "--promotion", "shadow", "--shadow-sample", str(args.sample), "--shadow-min-requests", "10000000",
        "--shadow-timeout-s", "86400", "--repository-control")  # fmt: skip
    pa = [str(args.perf_analyzer), "-i", "grpc", "-m", "{model}", "--input-data", str(data),
          "--max-trials", "6", "-s", "10"]  # fmt: skip
    cpus = os.sched_getaffinity(0)

    def measure() -> lib.Measure:
        return lib.measure_pa(pa, port, args.model, args.concurrency, work, cpus, window_ms=args.window_ms)

    with lib.running(serve, port, cpus, work):
        measures = [("no candidate", measure())]
        publish_copy(args.source, repo, args.model, 2)
        wait_for_candidate(port, args.model)
        measures.append(("candidate", measure()))
        counts = shadow_counts(metrics_port)
        force_promotion(port, args.model)
        measures.append(("no candidate (v2 forced in)", measure()))
    pa_line = " ".join(pa) + f" -u 127.0.0.1:{port} --concurrency-range {args.concurrency}"
    return measures, counts, [" ".join(serve), pa_line]


def render(args: argparse.Namespace, measures: Measures, counts: dict, commands: list) -> str:
    """The dated markdown section; the bound is taken against the mean p99 of both runs without."""
    without = (measures[0][1].p99_ms + measures[2][1].p99_ms) / 2
    with_ = measures[1][1].p99_ms
    bound = without * (1 + args.sample)
    verdict = "within" if with_ <= bound else "OVER"
    rows = [f"| {name} | {m.throughput:.1f} | {m.p50_ms:.2f} | {m.p99_ms:.2f} | {m.compute_ms:.2f} | "
            f"{'yes' if m.stable else 'no'} | {m.load} |" for name, m in measures]  # fmt: skip
    return "\n".join([
        f"## {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC: {args.model}, concurrency {args.concurrency}, "
        f"sample {args.sample}",
        "",
        f"- Machine: {lib.cpu_summary()}; load average before the run {args.load_before}",
        f"- Versions: {lib.versions(args.perf_analyzer)}",
        f"- Commands: `{commands[0]}`; `{commands[1]}`",
        f"- Copies to the candidate during its run: {counts or 'none counted'}",
        "",
        "| server | infer/s | p50 ms | p99 ms | server compute ms | stable | load |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"Bound (issue 17): p99 with a candidate <= {without:.2f} ms (mean p99 without) x (1 + {args.sample})"
        f" = {bound:.2f} ms; measured {with_:.2f} ms ({with_ / without - 1:+.1%}): **{verdict}** the bound.",
        "",
    ])  # fmt: skip


def force_promotion(port: int, model: str) -> None:
    """RepositoryModelLoad with promote: true: v2 serves and no candidate is left."""
    from protos.inference import grpc_service_pb2 as pb
    from serving.clients.client import KilnClient

    promote = {"promote": pb.ModelRepositoryParameter(bool_param=True)}
    with KilnClient(f"127.0.0.1:{port}") as client:
        client.inference.RepositoryModelLoad(
            pb.RepositoryModelLoadRequest(model_name=model, parameters=promote)
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", type=Path, default=ROOT / "benchmarks" / "out" / "tuning-repo")
    p.add_argument("--model", default="resnet20")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--sample", type=float, default=0.25, help="shadow_sample during the second measure")
    p.add_argument("--window-ms", type=int, default=5000, help="perf_analyzer measurement window")
    p.add_argument("--perf-analyzer", type=Path, default=lib.DEFAULT_PA)
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "RESULTS-rollouts.md")
    args = p.parse_args()
    args.load_before = lib.load_average()
    with tempfile.TemporaryDirectory(prefix="kiln-shadow-bench-") as tmp:
        measures, counts, commands = run(args, Path(tmp))
    section = render(args, measures, counts, commands)
    print(section)
    if not args.results.exists():
        args.results.write_text("# Shadow rollouts: serving p99 with and without a candidate\n\n")
    with args.results.open("a") as f:
        f.write(section + "\n")


if __name__ == "__main__":
    main()
