"""The training stage's one configuration object: defaults <- flags, validated at start."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from training.config_keys import checked_keys

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "onecycle", "constant")
DEVICES = ("auto", "cpu", "cuda")


class TrainConfigError(ValueError):
    """A training option has a value the loop cannot use; the message names it."""


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """Optimiser and learning-rate schedule settings."""

    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "onecycle"
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise TrainConfigError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            raise TrainConfigError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not self.lr > 0:
            raise TrainConfigError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise TrainConfigError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            raise TrainConfigError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.warmup_epochs < 0:
            raise TrainConfigError(f"warmup_epochs must be >= 0, got {self.warmup_epochs}")
        if not 0 <= self.label_smoothing < 1:
            raise TrainConfigError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything that determines a training run (model and data configs are kept as dicts so this
    module stays importable without torch; the loop turns them into ModelConfig / DataSpec)."""

    model: dict[str, Any]
    data: dict[str, Any]
    optim: OptimConfig = field(default_factory=OptimConfig)
    epochs: int = 30
    batch_size: int = 64
    eval_batch_size: int = 256
    seed: int = 0
    device: str = "auto"
    threads: int = 0  # 0 -> all cores
    workers: int = 0  # DataLoader workers for lazily decoded sets
    amp: bool = True  # where native: CUDA (bf16/fp16), CPUs with BF16 instructions (bf16)
    channels_last: bool = True  # NHWC memory format
    compile: bool = False

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise TrainConfigError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise TrainConfigError(f"batch sizes must be >= 1, got {self.batch_size}/{self.eval_batch_size}")
        if self.device not in DEVICES and not self.device.startswith("cuda:"):
            raise TrainConfigError(f"device must be one of {DEVICES} or cuda:N, got {self.device!r}")
        if self.threads < 0 or self.workers < 0:
            raise TrainConfigError(f"threads/workers must be >= 0, got {self.threads}/{self.workers}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict; `from_dict(to_dict())` gives an equal config."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Rebuild from `to_dict()` output, naming any key this version does not know."""
        values = dict(checked_keys(cls, data, "training config", TrainConfigError))
        optim = checked_keys(OptimConfig, values.pop("optim", {}), "optimiser config", TrainConfigError)
        return cls(optim=OptimConfig(**optim), **values)


def config_differences(saved: TrainConfig, requested: TrainConfig) -> list[str]:
    """Human-readable `key: saved -> requested` lines for every field that differs."""
    out: list[str] = []

    def walk(prefix: str, a: Any, b: Any) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                walk(f"{prefix}.{key}" if prefix else key, a.get(key), b.get(key))
        elif a != b:
            out.append(f"{prefix}: {a!r} -> {b!r}")

    walk("", saved.to_dict(), requested.to_dict())
    return out
