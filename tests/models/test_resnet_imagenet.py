"""Tests for camphive.models.resnet_imagenet."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from camphive import models
from camphive.models.resnet_blocks import Bottleneck


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# torchvision's published counts for resnet18/34/50 (1000 classes).
@pytest.mark.parametrize(
    ("name", "expected"),
    [("resnet18-imagenet", 11_689_512), ("resnet34-imagenet", 21_797_672),
     ("resnet50-imagenet", 25_557_032)],
)
def test_parameter_counts_match_reference(name, expected):
    assert count(models.create(name, num_classes=1000)) == expected


def test_stem_and_32x_downsampling():
    model = models.create("resnet18-imagenet").eval()
    assert model.conv1.kernel_size == (7, 7) and model.conv1.stride == (2, 2)
    assert isinstance(model.maxpool, nn.MaxPool2d)
    seen = {}
    model.layer4.register_forward_hook(lambda m, i, o: seen.update(out=o.shape))
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    assert seen["out"] == (1, 512, 2, 2)


def test_resnet50_uses_bottlenecks_with_stride_on_3x3():
    model = models.create("resnet50-imagenet")
    first = model.layer2[0]
    assert isinstance(first, Bottleneck)
    assert first.conv1.stride == (1, 1) and first.conv2.stride == (2, 2)
    assert first.conv3.out_channels == 512 and model.fc.in_features == 2048
