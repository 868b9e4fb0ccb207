"""Diagonal of the empirical Fisher: the mean over samples of squared per-sample gradients.

This is what Optimal Brain Damage-style baselines use in place of the Hessian diagonal
(and what Torch-Pruning calls "Hessian" importance). Per-sample gradients come from
``torch.func.vmap`` over ``grad`` with BatchNorm in eval mode, in chunks to bound memory.
Under torchrun the sums and sample counts are reduced over the processes, so each process
gets the Fisher diagonal of the union of their shards.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from camphive import distributed as dist_tools
from camphive.curvature.state import curvature_mode, parameter_device_dtype, prepare_batches


@torch.no_grad()
def empirical_fisher_diagonal(model: nn.Module, batches, params: Mapping[str, torch.Tensor], loss_fn=None,
                              chunk_size: int = 32, distributed: bool | None = None) -> dict[str, torch.Tensor]:
    """``{name: E_samples[(d loss_n / d theta)^2]}`` for the named parameters, shaped like them.

    ``loss_fn(outputs, targets)`` must reduce by mean (it is applied to one sample at a time).
    ``batches`` are moved to the parameters' device (and floating inputs to their dtype).
    ``distributed``: ``None`` reduces over the processes when a group runs (``batches`` is then
    this process's shard), ``False`` keeps this process's batches alone.
    """
    reduce = dist_tools.resolve(distributed)
    loss_fn = loss_fn or F.cross_entropy
    names = list(params)
    device, dtype = parameter_device_dtype(params.values())
    batches = prepare_batches(batches, None, device, dtype)  # CPU loader batches for a GPU model, say
    totals = {name: torch.zeros_like(params[name], dtype=torch.float64) for name in names}
    count = 0
    with curvature_mode(model):
        frozen = {name: tensor.detach() for name, tensor in model.named_parameters()}
        buffers = {name: tensor.detach() for name, tensor in model.named_buffers()}

        def sample_loss(chosen, inputs, targets):
            outputs = functional_call(model, ({**frozen, **chosen}, buffers), (inputs.unsqueeze(0),))
            return loss_fn(outputs, targets.unsqueeze(0))

        per_sample_gradient = vmap(grad(sample_loss), in_dims=(None, 0, 0))
        chosen = {name: params[name].detach() for name in names}
        for inputs, targets in batches:
            for start in range(0, inputs.shape[0], chunk_size):
                with torch.enable_grad():
                    gradients = per_sample_gradient(chosen, inputs[start : start + chunk_size],
                                                    targets[start : start + chunk_size])
                for name in names:
                    totals[name] += (gradients[name].double() ** 2).sum(0)
            count += inputs.shape[0]
    if reduce:
        totals = dict(zip(names, dist_tools.all_reduce_tensors([totals[name] for name in names])))
        count = dist_tools.all_reduce_int(count)
    return {name: (totals[name] / max(count, 1)).to(params[name].dtype) for name in names}
