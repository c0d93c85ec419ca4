"""run.json and metrics.jsonl: the record a run leaves for export and for people."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from training.checkpoint import BEST_WEIGHTS, RUN_JSON, RUN_SCHEMA_VERSION, atomic_write_text, write_json
from training.provenance import git_commit, utc_now, versions

METRICS_JSONL = "metrics.jsonl"


def input_record(
    *, channels: int, size: int, channel_order: str, mean: Sequence[float], std: Sequence[float]
) -> dict:
    """How a model expects its input: what export turns into the manifest's preprocessing."""
    return {
        "kind": "image",
        "channels": channels,
        "height": size,
        "width": size,
        "layout": "NCHW",
        "dtype": "float32",
        "channel_order": channel_order,
        "scale": 1.0 / 255.0,
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
    }


def signal_input_record(bundle: Any) -> dict:
    """How a 1-D model expects its input: float32 signals [N, C, L], normalised per channel."""
    return {
        "kind": "signal",
        "channels": bundle.in_channels,
        "length": bundle.signal_length,
        "layout": "NCL",
        "dtype": "float32",
        "scale": bundle.input_scale,
        "mean": [float(m) for m in bundle.mean],
        "std": [float(s) for s in bundle.std],
    }


def bundle_input_record(bundle: Any) -> dict:
    """The input record of a loaded data bundle, image or signal."""
    if bundle.is_signal:
        return signal_input_record(bundle)
    return input_record(
        channels=bundle.in_channels,
        size=bundle.image_size,
        channel_order=bundle.channel_order,
        mean=bundle.mean,
        std=bundle.std,
    )


def write_run_json(
    run_dir: Path,
    *,
    run_id: str,
    model: dict[str, Any],
    class_names: Sequence[str],
    input_spec: dict[str, Any],
    data: dict[str, Any],
    dataset_fingerprint: str,
    train: dict[str, Any],
    metrics: dict[str, Any],
    seed: int,
    created_at: str | None = None,
) -> None:
    """Atomically (re)write run.json with everything export needs to rebuild and prove the model."""
    write_json(
        run_dir / RUN_JSON,
        {
            "schema_version": RUN_SCHEMA_VERSION,
            "run_id": run_id,
            "model": model,
            "class_names": list(class_names),
            "input": input_spec,
            "data": data,
            "dataset_fingerprint": dataset_fingerprint,
            "train": train,
            "metrics": metrics,
            "seed": seed,
            "checkpoint": BEST_WEIGHTS,
            "versions": versions("torch", "numpy", "safetensors"),
            "git_commit": git_commit(),
            "created_at": created_at or utc_now(),
            "updated_at": utc_now(),
        },
    )


def read_history(run_dir: Path, up_to_epoch: int) -> list[dict[str, Any]]:
    """Epoch rows already recorded, keeping only those a resumed run has really completed."""
    path = run_dir / METRICS_JSONL
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [row for row in rows if row["epoch"] <= up_to_epoch]


def write_history(run_dir: Path, history: Sequence[dict[str, Any]]) -> None:
    """Rewrite metrics.jsonl (one JSON object per epoch) atomically."""
    atomic_write_text(run_dir / METRICS_JSONL, "".join(json.dumps(row) + "\n" for row in history))
