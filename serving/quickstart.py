"""The README's main job, from nothing to a served model, on the bundled digits:

train ResNet-20 -> export with the parity gate -> `kiln serve` -> classify held-out digits through
gRPC -> print the answers and a metrics excerpt -> SIGTERM the server.

    python -m serving.quickstart [--epochs 40] [--workdir quickstart]

Each stage runs as its own `kiln` subprocess, exactly as a user would type it, so this module
(inside torch-free `serving`) imports no training or export code.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
from rich.console import Console
from rich.table import Table

from serving.clients.client import KilnClient

MODEL = "digits"
console = Console()


def kiln(*args: str) -> list[str]:
    """The command line of a `kiln` subcommand run with this interpreter."""
    return [sys.executable, "-m", "serving.dispatch", *args]


def step(title: str, command: list[str]) -> None:
    """Run one stage, echoing the command; stop the quick start if it fails."""
    prefix = kiln()
    words = ["kiln", *command[len(prefix) :]] if command[: len(prefix)] == prefix else command
    console.rule(f"[bold]{title}")
    console.print("$ " + " ".join(shlex.quote(w) for w in words), style="dim")
    if subprocess.run(command, check=False).returncode != 0:
        raise SystemExit(f"quickstart: '{title}' failed")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_ready(client: KilnClient, server: subprocess.Popen, timeout_s: float = 120) -> None:
    """Poll health until the model is SERVING (the server warms up before it says so)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"quickstart: the server exited with code {server.returncode}")
        try:
            if client.health(MODEL) == "SERVING":
                return
        except grpc.RpcError:  # not listening yet
            pass
        time.sleep(0.2)
    raise SystemExit("quickstart: the server did not become ready in time")


def classify_samples(client: KilnClient, samples: list[Path]) -> None:
    response = client.classify(MODEL, samples, top_k=3)
    table = Table(title=f"Classify via gRPC: model {response.model} version {response.version}")
    for column in ("image", "true label", "top-1", "score", "top-3"):
        table.add_column(column)
    correct = 0
    for path, result in zip(samples, response.results, strict=True):
        truth = path.stem.rsplit("-", 1)[-1]
        best = result.predictions[0]
        correct += best.label == truth
        others = ", ".join(f"{p.label} {p.score:.3f}" for p in result.predictions)
        table.add_row(path.name, truth, best.label, f"{best.score:.4f}", others)
    console.print(table)
    console.print(f"{correct}/{len(samples)} correct")


def metrics_excerpt(port: int) -> None:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    wanted = ("kiln_requests_total", "kiln_request_duration_seconds_count", "kiln_batch_size_sum")
    console.rule("[bold]metrics excerpt")
    for line in text.splitlines():
        if line.startswith(wanted):
            console.print(line)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--workdir", type=Path, default=Path("quickstart"))
    parser.add_argument("--samples", type=int, default=12)
    args = parser.parse_args(argv)
    work = args.workdir
    run_dir, repo, samples_dir = (
        work / "runs" / "resnet20-digits",
        work / "model_repository",
        work / "samples",
    )
    train_export_and_sample(run_dir, repo, samples_dir, epochs=args.epochs, samples=args.samples)
    serve_and_classify(repo, sorted(samples_dir.glob("*.png"))[: args.samples])
    return 0


def train_export_and_sample(
    run_dir: Path, repo: Path, samples_dir: Path, *, epochs: int, samples: int
) -> None:
    """Train (or resume, or skip a finished run), export with the parity gate, write PNG samples."""
    if not (run_dir / "run.json").exists() or "test_acc" not in (run_dir / "run.json").read_text():
        if (run_dir / "train_state.json").exists():
            step("train (resuming)", kiln("train", "--resume", str(run_dir)))
        else:
            step(
                "train",
                kiln(
                    "train",
                    "--model",
                    "resnet20",
                    "--data",
                    "digits",
                    "--epochs",
                    str(epochs),
                    "--runs-dir",
                    str(run_dir.parent),
                    "--name",
                    run_dir.name,
                ),
            )
    step(
        "export with the parity gate",
        kiln("export", str(run_dir), "--repo", str(repo), "--name", MODEL, "--precision", "fp32,fp16,int8"),
    )
    step(
        "held-out digits as PNG",
        [
            sys.executable,
            "-m",
            "training.samples",
            str(run_dir),
            str(samples_dir),
            "--count",
            str(samples),
        ],
    )


def serve_and_classify(repo: Path, images: list[Path]) -> None:
    """Start `kiln serve` on free ports, classify `images`, show the metrics, stop it (SIGTERM)."""
    port, metrics_port = free_port(), free_port()
    command = kiln(
        "serve",
        "--repo",
        str(repo),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--metrics-port",
        str(metrics_port),
    )
    console.rule("[bold]serve")
    console.print("$ kiln " + " ".join(command[3:]), style="dim")
    server = subprocess.Popen(command)
    try:
        with KilnClient(f"127.0.0.1:{port}") as client:
            wait_ready(client, server)
            classify_samples(client, images)
        metrics_excerpt(metrics_port)
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=60)
        console.print(f"server stopped (exit code {code})")


if __name__ == "__main__":
    sys.exit(main())
