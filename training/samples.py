"""Write held-out samples of a run's dataset to files, for smoke tests and the quick start.

    python -m training.samples RUN_DIR OUT_DIR [--split test] [--count 8] [--signal-format npy]

Images become PNG files; signals (layout NCL) become `.npy` (float32 [C, L]) or `.csv` (one
line per channel) files holding the raw values the run read, which is what an exported signal
model takes (its normalisation is in the graph). Files are named `<split>-<index>-<label>.<ext>`
so a client's answers can be checked by eye.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from training.checkpoint import CheckpointError, load_run
from training.data import DataError, load_dataset

SIGNAL_FORMATS = ("npy", "csv")


def write_samples(
    run_dir: Path, out_dir: Path, *, split: str = "test", count: int = 8, signal_format: str = "npy"
) -> list[Path]:
    """Save the first `count` samples of a split as the run saw them: images as resized uint8
    PNGs, signals as raw float32 arrays in `signal_format` ("npy" or "csv")."""
    if signal_format not in SIGNAL_FORMATS:
        raise DataError(f"signal_format must be one of {', '.join(SIGNAL_FORMATS)}, got {signal_format!r}")
    if count < 1:
        raise DataError(f"count must be >= 1, got {count}")
    info = load_run(run_dir)
    dataset = getattr(load_dataset(info.data_spec), split)
    is_signal = info.data_spec.is_signal
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for index in range(min(count, len(dataset))):
        sample, label = dataset[index]
        stem = f"{split}-{index:04d}-{info.class_names[int(label)]}"
        if is_signal:
            written.append(_write_signal(sample.numpy(), out_dir / f"{stem}.{signal_format}"))
        else:
            written.append(_write_image(sample.numpy(), out_dir / f"{stem}.png"))
    return written


def _write_image(chw: np.ndarray, path: Path) -> Path:
    array = chw.transpose(1, 2, 0)  # CHW -> HWC
    pil = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array.astype(np.uint8))
    pil.save(path)
    return path


def _write_signal(signal: np.ndarray, path: Path) -> Path:
    """float32 [C, L] as .npy (exact) or .csv (one line per channel, shortest exact repr)."""
    values = np.ascontiguousarray(signal, dtype=np.float32)
    if path.suffix == ".npy":
        np.save(path, values, allow_pickle=False)
    else:
        lines = (",".join(repr(float(v)) for v in row) for row in values)
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--split", choices=("train", "val", "test"), default="test")
    parser.add_argument("--count", type=int, default=8)
    parser.add_argument(
        "--signal-format", choices=SIGNAL_FORMATS, default="npy", help="file format of signal samples"
    )
    args = parser.parse_args(argv)
    try:
        paths = write_samples(
            args.run_dir, args.out_dir, split=args.split, count=args.count, signal_format=args.signal_format
        )
    except (CheckpointError, DataError) as exc:
        print(f"samples: error: {exc}", file=sys.stderr)
        return 2
    print("\n".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
