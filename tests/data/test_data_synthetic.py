"""Synthetic data: deterministic, split-dependent, balanced and learnable."""
from __future__ import annotations

import pytest
import torch

from camphive.data import load
from camphive.errors import ConfigError


def test_same_seed_same_data_and_splits_differ():
    first = load("synthetic", num_samples=64, seed=3)
    second = load("synthetic", num_samples=64, seed=3)
    assert torch.equal(first.images, second.images) and torch.equal(first.labels, second.labels)
    test = load("synthetic", split="test", num_samples=64, seed=3)
    other_seed = load("synthetic", num_samples=64, seed=4)
    assert not torch.equal(first.images, test.images)
    assert not torch.equal(first.images, other_seed.images)


def test_shapes_labels_and_attributes():
    dataset = load("synthetic", num_samples=30, num_classes=3, shape=(2, 5, 7))
    image, label = dataset[0]
    assert image.dtype == torch.float32 and image.shape == (2, 5, 7) and isinstance(label, int)
    assert dataset.input_shape == (2, 5, 7) and dataset.num_classes == 3 and len(dataset) == 30
    assert dataset.classes == ["class_0", "class_1", "class_2"] and dataset.name == "synthetic"
    assert torch.bincount(dataset.labels).tolist() == [10, 10, 10]


def test_nearest_class_mean_of_train_classifies_test():
    train = load("synthetic", num_samples=200, seed=1)
    test = load("synthetic", split="test", num_samples=200, seed=1)
    means = torch.stack([train.images[train.labels == label].mean(0).flatten() for label in range(10)])
    predicted = torch.cdist(test.images.flatten(1), means).argmin(1)
    assert (predicted == test.labels).float().mean() > 0.9


@pytest.fixture()
def one_thread():
    """Tiny ops run ~30x slower split over threads on a busy shared machine; restore after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_a_small_network_learns_it(one_thread):
    torch.manual_seed(0)
    train = load("synthetic", num_samples=128, num_classes=4, shape=(3, 8, 8), seed=2)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(), torch.nn.Linear(32, 4))
    parameters = list(model.parameters())
    losses = []
    for _ in range(20):  # plain gradient descent: torch.optim's first use imports dynamo (seconds)
        loss = torch.nn.functional.cross_entropy(model(train.images), train.labels)
        gradients = torch.autograd.grad(loss, parameters)
        with torch.no_grad():
            for parameter, gradient in zip(parameters, gradients):
                parameter -= 0.5 * gradient
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize(
    "options",
    [{"num_samples": 0}, {"num_classes": -1}, {"shape": (3, 0, 4)}, {"shape": (8,)}, {"noise": -1.0}, {"colour": True}],
)
def test_bad_options(options):
    with pytest.raises(ConfigError):
        load("synthetic", **options)
