"""Datasets by name: ``load(name, root, split)`` returns a ``Dataset`` of ``(image, label)``.

Images are float tensors ``(C, H, W)`` (normalized by the default ``transform="auto"``),
labels python ints. Every dataset exposes ``name``, ``num_classes``, ``classes`` and
``input_shape``. ``loader(dataset, ...)`` batches it, seeded and repeatable.

>>> train = load("fashion-mnist", split="train")
>>> batches = loader(train, batch_size=128, train=True, seed=0)
"""
from __future__ import annotations

from collections.abc import Callable

from torch.utils.data import Dataset

from camphive.data import cifar, imagenet, mnist, synthetic
from camphive.data.base import DatasetInfo, TensorImageDataset, data_root
from camphive.data.imagenet import ImageFolderDataset
from camphive.data.loaders import TensorBatchLoader, loader
from camphive.errors import ConfigError

_LOADERS: dict[str, Callable[..., Dataset]] = {
    "fashion-mnist": mnist.load_fashion_mnist,
    "mnist": mnist.load_mnist,
    "cifar10": cifar.load_cifar10,
    "cifar100": cifar.load_cifar100,
    "imagenet": imagenet.load_imagenet,
    "synthetic": synthetic.load_synthetic,
}
_INFO: dict[str, DatasetInfo] = {**mnist.INFO, **cifar.INFO, **imagenet.INFO, **synthetic.INFO}
_ALIASES = {
    "fashion_mnist": "fashion-mnist",
    "fashionmnist": "fashion-mnist",
    "cifar-10": "cifar10",
    "cifar_10": "cifar10",
    "cifar-100": "cifar100",
    "cifar_100": "cifar100",
    "imagenet1k": "imagenet",
    "imagenet-1k": "imagenet",
}
DATASETS: tuple[str, ...] = tuple(_LOADERS)


def canonical_name(name: str) -> str:
    """The registered name for ``name`` (case-insensitive, aliases such as ``fashion_mnist``)."""
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    if key not in _LOADERS:
        raise ConfigError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")
    return key


def load(name: str, root=None, split: str = "train", transform="auto", **options) -> Dataset:
    """Load dataset ``name``'s ``split`` ("train" or "test") from ``root``.

    ``transform``: ``"auto"`` (the dataset's standard augmentation for train and
    normalization), ``"eval"`` (the test-time transform on any split, e.g. for calibration
    batches drawn from the training data), ``None`` (pixels as floats in [0, 1], nothing else), or a callable
    applied to the stored image (a uint8 ``(C, H, W)`` tensor; a PIL image for imagenet).
    ``options`` are dataset-specific: cifar100 ``labels="fine"|"coarse"``; imagenet
    ``image_size``; synthetic ``num_samples``, ``num_classes``, ``shape``, ``seed``, ``noise``.
    """
    return _LOADERS[canonical_name(name)](root=root, split=split, transform=transform, **options)


def info(name: str) -> DatasetInfo:
    """Default input shape, class count and names, normalization of ``name`` (no files read)."""
    return _INFO[canonical_name(name)]


__all__ = [
    "DATASETS",
    "DatasetInfo",
    "ImageFolderDataset",
    "TensorBatchLoader",
    "TensorImageDataset",
    "canonical_name",
    "data_root",
    "info",
    "load",
    "loader",
]
