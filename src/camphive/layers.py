"""Which parameters are prunable.

By the method's definition, the prunable parameters are the weights of convolution and
linear layers; BatchNorm parameters and biases are never pruned unless asked.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from camphive.errors import ConfigError

PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.modules.conv._ConvNd)


def layer_list(layers: Iterable[str | nn.Module] | str | nn.Module | None) -> list[str | nn.Module]:
    """``ignored_layers`` as a list: one name or module given on its own is one layer (a string
    is not read as its letters)."""
    if layers is None:
        return []
    return [layers] if isinstance(layers, (str, nn.Module)) else list(layers)


def prunable_layers(
    model: nn.Module, ignored_layers: Iterable[str | nn.Module] | None = None
) -> dict[str, nn.Module]:
    """Return ``{module name: module}`` for the conv and linear layers of ``model``.

    ``ignored_layers`` may hold module names (as in ``model.named_modules()``) or module
    objects; those are left out. An unknown name is an error, not silently ignored.
    """
    ignored_names: set[str] = set()
    ignored_ids: set[int] = set()
    module_names = {name for name, _ in model.named_modules()}
    for item in layer_list(ignored_layers):
        if isinstance(item, nn.Module):
            ignored_ids.add(id(item))
        else:
            if item not in module_names:
                raise ConfigError(
                    f"ignored layer {item!r} is not a module of the model; "
                    f"use a name from model.named_modules(), e.g. {sorted(module_names - {''})[:3]}"
                )
            ignored_names.add(item)
    layers = {}
    for name, module in model.named_modules():
        if not isinstance(module, PRUNABLE_TYPES):
            continue
        if name in ignored_names or id(module) in ignored_ids:
            continue
        if any(name.startswith(prefix + ".") for prefix in ignored_names if prefix):
            continue
        layers[name] = module
    return layers


def prunable_parameters(
    model: nn.Module, ignored_layers: Iterable[str | nn.Module] | None = None
) -> dict[str, torch.nn.Parameter]:
    """Return ``{parameter name: weight}`` of the prunable layers, in model order.

    Names are those of ``model.named_parameters()``, the keys used for masks.
    """
    layers = prunable_layers(model, ignored_layers)
    return {f"{name}.weight" if name else "weight": layer.weight for name, layer in layers.items()}
