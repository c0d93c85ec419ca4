"""Resumable training state without pickle: optimizer tensors in safetensors, the rest in JSON.

Randomness is not saved: the loop reseeds every epoch from (seed, epoch), so a run resumed at an
epoch boundary replays exactly the same shuffles, augmentations and dropout masks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from training.checkpoint import (
    TRAIN_STATE_JSON,
    TRAIN_STATE_TENSORS,
    CheckpointError,
    load_tensors,
    read_json,
    save_tensors,
    write_json,
)


@dataclass(frozen=True)
class TrainState:
    """What the loop needs, beyond the weights, to continue a run exactly."""

    epoch: int  # epochs completed
    best_val_acc: float
    best_epoch: int
    config: dict[str, Any]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    scaler: dict[str, Any] | None


def _split_optimizer_state(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, dict[str, Any]] = {}
    for param_id, values in state["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{param_id}.{name}"] = value
            else:
                plain.setdefault(str(param_id), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "plain_state": plain}


def _join_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, param_id, name = key.split(".", 2)
        state.setdefault(int(param_id), {})[name] = value
    for param_id, values in meta.get("plain_state", {}).items():
        state.setdefault(int(param_id), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_train_state(run_dir: Path, state: TrainState) -> None:
    """Write train_state.safetensors + train_state.json (tensors first, JSON last as the commit)."""
    tensors, optimizer_meta = _split_optimizer_state(state.optimizer)
    save_tensors(tensors, run_dir / TRAIN_STATE_TENSORS)
    write_json(
        run_dir / TRAIN_STATE_JSON,
        {
            "epoch": state.epoch,
            "best_val_acc": state.best_val_acc,
            "best_epoch": state.best_epoch,
            "config": state.config,
            "optimizer": optimizer_meta,
            "scheduler": state.scheduler,
            "scaler": state.scaler,
        },
    )


def load_train_state(run_dir: Path) -> TrainState:
    """Read back what save_train_state wrote; missing or corrupt files are a CheckpointError."""
    meta = read_json(run_dir / TRAIN_STATE_JSON)
    tensors = load_tensors(run_dir / TRAIN_STATE_TENSORS)
    try:
        return TrainState(
            epoch=int(meta["epoch"]),
            best_val_acc=float(meta["best_val_acc"]),
            best_epoch=int(meta["best_epoch"]),
            config=dict(meta["config"]),
            optimizer=_join_optimizer_state(tensors, meta["optimizer"]),
            scheduler=dict(meta["scheduler"]),
            scaler=meta.get("scaler"),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{run_dir / TRAIN_STATE_JSON} is incomplete: {exc}") from exc
