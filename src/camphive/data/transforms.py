"""Small image transforms on tensors, and each dataset's default pipeline.

Every transform here takes one image ``(C, H, W)`` or a batch ``(N, C, H, W)`` (the
number of dimensions tells which), so the same object serves a per-item ``Dataset`` and
the batch-wise :class:`~camphive.data.loaders.TensorBatchLoader`. A batch gets independent
random choices per image. Randomness comes from torch's global RNG, so
``torch.manual_seed`` makes it repeatable, and DataLoader workers (which torch seeds from
the loader's generator) stay deterministic too.

A transform advertises ``supports_batches = True`` when it accepts ``(N, C, H, W)``.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from camphive.errors import ConfigError

# Per-channel mean and standard deviation of the training images, in [0, 1] pixel units.
NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "mnist": ((0.1307,), (0.3081,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


def _as_batch(image: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """View a single ``(C, H, W)`` image as a batch of one; say whether it was single."""
    if image.dim() == 3:
        return image.unsqueeze(0), True
    if image.dim() == 4:
        return image, False
    raise ConfigError(
        f"image transforms take (C, H, W) or (N, C, H, W) tensors, got shape {tuple(image.shape)}"
    )


def _pair(size: int | Sequence[int], what: str) -> tuple[int, int]:
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    if height <= 0 or width <= 0:
        raise ConfigError(f"{what} must be positive, got {size}")
    return int(height), int(width)


class ToFloat:
    """uint8 pixels in [0, 255] -> float32 in [0, 1]; float input passes unchanged."""

    supports_batches = True

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if image.dtype == torch.uint8:
            return image.to(torch.float32).div_(255.0)
        if not image.is_floating_point():
            return image.to(torch.float32)
        return image

    def __repr__(self) -> str:
        return "ToFloat()"


class Normalize:
    """``(x - mean) / std`` per channel; mean and std have one entry per channel."""

    supports_batches = True

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean = torch.as_tensor(mean, dtype=torch.float32).reshape(-1, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32).reshape(-1, 1, 1)
        if self.mean.numel() != self.std.numel():
            raise ConfigError(f"Normalize got {self.mean.numel()} means but {self.std.numel()} stds; give one of each per channel")
        if bool((self.std <= 0).any()):
            raise ConfigError(f"Normalize std must be positive, got {tuple(self.std.flatten().tolist())}")

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        channels = image.shape[-3] if image.dim() >= 3 else -1
        if channels != self.mean.shape[0]:
            raise ConfigError(
                f"Normalize has {self.mean.shape[0]} channel(s) but the image has shape {tuple(image.shape)}; "
                "give one mean/std per channel"
            )
        return (ToFloat()(image) - self.mean.to(image.device)) / self.std.to(image.device)

    def __repr__(self) -> str:
        return f"Normalize(mean={tuple(self.mean.flatten().tolist())}, std={tuple(self.std.flatten().tolist())})"


class RandomCrop:
    """Zero-pad each side by ``padding`` pixels, then cut a random ``size`` window."""

    supports_batches = True

    def __init__(self, size: int | Sequence[int], padding: int = 0):
        self.size = _pair(size, "RandomCrop size")
        if padding < 0:
            raise ConfigError(f"RandomCrop padding must be >= 0, got {padding}")
        self.padding = int(padding)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        batch, single = _as_batch(image)
        if self.padding:
            batch = F.pad(batch, (self.padding,) * 4)
        count, _, height, width = batch.shape
        crop_height, crop_width = self.size
        if crop_height > height or crop_width > width:
            raise ConfigError(
                f"RandomCrop size {self.size} is larger than the padded image ({height}, {width}); "
                "lower the size or raise the padding"
            )
        top = torch.randint(0, height - crop_height + 1, (count,))
        left = torch.randint(0, width - crop_width + 1, (count,))
        if single:
            y, x = int(top), int(left)
            return batch[0, :, y : y + crop_height, x : x + crop_width]
        # One gather over flattened pixels for the whole batch (several times faster than
        # 4-d advanced indexing): the window's flat pixel positions, per image.
        rows = (top[:, None] + torch.arange(crop_height))[:, :, None]
        cols = (left[:, None] + torch.arange(crop_width))[:, None, :]
        # Drawn on the CPU whatever the images' device: the same augmentation on CPU and GPU.
        positions = (rows * width + cols).reshape(count, 1, crop_height * crop_width).to(batch.device)
        channels = batch.shape[1]
        windows = batch.reshape(count, channels, height * width).gather(2, positions.expand(-1, channels, -1))
        return windows.reshape(count, channels, crop_height, crop_width)

    def __repr__(self) -> str:
        return f"RandomCrop(size={self.size}, padding={self.padding})"


class RandomHorizontalFlip:
    """Mirror left-right with probability ``p`` (independently per image of a batch)."""

    supports_batches = True

    def __init__(self, p: float = 0.5):
        if not 0.0 <= p <= 1.0:
            raise ConfigError(f"RandomHorizontalFlip p must be in [0, 1], got {p}")
        self.p = float(p)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        batch, single = _as_batch(image)
        flip = torch.rand(batch.shape[0]) < self.p
        if single:
            return image.flip(-1) if bool(flip[0]) else image
        if not bool(flip.any()):
            return batch
        return torch.where(flip[:, None, None, None].to(batch.device), batch.flip(-1), batch)

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class Compose:
    """Apply transforms in order; supports batches when every step does."""

    def __init__(self, transforms: Sequence[Callable]):
        self.transforms = list(transforms)
        for step in self.transforms:
            if not callable(step):
                raise ConfigError(f"Compose got {step!r}, which is not callable; pass transforms (callables)")

    @property
    def supports_batches(self) -> bool:
        return all(getattr(step, "supports_batches", False) for step in self.transforms)

    def __call__(self, image):
        for step in self.transforms:
            image = step(image)
        return image

    def __repr__(self) -> str:
        return "Compose([" + ", ".join(repr(step) for step in self.transforms) + "])"


def default_transform(name: str, train: bool) -> Compose:
    """The standard pipeline for the uint8 tensor images of ``name`` (a canonical name).

    Train: random crop with zero padding (+ horizontal flip except for digits), then
    float and normalization; test: float and normalization only.
    """
    if name not in NORMALIZATION or name == "imagenet":
        raise ConfigError(f"no tensor default transform for dataset {name!r}; known: fashion-mnist, mnist, cifar10, cifar100")
    mean, std = NORMALIZATION[name]
    steps: list[Callable] = []
    if train:
        if name in ("fashion-mnist", "mnist"):
            steps.append(RandomCrop(28, padding=2))
            if name == "fashion-mnist":  # mirrored clothes are still clothes; mirrored digits are not
                steps.append(RandomHorizontalFlip())
        else:
            steps += [RandomCrop(32, padding=4), RandomHorizontalFlip()]
    steps += [ToFloat(), Normalize(mean, std)]
    return Compose(steps)
