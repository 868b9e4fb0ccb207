"""MobileNetV2 (Sandler et al. 2018): inverted residuals with linear bottlenecks.

Each block expands with a 1x1 conv (factor t), filters with a 3x3 depthwise conv, and
projects back with a linear (no activation) 1x1 conv; a residual is added when stride is
1 and the channel count is unchanged. Activations are ReLU6.

Two layouts share the same weights (only the strides differ):

* ``imagenet``: stem stride 2 and the paper's strides, 32x down-sampling (224 -> 7);
  3.50M parameters for 1000 classes.
* ``cifar``: stem stride 1 and the 24-channel stage at stride 1 (the usual adaptation
  to 32x32 images), 8x down-sampling (32 -> 4); 2.24M parameters for 10 classes.

Module names: ``features.0`` is the stem, ``features.1``... the blocks (each with
``expand`` (absent when t = 1), ``depthwise``, ``project``, ``project_bn``),
``features.N`` the final 1x1 conv, and ``classifier`` the last Linear.
"""
from __future__ import annotations

import torch
from torch import nn

from camphive.errors import ConfigError
from camphive.models.init import init_standard, zero_init_last_norms

# (expansion t, output channels c, repeats n, first stride s) from Table 2 of the paper.
IMAGENET_SETTINGS: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
# CIFAR: the 24-channel stage keeps resolution (together with the stride-1 stem).
CIFAR_SETTINGS = tuple((t, c, n, 1 if c == 24 else s) for t, c, n, s in IMAGENET_SETTINGS)


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round a width to a multiple of ``divisor`` without dropping more than 10 %."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


class ConvBNReLU6(nn.Module):
    """Conv (no bias) -> BN -> ReLU6; ``groups`` = channels gives a depthwise conv."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
        groups: int = 1,
    ) -> None:
        super().__init__()
        padding = (kernel_size - 1) // 2
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=False
        )
        self.bn = nn.BatchNorm2d(out_channels)
        self.act = nn.ReLU6()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class InvertedResidual(nn.Module):
    """1x1 expand -> 3x3 depthwise -> 1x1 linear projection (+ residual when shapes match)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = int(round(in_channels * expansion))
        self.use_residual = stride == 1 and in_channels == out_channels
        self.expand = ConvBNReLU6(in_channels, hidden, 1) if expansion != 1 else None
        self.depthwise = ConvBNReLU6(hidden, hidden, 3, stride, groups=hidden)
        self.project = nn.Conv2d(hidden, out_channels, 1, bias=False)
        self.project_bn = nn.BatchNorm2d(out_channels)

    @property
    def last_norm(self) -> nn.BatchNorm2d | None:
        # Only residual blocks start as the identity when gamma is zeroed.
        return self.project_bn if self.use_residual else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x if self.expand is None else self.expand(x)
        out = self.project_bn(self.project(self.depthwise(out)))
        return x + out if self.use_residual else out


class MobileNetV2(nn.Module):
    """MobileNetV2; input (B, in_channels, H, W), output (B, num_classes) logits."""

    def __init__(
        self,
        num_classes: int = 1000,
        in_channels: int = 3,
        *,
        layout: str = "imagenet",
        width_mult: float = 1.0,
        dropout: float = 0.2,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        if not width_mult > 0:
            raise ConfigError(f"width_mult must be > 0 (e.g. 0.5, 1.0), got {width_mult}")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {dropout}")
        if layout not in ("imagenet", "cifar"):
            raise ConfigError(f"MobileNetV2 layout must be 'imagenet' or 'cifar', got {layout!r}")
        settings = IMAGENET_SETTINGS if layout == "imagenet" else CIFAR_SETTINGS
        stem_stride = 2 if layout == "imagenet" else 1

        channels = make_divisible(32 * width_mult)
        last_channels = make_divisible(1280 * max(1.0, width_mult))
        layers: list[nn.Module] = [ConvBNReLU6(in_channels, channels, 3, stem_stride)]
        for expansion, width, repeats, first_stride in settings:
            out_channels = make_divisible(width * width_mult)
            for index in range(repeats):
                stride = first_stride if index == 0 else 1
                layers.append(InvertedResidual(channels, out_channels, stride, expansion))
                channels = out_channels
        layers.append(ConvBNReLU6(channels, last_channels, 1))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(last_channels, num_classes))

        init_standard(self)
        if zero_init_residual:
            zero_init_last_norms(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.avgpool(self.features(x))))


def mobilenetv2_cifar(
    num_classes: int = 10, in_channels: int = 3, width_mult: float = 1.0, dropout: float = 0.0,
    zero_init_residual: bool = False,
) -> nn.Module:
    """MobileNetV2 for 32x32 inputs (stride-1 stem and first stages)."""
    return MobileNetV2(
        num_classes, in_channels, layout="cifar", width_mult=width_mult, dropout=dropout,
        zero_init_residual=zero_init_residual,
    )


def mobilenetv2_imagenet(
    num_classes: int = 1000, in_channels: int = 3, width_mult: float = 1.0, dropout: float = 0.2,
    zero_init_residual: bool = False,
) -> nn.Module:
    """MobileNetV2 with the paper's ImageNet strides."""
    return MobileNetV2(
        num_classes, in_channels, layout="imagenet", width_mult=width_mult, dropout=dropout,
        zero_init_residual=zero_init_residual,
    )
