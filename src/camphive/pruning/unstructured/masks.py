"""Masks are data: ``{parameter name: bool tensor}``, True = kept, False = pruned.

The convention is that of ``torch.nn.utils.prune``. The pruned model holds the zeros in
its ordinary parameters, so it runs and saves like any other model; these functions are
the only place where masks touch a model.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from camphive.errors import ConfigError

Masks = dict[str, torch.Tensor]


def check_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Raise :class:`ConfigError` when a mask names no parameter or has the wrong shape."""
    parameters = dict(model.named_parameters())
    for name, mask in masks.items():
        if name not in parameters:
            raise ConfigError(f"mask for {name!r} names no parameter of the model; keys must come from model.named_parameters()")
        if tuple(mask.shape) != tuple(parameters[name].shape):
            raise ConfigError(
                f"mask for {name!r} has shape {tuple(mask.shape)} but the parameter has {tuple(parameters[name].shape)}"
            )
        if mask.dtype != torch.bool:
            raise ConfigError(f"mask for {name!r} has dtype {mask.dtype}; masks must be bool tensors (True = kept)")


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor] | None) -> None:
    """Zero the pruned entries of every masked parameter, in place."""
    if not masks:
        return
    parameters = dict(model.named_parameters())
    for name, mask in masks.items():
        parameter = parameters[name]
        parameter.mul_(mask.to(device=parameter.device, dtype=parameter.dtype))


@torch.no_grad()
def mask_gradients(model: nn.Module, masks: Mapping[str, torch.Tensor] | None) -> None:
    """Zero the gradients of pruned entries so that no optimizer step moves them."""
    if not masks:
        return
    parameters = dict(model.named_parameters())
    for name, mask in masks.items():
        grad = parameters[name].grad
        if grad is not None:
            grad.mul_(mask.to(device=grad.device, dtype=grad.dtype))


def sparsity_of(masks: Mapping[str, torch.Tensor]) -> tuple[float, dict[str, float]]:
    """Global and per-parameter fraction of pruned entries."""
    per_parameter = {name: 1.0 - mask.float().mean().item() for name, mask in masks.items()}
    total = sum(mask.numel() for mask in masks.values())
    pruned = sum(int((~mask).sum()) for mask in masks.values())
    return (pruned / total if total else 0.0), per_parameter
