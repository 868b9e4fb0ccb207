"""loader(): seeded order, subsets, and the batch-wise loader against a DataLoader."""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from camphive.data import TensorBatchLoader, load, loader
from camphive.data.transforms import RandomCrop, default_transform
from camphive.errors import ConfigError


@pytest.fixture()
def dataset():
    return load("synthetic", num_samples=50, num_classes=5, shape=(1, 4, 4), seed=0)


def _indices(batches, dataset) -> list[int]:
    """Recover which samples were yielded (synthetic images are unique)."""
    flat = dataset.images.flatten(1)
    found = []
    for inputs, targets in batches:
        for image, target in zip(inputs, targets):
            index = int((flat == image.flatten()).all(1).nonzero()[0])
            assert int(dataset.labels[index]) == int(target)
            found.append(index)
    return found


@pytest.mark.parametrize("batched", [True, False])
def test_test_loader_is_in_order_and_train_loader_shuffles_reproducibly(dataset, batched):
    in_order = loader(dataset, batch_size=16, batched=batched)
    assert isinstance(in_order, TensorBatchLoader if batched else DataLoader)
    assert len(in_order) == 4 and _indices(in_order, dataset) == list(range(50))
    shuffled = loader(dataset, batch_size=16, train=True, seed=1, batched=batched)
    epoch_one, epoch_two = _indices(shuffled, dataset), _indices(shuffled, dataset)
    assert sorted(epoch_one) == list(range(50)) and epoch_one != list(range(50)) and epoch_one != epoch_two
    again = loader(dataset, batch_size=16, train=True, seed=1, batched=batched)
    assert _indices(again, dataset) == epoch_one and _indices(again, dataset) == epoch_two
    assert _indices(loader(dataset, batch_size=16, train=True, seed=2, batched=batched), dataset) != epoch_one


def test_batch_loader_equals_data_loader_for_deterministic_transforms():
    dataset = load("synthetic", num_samples=20, shape=(3, 6, 6))
    dataset.transform = default_transform("cifar10", train=False)
    fast = list(loader(dataset, batch_size=8))
    plain = list(loader(dataset, batch_size=8, batched=False))
    assert len(fast) == len(plain) == 3
    for (fast_inputs, fast_targets), (inputs, targets) in zip(fast, plain):
        assert torch.equal(fast_inputs, inputs) and torch.equal(fast_targets, targets)


def test_subsets_and_drop_last(dataset):
    assert _indices(loader(dataset, batch_size=8, subset=10), dataset) == list(range(10))
    drawn = _indices(loader(dataset, batch_size=8, subset=10, random_subset=True, seed=3), dataset)
    assert len(set(drawn)) == 10 and drawn != list(range(10))
    assert drawn == _indices(loader(dataset, batch_size=8, subset=10, random_subset=True, seed=3), dataset)
    assert _indices(loader(dataset, batch_size=8, subset=[7, 3, 9]), dataset) == [7, 3, 9]
    dropped = loader(dataset, batch_size=16, drop_last=True)
    assert len(dropped) == 3 and len(_indices(dropped, dataset)) == 48
    for batched in (True, False):
        assert len(loader(dataset, subset=10, batched=batched).dataset) == 10
    with pytest.raises(ConfigError, match="between 1 and the dataset size 50"):
        loader(dataset, subset=51)
    with pytest.raises(ConfigError, match="subset indices"):
        loader(dataset, subset=[50])


def test_augmented_batches_are_deterministic_under_manual_seed(dataset):
    dataset.transform = RandomCrop(4, padding=1)

    def one_epoch() -> list[torch.Tensor]:
        return [inputs for inputs, _ in loader(dataset, batch_size=25, train=True)]

    torch.manual_seed(0)
    first = one_epoch()
    torch.manual_seed(0)
    assert all(torch.equal(a, b) for a, b in zip(first, one_epoch()))
    torch.manual_seed(1)
    assert not all(torch.equal(a, b) for a, b in zip(first, one_epoch()))
    assert first[0].dtype == torch.float32


def test_workers_and_user_transforms_use_a_data_loader(dataset):
    dataset.transform = lambda image: image * 2
    plain = loader(dataset, batch_size=10)
    assert isinstance(plain, DataLoader)
    assert torch.equal(next(iter(plain))[0], dataset.images[:10] * 2)
    with pytest.raises(ConfigError, match="batched=True needs"):
        loader(dataset, batched=True)
    with pytest.raises(ConfigError):
        loader(dataset, batch_size=0)


def test_batch_loader_restores_the_thread_setting(dataset):
    before = torch.get_num_threads()
    seen = []
    for _ in TensorBatchLoader(dataset, batch_size=10, threads=1):
        seen.append(torch.get_num_threads())  # the caller's code runs with its own setting
    assert seen == [before] * 5 and torch.get_num_threads() == before


def test_only_accelerators_and_datasets_that_fit_are_held_on_the_device(dataset):
    from camphive.data.loaders import device_resident

    assert not device_resident(dataset, None) and not device_resident(dataset, "cpu")
    assert device_resident(dataset, torch.device("cuda"))  # the decision alone: nothing is moved here
    assert not device_resident(dataset, torch.device("cuda"), max_bytes=dataset.images.numel() - 1)
    assert not device_resident(list(loader(dataset, batch_size=8)), torch.device("cuda"))  # not in memory as one tensor


def _augmented_batches(device):
    train = load("synthetic", num_samples=40, num_classes=4, shape=(3, 32, 32), seed=0)
    train.transform = default_transform("cifar10", train=True)  # crop + flip + normalize, drawn per image
    torch.manual_seed(5)
    return [(inputs.cpu(), targets.cpu()) for inputs, targets in
            TensorBatchLoader(train, batch_size=16, shuffle=True, seed=3, device=device)]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a GPU"))])
def test_device_resident_loader_yields_the_batches_of_the_host_loader(device):
    host = _augmented_batches(None)
    resident = _augmented_batches(device)
    assert len(host) == len(resident) == 3
    for (inputs, targets), (other_inputs, other_targets) in zip(host, resident):
        assert torch.equal(targets, other_targets)
        assert torch.allclose(inputs, other_inputs, atol=1e-6)
