"""Torch-Pruning's group importances as criteria of our interface (channels only).

The project's per-weight criteria score a channel by the sum of the per-weight scores of
every weight of its group (:meth:`camphive.pruning.criteria.Criterion.channel_scores`);
Torch-Pruning's own group importances (``tp-magnitude``: group L2 norm, ``tp-taylor``:
  |w g|, ``tp-hessian``: w^2 times the mean squared per-sample gradient), each with its
  default group reduction (mean) and normalization (by the group mean), called on the
  group exactly as Torch-Pruning's pruners do.

Gradients for the Torch-Pruning criteria are taken with BatchNorm in eval mode on the
calibration batches, like the curvature of the project's criteria. Torch-Pruning 1.6's
``HessianImportance.accumulate_grad`` keeps only the last sample (it looks parameters up
by name in a dict keyed by parameter), so the squared per-sample gradients are averaged
here (:func:`camphive.curvature.fisher.empirical_fisher_diagonal`) and handed to it as the
gradients it would have averaged.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from camphive import distributed
from camphive.curvature.fisher import empirical_fisher_diagonal
from camphive.modules import eval_mode
from camphive.pruning.criteria.base import Criterion


class TorchPruningImportance(Criterion):
    """One of Torch-Pruning's group importances (``tp-magnitude``, ``tp-taylor``, ``tp-hessian``),
    called on each channel group as Torch-Pruning's pruners do. Channels only: these criteria
    have no per-weight form."""

    def __init__(self, name: str):
        self.name = name

    def channel_scores(self, groups: list, info) -> list[torch.Tensor]:
        return torch_pruning_scores(self.name, info.model, groups, info.batches, info.loss_fn)


def torch_pruning_scores(name: str, model: nn.Module, groups: list, batches,
                         loss_fn=None) -> list[torch.Tensor]:
    """Torch-Pruning's importance of each group's channels (see the module docstring)."""
    if name == "tp-magnitude":
        importance = tp.importance.GroupMagnitudeImportance(p=2)
    elif name == "tp-taylor":
        importance = tp.importance.GroupTaylorImportance()
        _set_mean_gradients(model, batches, loss_fn)
    else:
        importance = tp.importance.GroupHessianImportance()
        _set_mean_squared_sample_gradients(model, batches, loss_fn)
    try:
        results = []
        for group in groups:
            value = importance(group.tp_group)
            if value is None:  # a group without weights Torch-Pruning scores: keep its order
                value = torch.zeros(group.size)
            results.append(value.detach().double().cpu())
        return results
    finally:
        model.zero_grad(set_to_none=True)


def _set_mean_gradients(model: nn.Module, batches, loss_fn=None) -> None:
    """``p.grad`` = gradient of the mean calibration loss (BatchNorm in eval mode), over the
    batches of every process when a process group runs (``batches`` is then this process's shard)."""
    loss_fn = loss_fn or F.cross_entropy
    model.zero_grad(set_to_none=True)
    total = distributed.all_reduce_int(sum(int(inputs.shape[0]) for inputs, _ in batches))
    device = next(model.parameters()).device
    with eval_mode(model), torch.enable_grad():
        for inputs, targets in batches:
            loss = loss_fn(model(inputs.to(device)), targets.to(device)) * (inputs.shape[0] / total)
            loss.backward()
    gradients = [p.grad for p in model.parameters() if p.grad is not None]
    for gradient, total_gradient in zip(gradients, distributed.all_reduce_tensors(gradients)):
        gradient.copy_(total_gradient)


def _set_mean_squared_sample_gradients(model: nn.Module, batches, loss_fn=None) -> None:
    """``p.grad`` = mean over samples of the squared per-sample gradient (empirical Fisher)."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    fisher = empirical_fisher_diagonal(model, batches, params, loss_fn)
    for name, parameter in params.items():
        parameter.grad = fisher[name].to(parameter)

