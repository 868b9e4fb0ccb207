"""Fashion-MNIST and MNIST from their official idx files (gzipped or not).

The idx format: a 4-byte big-endian magic number ``0x0000TTDD`` (TT the element type,
0x08 for unsigned bytes; DD the number of dimensions), then DD big-endian uint32 sizes,
then the elements in row-major order. Images are idx3-ubyte (magic 2051: N x 28 x 28),
labels idx1-ubyte (magic 2049: N). Everything is held in memory as uint8.
"""
from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np
import torch

from camphive.data.base import (
    DatasetInfo,
    TensorImageDataset,
    check_options,
    data_root,
    normalize_split,
    resolve_transform,
)
from camphive.data.transforms import NORMALIZATION, ToFloat, default_transform
from camphive.errors import DataError

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
MNIST_CLASSES = [str(digit) for digit in range(10)]
FASHION_MNIST_SYSTEM_ROOT = Path("/usr/share/datasets/fashion-mnist")  # Debian package dataset-fashion-mnist
MNIST_SYSTEM_ROOT = Path("/usr/share/datasets/mnist")

IMAGES_MAGIC = 2051  # unsigned bytes, 3 dimensions
LABELS_MAGIC = 2049  # unsigned bytes, 1 dimension
_IDX_TYPES = {0x08: np.dtype("u1"), 0x09: np.dtype("i1"), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
_GZIP_MAGIC = b"\x1f\x8b"
_FILE_PREFIX = {"train": "train", "test": "t10k"}

INFO = {
    "fashion-mnist": DatasetInfo("fashion-mnist", (1, 28, 28), 10, FASHION_MNIST_CLASSES, *NORMALIZATION["fashion-mnist"]),
    "mnist": DatasetInfo("mnist", (1, 28, 28), 10, MNIST_CLASSES, *NORMALIZATION["mnist"]),
}


def _read_bytes(path: Path) -> bytes:
    """The file's content, gunzipped when it is a gzip file (told by its magic, not its name)."""
    try:
        raw = path.read_bytes()
        if raw[:2] == _GZIP_MAGIC:
            return gzip.decompress(raw)
        if path.suffix == ".gz":
            raise DataError(f"{path} is named .gz but is not a gzip file; download it again")
        return raw
    except (OSError, EOFError, zlib.error) as error:
        raise DataError(f"cannot read idx file {path}: {error}; the download is truncated or corrupt, fetch it again") from error


def read_idx(path: str | os.PathLike, expected_magic: int | None = None) -> np.ndarray:
    """Parse an idx file into a numpy array of the shape its header states.

    Raises :class:`DataError` for an unexpected magic number, an unknown element type, or
    a payload that does not match the header (truncated or padded files).
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise DataError(f"idx file {path} is only {len(data)} bytes long; it is truncated, download it again")
    magic = int.from_bytes(data[:4], "big")
    if expected_magic is not None and magic != expected_magic:
        raise DataError(f"bad magic number {magic} in {path} (expected {expected_magic}); this is not the idx file it is named as")
    type_code, ndim = data[2], data[3]
    if data[:2] != b"\x00\x00" or type_code not in _IDX_TYPES or ndim == 0:
        raise DataError(f"bad magic number {magic} in {path}; not an idx file")
    header_size = 4 + 4 * ndim
    if len(data) < header_size:
        raise DataError(f"idx file {path} ends inside its header ({len(data)} bytes); it is truncated, download it again")
    dims = tuple(int(size) for size in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_TYPES[type_code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    found = len(data) - header_size
    if found != expected:
        raise DataError(
            f"idx file {path} holds {found} data bytes but its header {dims} needs {expected}; "
            "it is truncated or corrupt, download it again"
        )
    return np.frombuffer(data, dtype=dtype, offset=header_size).reshape(dims)


def _find_file(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    return None


def _candidate_folders(name: str, root) -> list[Path]:
    """Folders that may hold the idx files, in the order they are tried.

    A given root may hold the files itself; the default root only through a subfolder
    named after the dataset, since MNIST and Fashion-MNIST files share their names.
    """
    torchvision_folder = {"fashion-mnist": "FashionMNIST", "mnist": "MNIST"}[name]
    if root is not None:
        root = Path(root)
        return [root, root / name, root / torchvision_folder / "raw"]
    base = data_root()
    system_root = FASHION_MNIST_SYSTEM_ROOT if name == "fashion-mnist" else MNIST_SYSTEM_ROOT
    return [base / name, base / torchvision_folder / "raw", system_root]


def _locate(name: str, root, split: str) -> tuple[Path, Path]:
    prefix = _FILE_PREFIX[split]
    image_stem, label_stem = f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"
    folders = _candidate_folders(name, root)
    for folder in folders:
        images, labels = _find_file(folder, image_stem), _find_file(folder, label_stem)
        if images and labels:
            return images, labels
        if images or labels:
            missing = label_stem if images else image_stem
            raise DataError(f"{name} {split} split in {folder} lacks {missing}.gz (or uncompressed {missing}); add the file")
    expected = f"{image_stem}.gz and {label_stem}.gz (or uncompressed)"
    if root is not None:
        if not Path(root).exists():
            raise DataError(f"{name} root {root} does not exist; point root at a folder holding {expected}")
        raise DataError(f"no {name} {split} files in {root}; expected {expected} there or in {root}/{name}/")
    hint = " (Debian: apt install dataset-fashion-mnist)" if name == "fashion-mnist" else ""
    raise DataError(
        f"no {name} {split} files in {', '.join(str(folder) for folder in folders)}; "
        f"expected {expected} in one of them, or pass root{hint}"
    )


def _load_idx_dataset(name: str, root, split: str, transform, options: dict) -> TensorImageDataset:
    check_options(name, options, [])
    split = normalize_split(split)
    images_path, labels_path = _locate(name, root, split)
    images = read_idx(images_path, IMAGES_MAGIC)
    labels = read_idx(labels_path, LABELS_MAGIC)
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"{images_path} holds {images.shape[0]} images but {labels_path} holds {labels.shape[0]} labels; "
            "the files belong to different downloads"
        )
    info = INFO[name]
    return TensorImageDataset(
        torch.from_numpy(images.copy()).unsqueeze(1),
        torch.from_numpy(labels.astype(np.int64)),
        name=name,
        num_classes=info.num_classes,
        classes=list(info.classes),
        transform=resolve_transform(transform, lambda train: default_transform(name, train), ToFloat(), split),
        split=split,
        source=str(labels_path.parent),
    )


def load_fashion_mnist(root=None, split: str = "train", transform="auto", **options) -> TensorImageDataset:
    """Fashion-MNIST: 60,000 train / 10,000 test grey 28 x 28 images of 10 clothing classes.

    ``root``: a folder holding the four official idx files; default: ``$CAMPHIVE_DATA``,
    ``./data`` (also their ``fashion-mnist/`` subfolder), then ``/usr/share/datasets/fashion-mnist``.
    """
    return _load_idx_dataset("fashion-mnist", root, split, transform, options)


def load_mnist(root=None, split: str = "train", transform="auto", **options) -> TensorImageDataset:
    """MNIST digits, same files and layout as Fashion-MNIST (default folder ``mnist``)."""
    return _load_idx_dataset("mnist", root, split, transform, options)
