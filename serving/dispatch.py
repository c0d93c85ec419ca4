"""The `kiln` console script: routes a subcommand to its stage's CLI module.

It lives in `serving` because the serving image (no torch) must still run `kiln serve`; the
training and export subcommands are imported only when asked for, so their heavy dependencies are
never loaded here.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from types import ModuleType

# subcommand -> (module exposing add_arguments/run, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "train": ("training.cli", "train a classifier and write a run directory"),
    "export": ("export.cli", "fold, export and prove a trained run into a model repository"),
    "serve": ("serving.cli", "serve a model repository over gRPC (KServe v2 + Classify)"),
    "classify": ("serving.clients.classify_cli", "classify images through a running server"),
    "score": ("serving.clients.score_cli", "score stored images offline into Parquet"),
    "bench": ("serving.clients.bench_cli", "benchmark a model or a running server"),
}


def _load(module_name: str, command: str) -> ModuleType | None:
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or "a dependency"
        if missing.split(".")[0] in {"training", "export", "serving"} and missing == module_name:
            print(f"kiln: '{command}' is not available in this version", file=sys.stderr)
        else:
            print(
                f"kiln: '{command}' needs the package '{missing}', which is not installed "
                f"(install kiln-serve[dev] or the extra for this stage)",
                file=sys.stderr,
            )
        return None


def main(argv: Sequence[str] | None = None) -> int:
    """Parse `kiln <subcommand> ...` and run the subcommand; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="kiln", description="Train, export and serve CNN classifiers.")
    parser.add_argument("command", choices=sorted(SUBCOMMANDS), help="subcommand to run")
    if not argv or argv[0] in {"-h", "--help"}:
        parser.print_help()
        lines = [f"  {name:<9} {text}" for name, (_, text) in SUBCOMMANDS.items()]
        print("\nsubcommands:\n" + "\n".join(lines))
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in SUBCOMMANDS:
        parser.print_usage(sys.stderr)
        print(f"kiln: unknown subcommand '{command}' (choose from {', '.join(SUBCOMMANDS)})", file=sys.stderr)
        return 2
    module = _load(SUBCOMMANDS[command][0], command)
    if module is None:
        return 2
    sub = argparse.ArgumentParser(prog=f"kiln {command}", description=SUBCOMMANDS[command][1])
    module.add_arguments(sub)
    args = sub.parse_args(rest)
    return int(module.run(args))


if __name__ == "__main__":
    sys.exit(main())
