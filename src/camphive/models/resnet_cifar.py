"""CIFAR ResNets (He et al. 2016, section 4.2) and the CIFAR variant of ResNet-18.

``resnet{20,32,44,56,110}``: a 3x3 stem with 16 channels, then three stages of
n = (depth - 2) / 6 BasicBlocks with 16, 32 and 64 channels (strides 1, 2, 2), global
average pooling and one linear layer. The paper's CIFAR nets use zero-padding shortcuts
("option A"); here the two shape-changing shortcuts are 1x1 conv + BN projections
("option B") so that structured pruning can remove their channels (see
``resnet_blocks``). This adds about 2.7k parameters: resnet20 has 0.272M, resnet56 0.856M.

``resnet18`` (CIFAR): the ImageNet ResNet-18 body (64-512 channels, [2, 2, 2, 2]) with a
3x3 stride-1 stem and no max-pool, as commonly trained on 32x32 images; 11.17M
parameters for 10 classes.
"""
from __future__ import annotations

from torch import nn

from camphive.errors import ConfigError
from camphive.models.resnet_blocks import BasicBlock, ResNet

CIFAR_DEPTHS = (20, 32, 44, 56, 110)


def cifar_resnet(
    depth: int, num_classes: int = 10, in_channels: int = 3, zero_init_residual: bool = False
) -> nn.Module:
    """He et al.'s CIFAR ResNet of ``depth`` = 6n + 2 layers (20, 32, 44, 56, 110, ...)."""
    if depth < 8 or (depth - 2) % 6 != 0:
        raise ConfigError(
            f"CIFAR ResNet depth must be 6n+2 with n >= 1 (e.g. 20, 56, 110), got {depth}"
        )
    blocks_per_stage = (depth - 2) // 6
    return ResNet(
        BasicBlock,
        (blocks_per_stage,) * 3,
        (16, 32, 64),
        num_classes=num_classes,
        in_channels=in_channels,
        stem="cifar",
        zero_init_residual=zero_init_residual,
    )


def resnet18_cifar(
    num_classes: int = 10, in_channels: int = 3, zero_init_residual: bool = False
) -> nn.Module:
    """ResNet-18 with a 3x3 stride-1 stem and no max-pool, for 32x32 inputs."""
    return ResNet(
        BasicBlock,
        (2, 2, 2, 2),
        (64, 128, 256, 512),
        num_classes=num_classes,
        in_channels=in_channels,
        stem="cifar",
        zero_init_residual=zero_init_residual,
    )
