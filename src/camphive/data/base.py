"""What every dataset family shares: splits, roots, options, and the in-memory dataset."""
from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from camphive.data.transforms import ToFloat
from camphive.errors import ConfigError, DataError

_SPLIT_ALIASES = {"train": "train", "test": "test", "val": "test", "validation": "test"}


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset family (no files are read)."""

    name: str
    input_shape: tuple[int, ...]
    num_classes: int
    classes: list[str] | None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def normalize_split(split: str) -> str:
    """``"train"`` or ``"test"`` (``"val"``/``"validation"`` mean the held-out split)."""
    key = str(split).strip().lower()
    if key not in _SPLIT_ALIASES:
        raise ConfigError(f"unknown split {split!r}; use 'train' or 'test'")
    return _SPLIT_ALIASES[key]


def data_root() -> Path:
    """Where datasets live by default: ``$CAMPHIVE_DATA``, else ``./data``."""
    return Path(os.environ.get("CAMPHIVE_DATA") or "data")


def check_options(name: str, options: Mapping, accepted: Sequence[str]) -> None:
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        known = ", ".join(accepted) if accepted else "none"
        raise ConfigError(f"unknown option(s) {', '.join(unknown)} for dataset {name!r}; accepted options: {known}")


def resolve_transform(transform, auto: Callable[[bool], Callable] | None, base: Callable, split: str) -> Callable:
    """Turn the ``transform`` argument of ``load`` into a callable.

    ``"auto"`` -> the dataset's default for the split (``auto(train)``: augmentation on the
    train split); ``"eval"`` -> the test-time default on any split (``auto(False)``: e.g.
    calibration batches drawn from training data); ``None`` -> ``base`` (conversion to a
    float tensor only); a callable is used as given.
    """
    if isinstance(transform, str):
        mode = transform.lower()
        if mode not in ("auto", "eval"):
            raise ConfigError(f"transform must be 'auto', 'eval', None or a callable, got {transform!r}")
        return auto(mode == "auto" and split == "train") if auto is not None else base
    if transform is None:
        return base
    if not callable(transform):
        raise ConfigError(f"transform must be 'auto', 'eval', None or a callable, got {type(transform).__name__}")
    return transform


def as_float_image(image) -> torch.Tensor:
    """Items are float tensors: convert what a user transform left as uint8."""
    if torch.is_tensor(image) and not image.is_floating_point():
        return ToFloat()(image)
    return image


def shape_after_transform(dataset: Dataset) -> tuple[int, ...]:
    """Shape of item 0 after the transform, without disturbing the global RNG."""
    if len(dataset) == 0:
        raise DataError(f"dataset {getattr(dataset, 'name', '?')} is empty; it has no input shape")
    with torch.random.fork_rng(devices=[]):
        image = dataset[0][0]
    return tuple(int(size) for size in image.shape)


class TensorImageDataset(Dataset):
    """Images held in memory as one tensor; items are ``(float image (C, H, W), int label)``.

    ``images``: ``(N, C, H, W)``, uint8 pixels (or float for synthetic data);
    ``labels``: ``(N,)`` int64 in ``[0, num_classes)``. ``transform`` receives the stored
    image (uint8 for real datasets) and returns a float tensor; when it supports batches
    (see :mod:`camphive.data.transforms`) whole batches can be transformed at once.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        name: str,
        num_classes: int,
        classes: list[str] | None,
        transform: Callable | None = None,
        split: str = "train",
        source: str | None = None,
    ):
        if images.dim() != 4:
            raise DataError(f"{name} images must be (N, C, H, W), got shape {tuple(images.shape)} from {source}")
        if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
            raise DataError(
                f"{name} has {images.shape[0]} images but labels of shape {tuple(labels.shape)} in {source}; "
                "the files do not belong together"
            )
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise DataError(
                f"{name} labels in {source} span [{int(labels.min())}, {int(labels.max())}], outside [0, {num_classes - 1}]; "
                "the label file is corrupt or belongs to another dataset"
            )
        self.images = images.contiguous()
        self.labels = labels.to(torch.int64)
        self._label_list = self.labels.tolist()  # python ints: cheaper per item than tensor indexing
        self.name = name
        self.num_classes = int(num_classes)
        self.classes = classes
        self.transform = transform if transform is not None else ToFloat()
        self.split = split
        self.source = source
        self._input_shape: tuple[int, ...] | None = None

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return as_float_image(self.transform(self.images[index])), self._label_list[index]

    @property
    def input_shape(self) -> tuple[int, ...]:
        if self._input_shape is None:
            self._input_shape = shape_after_transform(self)
        return self._input_shape

    @property
    def supports_batches(self) -> bool:
        return bool(getattr(self.transform, "supports_batches", False))

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inputs (B, C, H, W) float, targets (B,) int64)`` for ``indices``, transformed batch-wise."""
        if not self.supports_batches:
            raise ConfigError(
                f"the transform {self.transform!r} of {self.name} does not declare supports_batches; "
                "iterate the dataset item by item (a DataLoader) instead"
            )
        return as_float_image(self.transform(self.images[indices])), self.labels[indices]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, split={self.split!r}, size={len(self)}, "
            f"num_classes={self.num_classes}, transform={self.transform!r})"
        )
