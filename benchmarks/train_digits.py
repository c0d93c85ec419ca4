"""ResNet-20 on the bundled digits: test accuracy and wall time on this machine's CPU.

    python benchmarks/train_digits.py [--epochs 30] [--seeds 0 1 2] [--copy-curves]

Times the whole `kiln train` job (data loading, training, per-epoch validation, checkpoints, final
test evaluation) in-process, one run per seed, and prints a markdown row per run with the CPU model,
torch version and thread count, ready for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.machine import describe_cpu  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--label-smoothing", type=float, default=0.0)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--runs-dir", type=Path, default=REPO / "benchmarks" / "out" / "runs")
    parser.add_argument(
        "--copy-curves", action="store_true", help="copy the first run's curves.png to results/"
    )
    args = parser.parse_args()

    import torch

    from training.config import OptimConfig, TrainConfig
    from training.loop import Trainer
    from training.models import preset

    model = preset(args.model).to_dict()
    for derived in ("num_classes", "in_channels"):
        model.pop(derived)
    print(
        f"machine: {describe_cpu()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"date {time.strftime('%Y-%m-%d')}"
    )
    print(f"settings: {vars(args)}")
    print("| model | seed | epochs | test acc | best val acc | wall s |")
    print("|---|---|---|---|---|---|")
    for index, seed in enumerate(args.seeds):
        run_dir = args.runs_dir / f"{args.model}-digits-seed{seed}"
        shutil.rmtree(run_dir, ignore_errors=True)
        started = time.perf_counter()
        config = TrainConfig(
            model=model,
            data={"name": "digits", "image_size": args.image_size},
            optim=OptimConfig(lr=args.lr, label_smoothing=args.label_smoothing),
            epochs=args.epochs,
            batch_size=args.batch_size,
            seed=seed,
        )
        result = Trainer(config, run_dir).fit(show_progress=False)
        wall = time.perf_counter() - started
        print(
            f"| {args.model} | {seed} | {args.epochs} | {100 * result.test.accuracy:.2f} % "
            f"({result.test.samples}) | {100 * result.best_val_acc:.2f} % | {wall:.1f} |",
            flush=True,
        )
        if args.copy_curves and index == 0:
            shutil.copy(
                run_dir / "curves.png", REPO / "benchmarks" / "results" / f"{args.model}_digits_curves.png"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
