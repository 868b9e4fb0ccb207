"""Every built-in model (camphive.models.catalog): shapes, input kinds, init, ranges."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from camphive import models

ALL = list(models.MODELS)


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(("name", "num_classes", "low", "high"), [
    ("resnet20", 10, 0.26e6, 0.28e6),
    ("resnet56", 10, 0.84e6, 0.87e6),
    ("resnet18", 10, 11.1e6, 11.25e6),
    ("resnet18-imagenet", 1000, 11.68e6, 11.70e6),
    ("resnet50-imagenet", 1000, 25.55e6, 25.56e6),
    ("mobilenetv2", 10, 2.2e6, 2.3e6),
    ("mobilenetv2-imagenet", 1000, 3.4e6, 3.6e6),
])
def test_parameter_count_ranges(name, num_classes, low, high):
    assert low <= count(models.create(name, num_classes=num_classes)) <= high


def test_small_cnn_parameter_range_for_fashion_mnist():
    assert 0.38e6 <= count(models.create("small-cnn", num_classes=10, in_channels=1)) <= 0.46e6


@pytest.mark.parametrize("name", ALL)
def test_output_shapes_for_mnist_and_cifar_inputs(name):
    with torch.no_grad():
        gray = models.create(name, num_classes=7, in_channels=1).eval()
        assert gray(torch.randn(2, 1, 28, 28)).shape == (2, 7)
        color = models.create(name, num_classes=5, in_channels=3).eval()
        assert color(torch.randn(2, 3, 32, 32)).shape == (2, 5)


@pytest.mark.parametrize("name", ["small-cnn", "resnet20", "resnet18-imagenet", "resnet50-imagenet",
                                  "mobilenetv2-imagenet"])
def test_output_shape_for_imagenet_input(name):
    model = models.create(name, num_classes=3).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 224, 224)).shape == (1, 3)


@pytest.mark.parametrize("name", ALL)
def test_classifier_is_the_last_linear_and_init_is_standard(name):
    model = models.create(name, num_classes=6)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears[-1].out_features == 6
    assert list(model.modules())[-1] is linears[-1]
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            assert torch.all(module.weight == 1) and torch.all(module.bias == 0)


def test_conv_init_is_kaiming_fan_out():
    torch.manual_seed(0)
    conv = models.create("resnet56").layer3[4].conv1  # 64x64x3x3, fan_out 576
    expected_std = (2.0 / (64 * 9)) ** 0.5
    assert abs(conv.weight.std().item() / expected_std - 1) < 0.03
    assert abs(conv.weight.mean().item()) < 0.05 * expected_std


@pytest.mark.parametrize("name", ALL)
def test_no_inplace_activations(name):
    # Hooks must see unmodified activations and double backward must not meet in-place ops.
    for module in models.create(name).modules():
        assert not getattr(module, "inplace", False), module


def test_models_support_double_backward():
    """Hessian-vector products need second derivatives through every op."""
    model = models.create("mobilenetv2", num_classes=3, width_mult=0.25).eval()
    loss = nn.functional.cross_entropy(model(torch.randn(2, 3, 8, 8)), torch.tensor([0, 2]))
    params = [p for p in model.parameters() if p.ndim > 1]
    grads = torch.autograd.grad(loss, params, create_graph=True)
    dot = sum((g * torch.ones_like(g)).sum() for g in grads)
    hvp = torch.autograd.grad(dot, params)
    assert all(torch.isfinite(h).all() for h in hvp)
    assert any(h.abs().sum() > 0 for h in hvp)
