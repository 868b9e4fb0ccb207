"""How much a layer's output errors are magnified downstream by the BatchNorm that follows it.

A convolution (or linear layer) whose output feeds a BatchNorm directly sees its output
channel r rescaled by ``gamma_r / sqrt(running_var_r + eps)`` at inference. A reconstruction
error of that channel therefore reaches the rest of the network multiplied by the same factor,
and its squared size by the square: scores of layers with small-variance outputs would
otherwise be undervalued against layers without normalisation. The pairing is found by
running one batch and watching which tensor each BatchNorm reads, so any architecture works.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn


@torch.no_grad()
def normalizing_batchnorms(model: nn.Module, inputs: torch.Tensor, layers: Mapping[str, str]) -> dict[str, nn.Module]:
    """``{param name: BatchNorm}`` for each layer (``layers``: param name -> module name) whose
    output is read directly by a BatchNorm with as many features as the layer has output units."""
    modules = dict(model.named_modules())
    produced: dict[int, str] = {}
    found: dict[str, nn.Module] = {}
    handles = []

    def remember(param_name):
        def hook(module, args, output):
            if torch.is_tensor(output):
                produced[id(output)] = param_name
        return hook

    def check(module, args):
        if args and torch.is_tensor(args[0]) and id(args[0]) in produced:
            name = produced[id(args[0])]
            if module.num_features == modules[layers[name]].weight.shape[0]:
                found.setdefault(name, module)

    for param_name, module_name in layers.items():
        handles.append(modules[module_name].register_forward_hook(remember(param_name)))
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            handles.append(module.register_forward_pre_hook(check))
    was_training = model.training
    model.eval()
    try:
        model(inputs)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return found


def batchnorm_output_scale(norm: nn.Module) -> torch.Tensor:
    """``(gamma / sqrt(running_var + eps))^2`` per channel (gamma = 1 without affine parameters)."""
    variance = norm.running_var if norm.running_var is not None else torch.ones(norm.num_features)
    gamma = norm.weight.detach() if norm.weight is not None else torch.ones_like(variance)
    return (gamma.to(variance) ** 2 / (variance + norm.eps)).detach()
