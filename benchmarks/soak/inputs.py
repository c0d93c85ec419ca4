"""perf_analyzer `--input-data` of real values: scikit-learn's bundled handwritten digits (no
download), put through the model's own preprocessing from its kiln.json (resize, crop, normalise),
so the soak sends what a real client would, not zeros."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from serving.contract.manifest import read_manifest
from serving.runtime.preprocess import Preprocessor


def digit_images(count: int, channels: int) -> np.ndarray:
    """`count` digit images as uint8 [N, 8, 8, channels] (grey repeated over RGB)."""
    from sklearn.datasets import load_digits

    digits = load_digits().images[:count]  # 0..16
    grey = np.clip(digits * 16, 0, 255).astype(np.uint8)[..., None]
    return np.repeat(grey, channels, axis=3)


def write_input_data(version_dir: Path, out: Path, count: int = 64) -> dict[str, object]:
    """Write perf_analyzer's JSON for the model in `version_dir`; returns a short description."""
    manifest = read_manifest(version_dir / "kiln.json")
    spec = manifest.input
    if spec.kind != "image":
        raise SystemExit(f"the soak test feeds digit images; model {manifest.name!r} takes {spec.kind}s")
    channels = spec.channels
    pre = Preprocessor(spec)
    rows = [pre.preprocess(image) for image in digit_images(count, channels)]
    data = [{spec.name: {"content": row.reshape(-1).tolist(), "shape": list(row.shape)}} for row in rows]
    out.write_text(json.dumps({"data": data}))
    return {"model": manifest.name, "input": spec.name, "shape": list(rows[0].shape), "samples": len(rows)}
