"""Optimiser and schedule construction (weight decay only on conv/linear weights)."""

from __future__ import annotations

import math

import torch

from training.config import OptimConfig


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: matrices/kernels decay, BN parameters and biases (1-D tensors) do not."""
    decay, no_decay = [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """SGD (momentum, optional Nesterov) or AdamW over `parameter_groups`."""
    groups = parameter_groups(model, cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0
        )
    return torch.optim.AdamW(groups, lr=cfg.lr)


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, *, steps_per_epoch: int, epochs: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """A per-step schedule: one-cycle, or linear warm-up then cosine / constant."""
    total = max(1, steps_per_epoch * epochs)
    warmup = min(total - 1, round(cfg.warmup_epochs * steps_per_epoch))
    # OneCycleLR needs room for both phases; runs of a handful of steps fall back to the lambda schedule.
    if cfg.schedule == "onecycle" and total >= 4:
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=[cfg.lr] * len(optimizer.param_groups),
            total_steps=total,
            pct_start=min(max(warmup, 2), total - 2) / total,
            cycle_momentum=cfg.optimizer == "sgd" and cfg.momentum > 0,
            div_factor=25.0,
            final_div_factor=1e3,
        )

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
