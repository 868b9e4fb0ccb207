"""Checks every pruning run makes of the model and data before and after it changes them."""
from __future__ import annotations

import torch
from torch import nn

from camphive.errors import ConfigError, NumericalError
from camphive.measure import model_summary
from camphive.modules import check_targets, forward_checked


@torch.no_grad()
def check_model_runs(model: nn.Module, batches) -> None:
    """Run the first calibration batch once, so that a wrong input shape or label range
    fails here with one clear line instead of deep inside the curvature code."""
    inputs, targets = batches[0]
    device = next(model.parameters(), torch.empty(0)).device
    was_training = model.training
    model.eval()
    try:
        outputs = forward_checked(model, inputs[:2].to(device), "the calibration data")
    finally:
        model.train(was_training)
    if not torch.is_tensor(outputs):
        raise ConfigError(f"the model returns a {type(outputs).__name__}, not a tensor; camphive prunes models whose "
                          "forward returns one output tensor (logits): wrap yours in an nn.Module whose forward "
                          "returns that tensor, e.g. outputs[0] or outputs['logits']")
    if outputs.ndim == 2 and not targets.dtype.is_floating_point:
        check_targets(targets, outputs.shape[-1], "the calibration data")


def summary_without_layers(model, example) -> dict:
    """Parameters, MACs and sparsity of ``model`` on ``example`` (one sample), without the per-layer table."""
    summary = model_summary(model, example)
    summary.pop("layers", None)
    return summary


def check_finite(params, where: str) -> None:
    for name, parameter in params.items():
        if not torch.isfinite(parameter).all():
            raise NumericalError(f"weight {name} holds NaN or inf {where}; check the model (or lower clip/damping options)")
