"""Tests for camphive.models.resnet_cifar."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from camphive import models
from camphive.errors import ConfigError
from camphive.models.resnet_blocks import BasicBlock
from camphive.models.resnet_cifar import cifar_resnet

# He et al.'s option-A counts (zero-padding shortcuts) are the published references:
# resnet20 269,722 and resnet56 853,018 parameters for 10 classes. Option B adds two
# projections: 1x1 16->32 conv + BN (512 + 64) and 1x1 32->64 conv + BN (2048 + 128).
PROJECTIONS = 512 + 64 + 2048 + 128


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    ("name", "option_a_count"), [("resnet20", 269_722), ("resnet56", 853_018)]
)
def test_parameter_counts_match_paper_plus_projections(name, option_a_count):
    assert count(models.create(name)) == option_a_count + PROJECTIONS


def test_resnet56_within_reported_range():
    assert 0.84e6 <= count(models.create("resnet56")) <= 0.87e6


def test_resnet18_cifar_count():
    # torchvision's ResNet-18 (11,689,512 for 1000 classes) minus the 7x7 stem
    # (3*64*49) plus a 3x3 stem (3*64*9), and a 512x10 head instead of 512x1000.
    expected = 11_689_512 - 3 * 64 * 49 + 3 * 64 * 9 - 512 * 990 - 990
    assert count(models.create("resnet18")) == expected == 11_173_962


@pytest.mark.parametrize("depth", [20, 32, 44, 56, 110])
def test_depth_is_counted_in_weighted_layers(depth):
    model = models.create(f"resnet{depth}")
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
    main_path_convs = sum(1 for b in blocks for _ in (b.conv1, b.conv2))
    assert 1 + main_path_convs + 1 == depth  # stem + 2 per block + fc
    assert sum(b.downsample is not None for b in blocks) == 2


def test_stage_widths_and_resolution():
    model = models.create("resnet20").eval()
    shapes = {}
    for name in ("layer1", "layer2", "layer3"):
        getattr(model, name).register_forward_hook(
            lambda m, i, o, name=name: shapes.update({name: tuple(o.shape)})
        )
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    assert shapes == {"layer1": (1, 16, 32, 32), "layer2": (1, 32, 16, 16),
                      "layer3": (1, 64, 8, 8)}


def test_cifar_resnet18_has_no_max_pool_and_3x3_stem():
    model = models.create("resnet18")
    assert model.maxpool is None
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)


def test_bad_depth_is_a_config_error():
    with pytest.raises(ConfigError, match="6n\\+2"):
        cifar_resnet(21)


def test_zero_init_residual_makes_blocks_start_as_identity():
    model = models.create("resnet20", zero_init_residual=True).eval()
    zeroed = [m.bn2 for m in model.modules() if isinstance(m, BasicBlock)]
    assert len(zeroed) == 9 and all(torch.all(bn.weight == 0) for bn in zeroed)
    block = model.layer1[1]  # identity shortcut: output = relu(relu(x)) = x for x >= 0
    x = torch.rand(2, 16, 8, 8)
    with torch.no_grad():
        assert torch.equal(block(x), x)
    default = models.create("resnet20")
    assert all(torch.all(m.bn2.weight == 1) for m in default.modules()
               if isinstance(m, BasicBlock))
