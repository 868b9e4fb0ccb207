"""ImageNet (or any image classification folder) in the ImageFolder layout.

``root/train/<class>/<image>`` and ``root/val/<class>/<image>``; split ``"test"`` reads
``val``. Class indices follow the sorted class folder names of ``train`` (when present), so
train and val labels agree. Images are decoded with Pillow on access and converted to RGB.
"""
from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from camphive.data.base import (
    DatasetInfo,
    as_float_image,
    check_options,
    data_root,
    normalize_split,
    resolve_transform,
    shape_after_transform,
)
from camphive.data.transforms import NORMALIZATION, Compose, Normalize, RandomHorizontalFlip, ToFloat
from camphive.errors import ConfigError, DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
INFO = {"imagenet": DatasetInfo("imagenet", (3, 224, 224), 1000, None, *NORMALIZATION["imagenet"])}
_SPLIT_FOLDERS = {"train": "train", "test": "val"}
_LAYOUT_HINT = "expected ImageFolder layout ROOT/train/<class>/<image> and ROOT/val/<class>/<image>"


class RandomResizedCrop:
    """Crop a random area (``scale`` of the image) and aspect ratio, resize to ``size`` x ``size``.

    Works on a PIL image. Ten tries to draw a window that fits, then a centred crop with
    the aspect ratio clamped into ``ratio``.
    """

    def __init__(self, size: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
        self.size = int(size)
        self.scale = scale
        self.log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
        self.ratio = ratio

    def window(self, width: int, height: int) -> tuple[int, int, int, int]:
        """``(left, top, crop_width, crop_height)`` drawn from torch's global RNG."""
        area = width * height
        for _ in range(10):
            target_area = area * float(torch.empty(1).uniform_(*self.scale))
            aspect = math.exp(float(torch.empty(1).uniform_(*self.log_ratio)))
            crop_width = round(math.sqrt(target_area * aspect))
            crop_height = round(math.sqrt(target_area / aspect))
            if 0 < crop_width <= width and 0 < crop_height <= height:
                top = int(torch.randint(0, height - crop_height + 1, (1,)))
                left = int(torch.randint(0, width - crop_width + 1, (1,)))
                return left, top, crop_width, crop_height
        aspect = width / height
        if aspect < self.ratio[0]:
            crop_width, crop_height = width, round(width / self.ratio[0])
        elif aspect > self.ratio[1]:
            crop_width, crop_height = round(height * self.ratio[1]), height
        else:
            crop_width, crop_height = width, height
        return (width - crop_width) // 2, (height - crop_height) // 2, crop_width, crop_height

    def __call__(self, image: Image.Image) -> Image.Image:
        left, top, crop_width, crop_height = self.window(*image.size)
        box = (left, top, left + crop_width, top + crop_height)
        return image.resize((self.size, self.size), Image.Resampling.BILINEAR, box=box)

    def __repr__(self) -> str:
        return f"RandomResizedCrop(size={self.size}, scale={self.scale}, ratio={self.ratio})"


class ResizeCenterCrop:
    """Resize the shorter side to ``resize`` (keeping the aspect), then cut the centred ``crop`` square."""

    def __init__(self, resize: int, crop: int):
        if crop > resize:
            raise ConfigError(f"center crop {crop} is larger than the resize {resize}")
        self.resize, self.crop = int(resize), int(crop)

    def __call__(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        scale = self.resize / min(width, height)
        new_size = (max(self.resize, round(width * scale)), max(self.resize, round(height * scale)))
        image = image.resize(new_size, Image.Resampling.BILINEAR)
        left = int(round((new_size[0] - self.crop) / 2))
        top = int(round((new_size[1] - self.crop) / 2))
        return image.crop((left, top, left + self.crop, top + self.crop))

    def __repr__(self) -> str:
        return f"ResizeCenterCrop(resize={self.resize}, crop={self.crop})"


class PILToTensor:
    """PIL RGB image -> uint8 tensor ``(3, H, W)``."""

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1).contiguous()

    def __repr__(self) -> str:
        return "PILToTensor()"


def imagenet_transform(train: bool, image_size: int = 224) -> Compose:
    """Train: random resized crop + flip; test: resize to 256/224 of the size, centre crop. Both normalized."""
    mean, std = NORMALIZATION["imagenet"]
    if train:
        steps = [RandomResizedCrop(image_size), PILToTensor(), RandomHorizontalFlip()]
    else:
        steps = [ResizeCenterCrop(round(image_size * 256 / 224), image_size), PILToTensor()]
    return Compose(steps + [ToFloat(), Normalize(mean, std)])


def _class_folders(folder: Path) -> list[str]:
    return sorted(entry.name for entry in os.scandir(folder) if entry.is_dir() and not entry.name.startswith("."))


def _images_in(folder: Path) -> list[Path]:
    found = []
    for directory, subdirectories, files in os.walk(folder, followlinks=True):
        subdirectories.sort()
        found += [Path(directory) / file for file in sorted(files) if file.lower().endswith(IMAGE_EXTENSIONS)]
    return found


def scan_image_folder(root: Path, split: str) -> tuple[list[tuple[Path, int]], list[str]]:
    """``([(image path, label)], class names)`` for ``root/<split folder>``, checked."""
    split_folder = root / _SPLIT_FOLDERS[split]
    if not root.is_dir():
        raise DataError(f"image folder root {root} does not exist; {_LAYOUT_HINT}")
    if not split_folder.is_dir():
        raise DataError(f"no {split_folder} folder; {_LAYOUT_HINT}")
    present = _class_folders(split_folder)
    if not present:
        raise DataError(f"{split_folder} has no class folders; {_LAYOUT_HINT}")
    train_folder = root / _SPLIT_FOLDERS["train"]
    classes = _class_folders(train_folder) if split != "train" and train_folder.is_dir() else present
    unknown = sorted(set(present) - set(classes))
    if unknown:
        raise DataError(f"{split_folder} has class folder(s) {', '.join(unknown[:5])} missing from {train_folder}; both splits need the same classes")
    index = {name: label for label, name in enumerate(classes)}
    samples = []
    for name in present:
        images = _images_in(split_folder / name)
        if not images:
            raise DataError(f"class folder {split_folder / name} has no images ({', '.join(IMAGE_EXTENSIONS)}); add images or remove it")
        samples += [(path, index[name]) for path in images]
    return samples, classes


class ImageFolderDataset(Dataset):
    """Items ``(transform(RGB PIL image), label)``; the transform receives a PIL image."""

    def __init__(self, samples: list[tuple[Path, int]], classes: list[str], *, transform: Callable, name: str, split: str, source: str):
        self.samples = samples
        self.classes = classes
        self.num_classes = len(classes)
        self.transform = transform
        self.name = name
        self.split = split
        self.source = source
        self._input_shape: tuple[int, ...] | None = None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        return as_float_image(self.transform(load_rgb(path))), label

    @property
    def targets(self) -> list[int]:
        return [label for _, label in self.samples]

    @property
    def input_shape(self) -> tuple[int, ...]:
        if self._input_shape is None:
            self._input_shape = shape_after_transform(self)
        return self._input_shape

    def __repr__(self) -> str:
        return f"ImageFolderDataset(name={self.name!r}, split={self.split!r}, size={len(self)}, num_classes={self.num_classes})"


def load_rgb(path: Path) -> Image.Image:
    """Decode an image file to RGB; a damaged or non-image file raises :class:`DataError`."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise DataError(f"cannot read image {path}: {error}; replace or remove the file") from None


def load_imagenet(root=None, split: str = "train", transform="auto", image_size: int = 224, **options) -> ImageFolderDataset:
    """ImageNet-1k (or any ImageFolder tree). ``root`` default: ``$CAMPHIVE_DATA/imagenet`` or ``./data/imagenet``.

    ``image_size``: side of the square crops of the default transforms (test resizes the
    shorter side to ``image_size * 256 / 224`` first). ``transform=None`` gives the decoded
    image as a float tensor in [0, 1] at its own size.
    """
    check_options("imagenet", options, ["image_size"])
    if int(image_size) <= 0:
        raise ConfigError(f"image_size must be a positive integer, got {image_size}")
    split = normalize_split(split)
    root = Path(root) if root is not None else data_root() / "imagenet"
    samples, classes = scan_image_folder(root, split)
    return ImageFolderDataset(
        samples,
        classes,
        transform=resolve_transform(transform, lambda train: imagenet_transform(train, int(image_size)), Compose([PILToTensor(), ToFloat()]), split),
        name="imagenet",
        split=split,
        source=str(root / _SPLIT_FOLDERS[split]),
    )
