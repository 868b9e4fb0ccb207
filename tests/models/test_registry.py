"""Tests for camphive.models.registry: names, options, architecture records."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from camphive import models
from camphive.errors import ConfigError
from camphive.models import registry

BUILTIN_NAMES = [
    "small-cnn", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet18",
    "resnet18-imagenet", "resnet34-imagenet", "resnet50-imagenet", "mobilenetv2",
    "mobilenetv2-imagenet",
]


@pytest.fixture
def clean_registry():
    """Undo any registration a test makes."""
    specs, lookup = dict(registry._SPECS), dict(registry._LOOKUP)
    yield
    registry._SPECS.clear()
    registry._SPECS.update(specs)
    registry._LOOKUP.clear()
    registry._LOOKUP.update(lookup)


def test_builtin_names_are_all_registered():
    assert list(models.MODELS) == BUILTIN_NAMES


@pytest.mark.parametrize(
    ("spelling", "canonical"),
    [
        ("small", "small-cnn"),
        ("Small_CNN", "small-cnn"),
        ("smallcnn", "small-cnn"),
        ("ResNet-56", "resnet56"),
        ("resnet18_imagenet", "resnet18-imagenet"),
        ("RESNET18 ImageNet", "resnet18-imagenet"),
        ("resnet18-cifar", "resnet18"),
        ("mobilenet_v2", "mobilenetv2"),
        ("MobileNet-V2-ImageNet", "mobilenetv2-imagenet"),
    ],
)
def test_spellings_resolve_to_canonical_name(spelling, canonical):
    assert models.describe(spelling).name == canonical


def test_unknown_name_lists_known_names_on_one_line():
    with pytest.raises(ConfigError) as info:
        models.create("resnet57")
    message = str(info.value)
    assert "'resnet57'" in message and "\n" not in message
    for name in BUILTIN_NAMES:
        assert name in message


def test_unknown_option_is_a_config_error_naming_the_valid_ones():
    with pytest.raises(ConfigError, match=r"no option width_mult.*zero_init_residual"):
        models.create("resnet20", width_mult=0.5)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "10"])
def test_num_classes_must_be_a_positive_integer(bad):
    with pytest.raises(ConfigError, match="num_classes"):
        models.create("small-cnn", num_classes=bad)


def test_arch_record_is_json_and_complete():
    model = models.create("MobileNet_V2", num_classes=7, in_channels=1, width_mult=0.5)
    assert model.camphive_arch == {
        "name": "mobilenetv2", "num_classes": 7, "in_channels": 1, "width_mult": 0.5,
        "dropout": 0.0, "zero_init_residual": False,
    }
    assert json.loads(json.dumps(model.camphive_arch)) == model.camphive_arch


def test_from_arch_rebuilds_the_same_model():
    torch.manual_seed(0)
    model = models.create("small", num_classes=4, in_channels=2, widths=(8, 8, 16))
    record = json.loads(json.dumps(model.camphive_arch))  # as a checkpoint would store it
    torch.manual_seed(0)
    again = models.from_arch(record)
    assert again.camphive_arch == model.camphive_arch
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name


def test_describe_reports_options_and_input():
    info = models.describe("mobilenetv2-imagenet").to_dict()
    assert info["options"] == {"width_mult": 1.0, "dropout": 0.2, "zero_init_residual": False}
    assert info["default_input"] == [3, 224, 224]
    json.dumps(info)


class TwoLayerNet(nn.Module):
    def __init__(self, num_classes: int, in_channels: int, hidden: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, hidden, 3)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x):
        return self.fc(self.flatten(self.pool(self.conv(x))))


def tiny_factory(num_classes: int = 10, in_channels: int = 3, hidden: int = 4) -> nn.Module:
    return TwoLayerNet(num_classes, in_channels, hidden)


def test_register_a_user_model(clean_registry):
    models.register("My_Tiny-Net", tiny_factory, aliases=("tiny",), description="test net")
    model = models.create("tiny", num_classes=3, hidden=6)
    assert isinstance(model, TwoLayerNet) and model.fc.out_features == 3
    assert model.conv.out_channels == 6
    assert model.camphive_arch == {
        "name": "my_tiny-net", "num_classes": 3, "in_channels": 3, "hidden": 6,
    }
    assert "my_tiny-net" in models.MODELS


def test_register_refuses_clashes_unless_overwrite(clean_registry):
    with pytest.raises(ConfigError, match="clashes"):
        models.register("ResNet_20", tiny_factory)
    models.register("resnet20", tiny_factory, overwrite=True)
    assert isinstance(models.create("resnet20"), TwoLayerNet)


def test_register_requires_num_classes_and_in_channels(clean_registry):
    with pytest.raises(ConfigError, match="in_channels"):
        models.register("bad", lambda num_classes=10: nn.Linear(2, num_classes))


def test_factory_must_return_a_module(clean_registry):
    models.register("not-a-model", lambda num_classes, in_channels: "oops")
    with pytest.raises(ConfigError, match="not an nn.Module"):
        models.create("not-a-model")


def test_non_json_option_is_refused(clean_registry):
    models.register("anything", lambda num_classes, in_channels, **kw: nn.Identity())
    with pytest.raises(ConfigError, match="JSON"):
        models.create("anything", norm=nn.BatchNorm2d)
