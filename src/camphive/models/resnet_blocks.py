"""Residual blocks and the stage-stacking ResNet body shared by the CIFAR and ImageNet nets.

Design choices that matter for pruning:

* Shortcuts that change shape are *projections* (1x1 conv + BN, "option B" of He et al.
  2016), never the parameter-free zero-padding "option A": channel pruning with a
  dependency graph needs a real layer whose channels it can remove together with the
  block's output channels.
* Every ReLU is its own non-inplace module, so forward hooks see each activation
  unmodified and curvature code (double backward, ``torch.func``) never meets in-place ops.
* The head is ``AdaptiveAvgPool2d(1) -> Flatten -> Linear``: any input size works and
  torch-pruning's dependency graph can trace it.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from camphive.models.init import init_standard, zero_init_last_norms


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding 1 and no bias (a BN always follows)."""
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


def conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution without bias (a BN always follows)."""
    return nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)


def projection(in_channels: int, out_channels: int, stride: int) -> nn.Sequential | None:
    """Option-B shortcut (1x1 conv + BN) when the shape changes, else None (identity)."""
    if stride == 1 and in_channels == out_channels:
        return None
    return nn.Sequential(
        conv1x1(in_channels, out_channels, stride), nn.BatchNorm2d(out_channels)
    )


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection; output channels = ``channels``."""

    expansion = 1

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        out_channels = channels * self.expansion
        self.conv1 = conv3x3(in_channels, channels, stride)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu1 = nn.ReLU()
        self.conv2 = conv3x3(channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample = projection(in_channels, out_channels, stride)
        self.relu2 = nn.ReLU()

    @property
    def last_norm(self) -> nn.BatchNorm2d:
        return self.bn2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride, as in "ResNet v1.5"), 1x1 expand by 4."""

    expansion = 4

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        out_channels = channels * self.expansion
        self.conv1 = conv1x1(in_channels, channels)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu1 = nn.ReLU()
        self.conv2 = conv3x3(channels, channels, stride)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu2 = nn.ReLU()
        self.conv3 = conv1x1(channels, out_channels)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.downsample = projection(in_channels, out_channels, stride)
        self.relu3 = nn.ReLU()

    @property
    def last_norm(self) -> nn.BatchNorm2d:
        return self.bn3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu3(out + identity)


class ResNet(nn.Module):
    """A stem, then stages ``layer1..layerN`` of residual blocks, then pool-flatten-fc.

    Input (B, in_channels, H, W) of any H, W large enough for the strides; output
    (B, num_classes) logits. Module names follow the usual convention (``conv1``,
    ``bn1``, ``layer2.0.conv1``, ``layer2.0.downsample.0``, ``fc``).
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        stage_depths: Sequence[int],
        stage_widths: Sequence[int],
        *,
        num_classes: int,
        in_channels: int,
        stem: str,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        stem_width = stage_widths[0]
        if stem == "cifar":  # 3x3 stride 1, no pooling: keeps 32x32 detail
            self.conv1 = conv3x3(in_channels, stem_width)
        elif stem == "imagenet":  # 7x7 stride 2 + 3x3 max-pool stride 2
            self.conv1 = nn.Conv2d(in_channels, stem_width, 7, stride=2, padding=3, bias=False)
        else:
            raise ValueError(f"unknown stem {stem!r}")
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1) if stem == "imagenet" else None

        channels = stem_width
        for index, (depth, width) in enumerate(zip(stage_depths, stage_widths)):
            stride = 1 if index == 0 else 2
            blocks = []
            for block_index in range(depth):
                blocks.append(block(channels, width, stride if block_index == 0 else 1))
                channels = width * block.expansion
            self.add_module(f"layer{index + 1}", nn.Sequential(*blocks))
        self.num_stages = len(stage_depths)

        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(channels, num_classes)

        init_standard(self)
        if zero_init_residual:
            zero_init_last_norms(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        if self.maxpool is not None:
            x = self.maxpool(x)
        for index in range(self.num_stages):
            x = getattr(self, f"layer{index + 1}")(x)
        return self.fc(self.flatten(self.avgpool(x)))
