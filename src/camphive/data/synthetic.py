"""Deterministic synthetic images that a small network can learn: class patterns plus noise.

Each class owns a smooth random pattern (drawn at low resolution and upsampled, so that
convolutions and pooling keep it); a sample is its class pattern plus Gaussian noise.
The patterns depend only on ``seed`` (shared by both splits); the noise and the label
order depend on ``seed`` and the split, so train and test hold different samples of the
same task.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from camphive.data.base import DatasetInfo, TensorImageDataset, check_options, normalize_split, resolve_transform
from camphive.data.transforms import ToFloat
from camphive.errors import ConfigError

INFO = {"synthetic": DatasetInfo("synthetic", (3, 32, 32), 10, [f"class_{index}" for index in range(10)])}
_SPLIT_STREAM = {"train": 1, "test": 2}


def class_patterns(num_classes: int, shape: tuple[int, int, int], seed: int) -> torch.Tensor:
    """``(num_classes, C, H, W)`` patterns, each of zero mean and unit variance, smooth in space."""
    generator = torch.Generator().manual_seed(int(seed) * 3)
    channels, height, width = shape
    coarse = torch.randn((num_classes, channels, min(4, height), min(4, width)), generator=generator)
    patterns = F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    flat = patterns.flatten(1)
    return ((flat - flat.mean(1, keepdim=True)) / flat.std(1, keepdim=True).clamp_min(1e-6)).reshape(patterns.shape)


def make_synthetic(num_samples: int, num_classes: int, shape: tuple[int, int, int], seed: int, split: str, noise: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs (num_samples, *shape) float32, labels (num_samples,) int64)``, balanced classes."""
    generator = torch.Generator().manual_seed(int(seed) * 3 + _SPLIT_STREAM[split])
    labels = (torch.arange(num_samples) % num_classes)[torch.randperm(num_samples, generator=generator)]
    patterns = class_patterns(num_classes, shape, seed)
    inputs = patterns[labels] + noise * torch.randn((num_samples, *shape), generator=generator)
    return inputs, labels


def _positive_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"synthetic {what} must be a positive integer, got {value!r}")
    return value


def load_synthetic(
    root=None,
    split: str = "train",
    transform="auto",
    num_samples: int = 512,
    num_classes: int = 10,
    shape: Sequence[int] = (3, 32, 32),
    seed: int = 0,
    noise: float = 1.0,
    **options,
) -> TensorImageDataset:
    """Synthetic classification data in memory; ``root`` is ignored, ``transform="auto"`` adds nothing."""
    check_options("synthetic", options, ["num_samples", "num_classes", "shape", "seed", "noise"])
    split = normalize_split(split)
    num_samples, num_classes = _positive_int(num_samples, "num_samples"), _positive_int(num_classes, "num_classes")
    shape = tuple(shape)
    if len(shape) != 3 or not all(isinstance(size, int) and size > 0 for size in shape):
        raise ConfigError(f"synthetic shape must be (C, H, W) positive integers, got {shape!r}")
    if noise < 0:
        raise ConfigError(f"synthetic noise must be >= 0, got {noise}")
    inputs, labels = make_synthetic(num_samples, num_classes, shape, seed, split, float(noise))
    return TensorImageDataset(
        inputs,
        labels,
        name="synthetic",
        num_classes=num_classes,
        classes=[f"class_{index}" for index in range(num_classes)],
        transform=resolve_transform(transform, None, ToFloat(), split),
        split=split,
        source=f"synthetic(seed={seed})",
    )
