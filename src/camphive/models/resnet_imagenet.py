"""ImageNet ResNets (He et al. 2016): 7x7 stride-2 stem, 3x3 max-pool, four stages.

ResNet-18/34 use BasicBlocks, ResNet-50 Bottlenecks with the stride on the 3x3 conv
("v1.5", the common torchvision-compatible layout). For 1000 classes: 11.69M, 21.80M
and 25.56M parameters. Any input of at least ~32x32 works thanks to global pooling.
"""
from __future__ import annotations

from torch import nn

from camphive.models.resnet_blocks import BasicBlock, Bottleneck, ResNet

IMAGENET_LAYOUTS: dict[int, tuple[type[BasicBlock] | type[Bottleneck], tuple[int, ...]]] = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
}


def imagenet_resnet(
    depth: int, num_classes: int = 1000, in_channels: int = 3, zero_init_residual: bool = False
) -> nn.Module:
    """ResNet-``depth`` (18, 34 or 50) with the ImageNet stem."""
    block, stage_depths = IMAGENET_LAYOUTS[depth]
    return ResNet(
        block,
        stage_depths,
        (64, 128, 256, 512),
        num_classes=num_classes,
        in_channels=in_channels,
        stem="imagenet",
        zero_init_residual=zero_init_residual,
    )
