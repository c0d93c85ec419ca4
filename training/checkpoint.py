"""Run directories: weights in safetensors, everything else in JSON (never pickle)."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from training.data import DataSpec
from training.models import ModelConfig, ModelConfigError, build_model

RUN_SCHEMA_VERSION = 1
RUN_JSON = "run.json"
BEST_WEIGHTS = "checkpoint.safetensors"
LAST_WEIGHTS = "last.safetensors"
TRAIN_STATE_TENSORS = "train_state.safetensors"
TRAIN_STATE_JSON = "train_state.json"


class CheckpointError(ValueError):
    """A run directory or one of its files is missing, corrupt or does not fit its config."""


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temp file in the same folder + rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Atomically write pretty JSON."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_json(path: Path) -> dict[str, Any]:
    """Read a JSON object, turning every failure into a CheckpointError naming the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path} does not exist") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not readable JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def save_tensors(
    tensors: Mapping[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None
) -> None:
    """Atomically save a flat name -> tensor map as safetensors."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file, naming it in the error if it is missing or corrupt."""
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a valid safetensors file: {exc}") from exc


def save_weights(model: torch.nn.Module, path: Path) -> None:
    """Save a model's state_dict (unwrapping torch.compile) as safetensors."""
    module = getattr(model, "_orig_mod", model)
    save_tensors(module.state_dict(), path, metadata={"format": "pt"})


def load_weights(model: torch.nn.Module, path: Path) -> None:
    """Load weights into a model built from the same config; a mismatch is a CheckpointError."""
    state = load_tensors(path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path} does not fit the model config: {str(exc).splitlines()[0]}") from exc


@dataclass(frozen=True)
class RunInfo:
    """The parsed run.json of a training run."""

    path: Path
    raw: dict[str, Any]
    model_config: ModelConfig
    data_spec: DataSpec
    class_names: tuple[str, ...]
    input: dict[str, Any]

    @property
    def run_id(self) -> str:
        return str(self.raw.get("run_id", self.path.name))

    @property
    def metrics(self) -> dict[str, Any]:
        return dict(self.raw.get("metrics", {}))

    @property
    def dataset_fingerprint(self) -> str:
        return str(self.raw.get("dataset_fingerprint", ""))

    @property
    def git_commit(self) -> str:
        return str(self.raw.get("git_commit", "unknown"))


def load_run(run_dir: str | os.PathLike[str]) -> RunInfo:
    """Parse and validate `run_dir/run.json`."""
    path = Path(run_dir)
    if not path.is_dir():
        raise CheckpointError(f"run directory {path} does not exist")
    raw = read_json(path / RUN_JSON)
    version = raw.get("schema_version")
    if version != RUN_SCHEMA_VERSION:
        raise CheckpointError(f"{path / RUN_JSON}: schema_version {version!r} is not supported (expected 1)")
    for key in ("model", "data", "class_names", "input"):
        if key not in raw:
            raise CheckpointError(f"{path / RUN_JSON} lacks the key '{key}'")
    try:
        model_config = ModelConfig.from_dict(raw["model"])
        data_spec = DataSpec.from_dict(raw["data"])
    except (ModelConfigError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{path / RUN_JSON}: {exc}") from exc
    return RunInfo(
        path=path,
        raw=raw,
        model_config=model_config,
        data_spec=data_spec,
        class_names=tuple(str(c) for c in raw["class_names"]),
        input=dict(raw["input"]),
    )


def load_model(run_dir: str | os.PathLike[str], which: str = "best") -> tuple[torch.nn.Module, RunInfo]:
    """Rebuild the model from run.json and load its best (or last) weights, in eval mode."""
    info = load_run(run_dir)
    names = {"best": BEST_WEIGHTS, "last": LAST_WEIGHTS}
    if which not in names:
        raise CheckpointError(f"which must be 'best' or 'last', got {which!r}")
    model = build_model(info.model_config)
    load_weights(model, info.path / names[which])
    return model.eval(), info
