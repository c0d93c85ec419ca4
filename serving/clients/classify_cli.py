"""`kiln classify IMAGE... --server HOST:PORT --model NAME`: classify images through a running server.

Prints one table row per image with its top-k labels and scores, then the server's timings.
For a 1-D (signal) model, pass `.npy` files instead, each a float [L] or [C, L] array (loaded
without pickle); they go as raw signals. A signal model refuses images (FAILED_PRECONDITION).
Exit status: 0 on success, 2 for bad arguments (e.g. a missing image file), 1 when the server
refuses or fails (its status and message on stderr).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the `kiln classify` arguments."""
    parser.add_argument(
        "images", nargs="+", type=Path, metavar="IMAGE", help="JPEG/PNG/WebP files, or .npy signals"
    )
    parser.add_argument(
        "--server", default="127.0.0.1:8001", help="host:port of `kiln serve` (default %(default)s)"
    )
    parser.add_argument("--model", required=True, help="model name in the server's repository")
    parser.add_argument("--version", default="", help="model version (default: the newest ready one)")
    parser.add_argument("--top-k", type=int, default=3, help="classes per image (default %(default)s)")
    parser.add_argument(
        "--timeout", type=float, default=30.0, help="seconds before giving up (default %(default)s)"
    )
    parser.add_argument("--token-file", type=Path, help="bearer token file (or set KILN_AUTH_TOKEN)")
    parser.add_argument("--ca-cert", type=Path, help="CA certificate (PEM): connect with TLS")
    parser.add_argument("--client-cert", type=Path, help="client certificate (PEM) for mTLS")
    parser.add_argument("--client-key", type=Path, help="client private key (PEM) for mTLS")


def _check_args(args: argparse.Namespace) -> str | None:
    """The first problem with the arguments, or None."""
    for image in args.images:
        if not image.is_file():
            return f"image not found: {image}"
    if len({_is_signal(image) for image in args.images}) > 1:
        return "pass images or .npy signals, not both"
    if args.top_k < 1:
        return f"--top-k must be >= 1, got {args.top_k}"
    if args.timeout <= 0:
        return f"--timeout must be > 0, got {args.timeout}"
    for name in ("token_file", "ca_cert", "client_cert", "client_key"):
        path = getattr(args, name)
        if path is not None and not path.is_file():
            return f"--{name.replace('_', '-')}: file not found: {path}"
    if (args.client_cert is None) != (args.client_key is None) or (args.client_cert and not args.ca_cert):
        return "--client-cert and --client-key go together, and need --ca-cert"
    return None


def _is_signal(path: Path) -> bool:
    return path.suffix.lower() == ".npy"


def _load_signals(paths: list[Path]) -> list[np.ndarray]:
    """.npy files -> arrays; ValueError naming the file that cannot be read."""
    import numpy as np  # imported on use: the CLI starts fast

    signals = []
    for path in paths:
        try:
            signals.append(np.load(path, allow_pickle=False))
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read signal {path}: {exc}") from None
    return signals


def run(args: argparse.Namespace) -> int:
    """Classify the images and print a table; returns the exit status."""
    problem = _check_args(args)
    if problem is not None:
        print(f"kiln classify: {problem}", file=sys.stderr)
        return 2
    import grpc
    from rich.console import Console
    from rich.table import Table

    from serving.clients.client import KilnClient

    token = args.token_file.read_text().strip() if args.token_file else os.environ.get("KILN_AUTH_TOKEN")
    client = KilnClient(
        args.server,
        token=token,
        ca_cert=args.ca_cert,
        client_cert=args.client_cert,
        client_key=args.client_key,
        timeout=args.timeout,
    )
    try:
        with client:
            if _is_signal(args.images[0]):
                signals = _load_signals(args.images)
                response = client.classify_signals(
                    args.model, signals, top_k=args.top_k, version=args.version
                )
            else:
                response = client.classify(args.model, args.images, top_k=args.top_k, version=args.version)
    except ValueError as exc:
        print(f"kiln classify: {exc}", file=sys.stderr)
        return 2
    except grpc.RpcError as exc:
        print(f"kiln classify: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    table = Table(title=f"{response.model} v{response.version} @ {args.server}")
    table.add_column("image")
    for rank in range(1, args.top_k + 1):
        table.add_column(f"#{rank}")
    for image, result in zip(args.images, response.results, strict=True):
        cells = [f"{p.label} {p.score:.3f}" for p in result.predictions]
        table.add_row(image.name, *cells, *[""] * (args.top_k - len(cells)))
    console = Console()
    console.print(table)
    t = response.timings
    console.print(
        f"server: preprocess {t.preprocess_us} µs, queue {t.queue_us} µs, compute {t.compute_us} µs, "
        f"total {t.total_us} µs"
    )
    return 0
