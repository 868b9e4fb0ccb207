"""load() / info() / DATASETS: names, aliases, options and errors."""
from __future__ import annotations

import pytest

from camphive.data import DATASETS, canonical_name, info, load
from camphive.errors import ConfigError


def test_names_and_aliases():
    assert set(DATASETS) == {"fashion-mnist", "mnist", "cifar10", "cifar100", "imagenet", "synthetic"}
    for alias in ("Fashion-MNIST", "fashion_mnist", "FashionMNIST"):
        assert canonical_name(alias) == "fashion-mnist"
    assert canonical_name("CIFAR-100") == "cifar100"


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ConfigError, match="unknown dataset 'svhn'; known datasets: fashion-mnist, mnist, cifar10"):
        load("svhn")


@pytest.mark.parametrize(
    "name, shape, num_classes",
    [("fashion-mnist", (1, 28, 28), 10), ("cifar10", (3, 32, 32), 10), ("cifar100", (3, 32, 32), 100), ("imagenet", (3, 224, 224), 1000)],
)
def test_info(name, shape, num_classes):
    facts = info(name)
    assert facts.input_shape == shape and facts.num_classes == num_classes
    assert facts.to_dict()["name"] == name
    if facts.classes is not None:
        assert len(facts.classes) == num_classes
    assert len(facts.mean) == len(facts.std) == shape[0]


def test_info_of_cifar10_and_fashion():
    assert info("cifar10").classes[0] == "airplane" and info("fashion_mnist").classes[-1] == "Ankle boot"
    assert info("fashion-mnist").mean == (0.2860,) and info("fashion-mnist").std == (0.3530,)


def test_unknown_split_option_and_transform():
    with pytest.raises(ConfigError, match="unknown split 'dev'"):
        load("synthetic", split="dev")
    with pytest.raises(ConfigError, match="unknown option.*image_size.*for dataset 'cifar10'"):
        load("cifar10", image_size=32)
    with pytest.raises(ConfigError, match="transform must be"):
        load("synthetic", transform="fancy")
    with pytest.raises(ConfigError, match="transform must be"):
        load("synthetic", transform=3)
    assert load("synthetic", split="val", num_samples=4).split == "test"
