"""Tests for camphive.models.small (the small CNN)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from camphive import models
from camphive.errors import ConfigError


def test_parameter_count_matches_hand_count():
    model = models.create("small-cnn", num_classes=10, in_channels=1)
    convs = 1 * 32 * 9 + 32 * 64 * 9 + 64 * 128 * 9  # no conv bias: BN follows
    norms = 2 * (32 + 64 + 128)
    linears = (1152 * 256 + 256) + (256 * 10 + 10)
    assert sum(p.numel() for p in model.parameters()) == convs + norms + linears == 390_634


def test_module_names_are_flat_and_readable():
    names = {name for name, _ in models.create("small-cnn").named_modules()}
    assert {"conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "fc1", "fc2"} <= names
    assert isinstance(models.create("small").fc2, nn.Linear)


def test_feature_map_is_3x3_for_28_and_32_inputs():
    model = models.create("small-cnn", in_channels=1).eval()
    for size in (28, 32, 8):
        features = {}
        model.flatten.register_forward_hook(lambda m, i, o: features.update(out=o))
        with torch.no_grad():
            model(torch.randn(2, 1, size, size))
        assert features["out"].shape == (2, 128 * 9)


def test_dropout_option_and_validation():
    model = models.create("small-cnn", dropout=0.3)
    assert model.dropout.p == 0.3
    with pytest.raises(ConfigError, match="dropout"):
        models.create("small-cnn", dropout=1.0)
    with pytest.raises(ConfigError, match="widths"):
        models.create("small-cnn", widths=(8, 8))


def test_learns_a_small_batch():
    """It trains: 25 Adam steps fit 32 random labelled images."""
    torch.manual_seed(0)
    model = models.create("small-cnn", in_channels=1)
    inputs, targets = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(25):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(inputs), targets)
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(inputs).argmax(1) == targets).float().mean().item()
    assert accuracy == 1.0


def test_small_cnn_exports_to_onnx_on_cifar_sized_input(tmp_path):
    import torch

    from camphive import models
    from camphive.export import export_onnx

    model = models.create("small-cnn", num_classes=10, in_channels=3).eval()
    result = export_onnx(model, tmp_path / "m.onnx", torch.randn(2, 3, 32, 32))
    assert result.max_abs_diff <= 1e-4
