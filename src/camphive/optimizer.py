"""The optimizer and the learning-rate schedules of :func:`camphive.train` (and fine-tuning)."""
from __future__ import annotations

import math

import torch
from torch import nn

from camphive.errors import ConfigError

SCHEDULES = ("cosine", "step", "constant")


def make_optimizer(model: nn.Module, lr: float, momentum: float, nesterov: bool, weight_decay: float,
                   decay_norm_and_bias: bool = False) -> torch.optim.Optimizer:
    """SGD; by default BatchNorm parameters and biases get no weight decay (common practice)."""
    if lr <= 0:
        raise ConfigError(f"learning rate must be positive, got {lr}")
    decay, no_decay = [], []
    for parameter in model.parameters():
        if not parameter.requires_grad:
            continue
        (decay if parameter.ndim > 1 or decay_norm_and_bias else no_decay).append(parameter)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0)


def make_scheduler(optimizer, schedule: str, total_steps: int, milestones=None, gamma: float = 0.1,
                   warmup_steps: int = 0):
    """A per-step LambdaLR: cosine to zero, step decay at epoch-fraction milestones, or constant."""
    if schedule not in SCHEDULES:
        raise ConfigError(f"unknown schedule {schedule!r}; use one of {', '.join(SCHEDULES)}")
    milestones = [0.5, 0.75] if milestones is None else list(milestones)

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress_fraction = min(step / max(total_steps, 1), 1.0)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress_fraction))
        if schedule == "step":
            return gamma ** sum(progress_fraction >= m for m in milestones)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
