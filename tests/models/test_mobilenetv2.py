"""Tests for camphive.models.mobilenetv2."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from camphive import models
from camphive.errors import ConfigError
from camphive.models.mobilenetv2 import InvertedResidual, make_divisible


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_imagenet_count_matches_reference():
    # torchvision's mobilenet_v2: 3,504,872 parameters for 1000 classes.
    assert count(models.create("mobilenetv2-imagenet", num_classes=1000)) == 3_504_872


def test_cifar_count_differs_only_in_the_head():
    expected = 3_504_872 - 1281 * 1000 + 1281 * 10
    assert count(models.create("mobilenetv2", num_classes=10)) == expected == 2_236_682


def test_blocks_structure():
    model = models.create("mobilenetv2-imagenet")
    blocks = [m for m in model.modules() if isinstance(m, InvertedResidual)]
    assert len(blocks) == 17
    assert blocks[0].expand is None  # t = 1
    assert sum(b.use_residual for b in blocks) == 10
    for block in blocks:
        dw = block.depthwise.conv
        assert dw.groups == dw.in_channels == dw.out_channels
        assert isinstance(block.depthwise.act, nn.ReLU6)
    assert isinstance(model.classifier[-1], nn.Linear)


@pytest.mark.parametrize(("name", "size", "final"), [
    ("mobilenetv2", 32, 4), ("mobilenetv2-imagenet", 64, 2),
])
def test_downsampling(name, size, final):
    model = models.create(name).eval()
    with torch.no_grad():
        features = model.features(torch.randn(1, 3, size, size))
    assert features.shape == (1, 1280, final, final)


def test_width_mult():
    model = models.create("mobilenetv2", width_mult=0.5)
    assert model.features[0].conv.out_channels == 16
    assert model.features[-1].conv.out_channels == 1280  # never below 1280
    wide = models.create("mobilenetv2", width_mult=1.4)
    assert wide.features[-1].conv.out_channels == 1792
    with pytest.raises(ConfigError, match="width_mult"):
        models.create("mobilenetv2", width_mult=0)


@pytest.mark.parametrize(("value", "expected"), [(32, 32), (16 * 0.5, 8), (24 * 0.75, 24),
                                                 (3, 8), (100, 104), (92, 96)])
def test_make_divisible(value, expected):
    assert make_divisible(value) == expected


def test_zero_init_residual_only_touches_residual_blocks():
    model = models.create("mobilenetv2", zero_init_residual=True)
    blocks = [m for m in model.modules() if isinstance(m, InvertedResidual)]
    for block in blocks:
        expected = 0.0 if block.use_residual else 1.0
        assert torch.all(block.project_bn.weight == expected)
