"""Write held-out images of a run's dataset as PNG files, for smoke tests and the quick start.

    python -m training.samples RUN_DIR OUT_DIR [--split test] [--count 8]

Files are named `<split>-<index>-<label>.png` so a client's answers can be checked by eye.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from training.checkpoint import CheckpointError, load_run
from training.data import DataError, load_dataset


def write_samples(run_dir: Path, out_dir: Path, *, split: str = "test", count: int = 8) -> list[Path]:
    """Save the first `count` images of a split (as the run saw them: resized uint8) as PNGs."""
    info = load_run(run_dir)
    dataset = getattr(load_dataset(info.data_spec), split)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for index in range(min(count, len(dataset))):
        image, label = dataset[index]
        array = image.numpy().transpose(1, 2, 0)  # CHW -> HWC
        pil = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array.astype(np.uint8))
        path = out_dir / f"{split}-{index:04d}-{info.class_names[int(label)]}.png"
        pil.save(path)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--split", choices=("train", "val", "test"), default="test")
    parser.add_argument("--count", type=int, default=8)
    args = parser.parse_args(argv)
    try:
        paths = write_samples(args.run_dir, args.out_dir, split=args.split, count=args.count)
    except (CheckpointError, DataError) as exc:
        print(f"samples: error: {exc}", file=sys.stderr)
        return 2
    print("\n".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
