"""A small 3-conv CNN with BatchNorm: the fast default model (Fashion-MNIST, CIFAR).

Layout, for a (B, C, 28, 28) input:

    conv1 3x3 C->32, bn1, ReLU, max-pool 2          -> (B, 32, 14, 14)
    conv2 3x3 32->64, bn2, ReLU, max-pool 2         -> (B, 64, 7, 7)
    conv3 3x3 64->128, bn3, ReLU, max-pool 2        -> (B, 128, 3, 3)
    adaptive average pool to 3x3, flatten           -> (B, 1152)
    fc1 1152->256, ReLU, dropout (off by default)
    fc2 256->num_classes                            -> (B, num_classes)

0.39M parameters for 1-channel input and 10 classes (fc1 holds three quarters of them).
For 28x28 inputs the adaptive pool is the identity; for other sizes (32x32, ...) it brings
the map to 3x3, so every input size >= 8 works, and exports to ONNX.
Module names are flat (conv1/bn1/.../fc1/fc2) so pruning reports read easily.
"""
from __future__ import annotations

import torch
from torch import nn

from camphive.errors import ConfigError
from camphive.models.init import init_standard


class ExportableAdaptiveAvgPool2d(nn.AdaptiveAvgPool2d):
    """Adaptive average pooling that also exports to ONNX when the size is not a multiple.

    The ONNX exporter only handles adaptive pooling whose output size divides the input
    size; during export the same windows (start floor(i*H/n), end ceil((i+1)*H/n)) are
    averaged explicitly, which gives identical numbers.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = int(x.shape[-2]), int(x.shape[-1])
        rows, cols = (self.output_size, self.output_size) if isinstance(self.output_size, int) else self.output_size
        if not torch.onnx.is_in_onnx_export() or (height % rows == 0 and width % cols == 0):
            return super().forward(x)
        x = torch.cat([x[..., (i * height) // rows : -((-(i + 1) * height) // rows), :].mean(-2, keepdim=True)
                       for i in range(rows)], dim=-2)
        return torch.cat([x[..., (j * width) // cols : -((-(j + 1) * width) // cols)].mean(-1, keepdim=True)
                          for j in range(cols)], dim=-1)


class SmallCNN(nn.Module):
    """Three conv-BN-ReLU-pool stages and a two-layer classifier."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        *,
        widths: tuple[int, int, int] = (32, 64, 128),
        hidden_features: int = 256,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if len(widths) != 3 or min(widths) < 1:
            raise ConfigError(f"small-cnn widths must be 3 positive ints, got {widths}")
        if hidden_features < 1:
            raise ConfigError(f"small-cnn hidden_features must be >= 1, got {hidden_features}")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {dropout}")
        w1, w2, w3 = widths
        self.conv1 = nn.Conv2d(in_channels, w1, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(w1)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(w1, w2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(w2)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(w2, w3, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(w3)
        self.relu3 = nn.ReLU()
        self.pool3 = nn.MaxPool2d(2)
        self.adaptive_pool = ExportableAdaptiveAvgPool2d(3)
        self.flatten = nn.Flatten(1)
        self.fc1 = nn.Linear(w3 * 9, hidden_features)
        self.relu4 = nn.ReLU()
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden_features, num_classes)
        init_standard(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.relu1(self.bn1(self.conv1(x))))
        x = self.pool2(self.relu2(self.bn2(self.conv2(x))))
        x = self.pool3(self.relu3(self.bn3(self.conv3(x))))
        x = self.flatten(self.adaptive_pool(x))
        return self.fc2(self.dropout(self.relu4(self.fc1(x))))


def small_cnn(
    num_classes: int = 10,
    in_channels: int = 1,
    widths: tuple[int, int, int] | list[int] = (32, 64, 128),
    hidden_features: int = 256,
    dropout: float = 0.0,
) -> nn.Module:
    """The small CNN; see the module docstring for the layout."""
    return SmallCNN(
        num_classes, in_channels, widths=tuple(widths), hidden_features=hidden_features,
        dropout=dropout,
    )
