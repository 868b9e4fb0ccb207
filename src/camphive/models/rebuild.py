"""Reshape a freshly created model so a structurally pruned state dict loads into it.

Structured pruning removes channels: convs, linears and BatchNorms end up smaller than
the architecture ``create()`` builds. Rather than pickling the pruned modules (code in a
checkpoint), a checkpoint stores the architecture record and a plain state dict; this
module swaps every layer whose stored shapes differ for a layer of the stored shapes,
after which ``model.load_state_dict(state_dict)`` succeeds. Forward code needs no change
because it only chains modules (channel counts are never hard-coded in ``forward``).
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from camphive.errors import CheckpointError

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def rebuild_to_state_dict_shapes(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor]
) -> nn.Module:
    """Replace convs, linears and BatchNorms of ``model`` whose shapes differ from
    ``state_dict``'s with new (uninitialised-for-loading) modules of the stored shapes.

    Stride, padding, dilation, bias presence, eps/momentum and train/eval mode are kept.
    A depthwise conv (groups == in_channels) stays depthwise with the new channel count;
    other grouped convs keep their number of groups (as torch-pruning does) and take
    in_channels = groups * weight.shape[1]. Modifies ``model`` in place and returns it;
    raises ``CheckpointError`` when a stored shape cannot be matched (e.g. another
    architecture, a different kernel size, or a module type that cannot be resized).
    Load the weights afterwards with ``model.load_state_dict(state_dict)``.
    """
    for name, module in list(model.named_modules()):
        prefix = f"{name}." if name else ""
        replacement = _resized_module(module, prefix, state_dict)
        if replacement is None:
            continue
        replacement.train(module.training)
        if not name:
            model = replacement
        else:
            parent_name, _, child_name = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child_name, replacement)
    _check_shapes_match(model, state_dict)
    return model


def _resized_module(
    module: nn.Module, prefix: str, state_dict: Mapping[str, torch.Tensor]
) -> nn.Module | None:
    """A same-kind module with the stored shapes, or None when nothing needs to change."""
    if type(module) in CONV_TYPES:
        weight = state_dict.get(prefix + "weight")
        if weight is None or weight.shape == module.weight.shape:
            return None
        return _resized_conv(module, tuple(weight.shape), prefix)
    if type(module) is nn.Linear:
        weight = state_dict.get(prefix + "weight")
        if weight is None or weight.shape == module.weight.shape:
            return None
        if weight.ndim != 2:
            raise CheckpointError(
                f"checkpoint weight {prefix}weight has shape {tuple(weight.shape)}, but "
                "the model has a Linear there; load it into the architecture it came from"
            )
        return nn.Linear(
            weight.shape[1], weight.shape[0], bias=module.bias is not None,
            device=module.weight.device, dtype=module.weight.dtype,
        )
    if type(module) in NORM_TYPES:
        key = prefix + ("weight" if module.affine else "running_mean")
        stored = state_dict.get(key)
        current = module.weight if module.affine else module.running_mean
        if stored is None or current is None or stored.shape == current.shape:
            return None
        return type(module)(
            stored.shape[0], eps=module.eps, momentum=module.momentum, affine=module.affine,
            track_running_stats=module.track_running_stats,
            device=current.device, dtype=current.dtype,
        )
    return None


def _resized_conv(module: nn.Module, shape: tuple[int, ...], prefix: str) -> nn.Module:
    out_channels, in_per_group, *kernel = shape
    if len(shape) != module.weight.ndim or tuple(kernel) != tuple(module.kernel_size):
        raise CheckpointError(
            f"checkpoint weight {prefix}weight has shape {shape}, which does not fit the "
            f"model's {type(module).__name__} with kernel {tuple(module.kernel_size)}; "
            "load it into the architecture it came from"
        )
    if module.groups == 1:
        groups, in_channels = 1, in_per_group
    elif module.groups == module.in_channels:
        # Depthwise (possibly with a channel multiplier): pruning removes input channels
        # together with their filters, so the multiplier is preserved.
        multiplier = module.out_channels // module.in_channels
        if in_per_group != 1 or out_channels % multiplier:
            raise CheckpointError(
                f"checkpoint weight {prefix}weight has shape {shape}, which is not a "
                f"depthwise conv with channel multiplier {multiplier} like the model's"
            )
        in_channels = groups = out_channels // multiplier
    else:
        groups = module.groups
        in_channels = groups * in_per_group
        if out_channels % groups:
            raise CheckpointError(
                f"checkpoint weight {prefix}weight has {out_channels} filters, not a "
                f"multiple of the model conv's {groups} groups"
            )
    return type(module)(
        in_channels, out_channels, module.kernel_size, stride=module.stride,
        padding=module.padding, dilation=module.dilation, groups=groups,
        bias=module.bias is not None, padding_mode=module.padding_mode,
        device=module.weight.device, dtype=module.weight.dtype,
    )


def _check_shapes_match(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Fail with one line on the first tensor still shaped differently after rebuilding."""
    own = model.state_dict()
    for key, stored in state_dict.items():
        if key in own and hasattr(stored, "shape") and own[key].shape != stored.shape:
            raise CheckpointError(
                f"checkpoint tensor {key} has shape {tuple(stored.shape)} but the model's is "
                f"{tuple(own[key].shape)} and that layer cannot be resized; load the "
                "checkpoint into the architecture it came from"
            )
