"""Standard weight initialisation shared by the built-in architectures.

Convolutions get Kaiming-normal weights (fan-out, ReLU gain) as in He et al. 2015;
BatchNorm starts as the identity (weight 1, bias 0); linear layers keep PyTorch's default
(Kaiming-uniform), which is what the reference ResNet training recipes use.
"""
from __future__ import annotations

from torch import nn


def init_standard(model: nn.Module) -> None:
    """Initialise every conv and BatchNorm of ``model`` in place."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def zero_init_last_norms(model: nn.Module) -> None:
    """Set gamma of the last BN in every residual block to 0 (Goyal et al. 2017).

    Each residual block then starts as the identity, which helps very deep nets train.
    Blocks mark their last BN by exposing it as ``block.last_norm``.
    """
    for module in model.modules():
        last_norm = getattr(module, "last_norm", None)
        if isinstance(last_norm, nn.BatchNorm2d):
            nn.init.zeros_(last_norm.weight)
