"""`kiln score`: score stored images offline into Parquet shards, resumably (see serving.scoring).

    kiln score --repo models --model resnet20[:3] --input 'photos/**/*.jpg' --output scores/

A complete job also writes scores/_predictions.json: its top-1 class counts, top-1 confidence
histogram and drift score against kiln.json's reference, as the server's prediction metrics
count them (serving/scoring/distribution.py), and prints them as a short table.

Exit status: 0 when every shard is committed (inputs that could not be scored are error rows,
not failures), 2 for a bad request (no inputs, unknown model, bad manifest columns, an output
folder that is a file or belongs to another job) with one line on stderr, 1 when scoring itself
failed (committed shards are kept: rerun the same command to resume). Without pyarrow (the
`scoring` extra, left out of the serving install) it says which extra to install and exits 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

SCORING_EXTRA = "kiln-serve[scoring]"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the `kiln score` arguments."""
    parser.add_argument("--repo", required=True, type=Path, help="model repository folder")
    parser.add_argument("--model", required=True, help="NAME or NAME:VERSION (default: the newest version)")
    parser.add_argument(
        "--input",
        required=True,
        help="a directory, a glob ('**' allowed) or a manifest .parquet/.csv with a 'path' column",
    )
    parser.add_argument("--output", required=True, type=Path, help="output folder (Parquet shards + ledger)")
    parser.add_argument("--top-k", type=int, default=5, help="classes per image (default %(default)s)")
    parser.add_argument(
        "--batch-size", type=int, help="rows per backend call (default: min(32, max_batch_size))"
    )
    parser.add_argument(
        "--workers", type=int, default=2, help="local engine: decode threads (default %(default)s)"
    )
    parser.add_argument("--engine", choices=("local", "ray"), default="local", help="default %(default)s")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default %(default)s)")
    parser.add_argument("--artefact", help="artefact file of the version (default: kiln serve's choice)")
    parser.add_argument("--logits", action="store_true", help="also write the full output row")
    parser.add_argument(
        "--shard-size", type=int, default=10_000, help="rows per output shard (default %(default)s)"
    )
    parser.add_argument("--ray-address", help="ray engine: cluster address (default: start a local Ray)")
    parser.add_argument(
        "--actors", type=int, default=1, help="ray engine: backend actors (default %(default)s)"
    )
    parser.add_argument(
        "--actor-cpus", type=float, default=1.0, help="ray engine: CPUs per actor (default %(default)s)"
    )
    parser.add_argument(
        "--prediction-classes",
        type=int,
        help="classes named in _predictions.json, the rest 'other' (default 20, as kiln serve)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def parse_model(text: str) -> tuple[str, int | None]:
    """ "name" -> (name, None); "name:3" -> (name, 3); ValueError naming the bad text."""
    name, sep, version = text.partition(":")
    if not name:
        raise ValueError(f"--model {text!r}: empty model name")
    if not sep:
        return name, None
    if not version.isdigit() or int(version) < 1:
        raise ValueError(f"--model {text!r}: version must be a positive integer")
    return name, int(version)


def run(args: argparse.Namespace) -> int:
    """Run the job; returns the exit status (see module docstring)."""
    from serving.errors import KilnError

    try:
        from serving.scoring.job import ScoreConfig, prepare_job
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] != "pyarrow":
            raise
        print(
            f'kiln score: needs pyarrow, which is not installed: pip install "{SCORING_EXTRA}"',
            file=sys.stderr,
        )
        return 2
    try:
        model, version = parse_model(args.model)
        config = ScoreConfig(
            repo=args.repo, model=model, version=version, inputs=args.input, output=args.output,
            top_k=args.top_k, batch_size=args.batch_size, workers=args.workers, engine=args.engine,
            device=args.device, artefact=args.artefact, logits=args.logits, shard_size=args.shard_size,
            ray_address=args.ray_address, actors=args.actors, actor_cpus=args.actor_cpus,
            progress=not args.no_progress and sys.stderr.isatty(),
        )  # fmt: skip
        if args.prediction_classes is not None:
            config = dataclasses.replace(config, prediction_classes=args.prediction_classes)
        job = prepare_job(config)
    except (ValueError, KilnError) as exc:
        print(f"kiln score: {_message(exc)}", file=sys.stderr)
        return 2
    try:
        summary = job.run()
    except KeyboardInterrupt:
        print("kiln score: interrupted; committed shards are kept, rerun to resume", file=sys.stderr)
        return 130
    except Exception as exc:
        print(
            f"kiln score: scoring failed: {_message(exc)}; committed shards are kept, rerun to resume",
            file=sys.stderr,
        )
        return 1
    finally:
        job.close()
    print(summary.line())
    if job.predictions is not None:
        print(job.predictions.table())
    return 0 if summary.complete else 1


def _message(exc: BaseException) -> str:
    text = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    return " ".join(str(text).split())  # one line, whatever the exception held
