"""CIFAR-10 and CIFAR-100 from the official python-format folders or tarballs, read safely.

The official batches are pickles of a dict (keys are bytes under ``encoding="bytes"``):
``data`` a uint8 array ``N x 3072`` (1024 red, then green, then blue, each row-major
32 x 32), ``labels`` (CIFAR-10) or ``fine_labels``/``coarse_labels`` (CIFAR-100) lists of
ints, ``batch_label`` and ``filenames``. Unpickling can run arbitrary code, so the
unpickler here resolves only the few globals that rebuilding numpy arrays needs and refuses
everything else: a crafted file fails before anything runs.
"""
from __future__ import annotations

import io
import pickle
import tarfile
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
from camphive.errors import ConfigError, DataError

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR100_COARSE_CLASSES = [
    "aquatic_mammals", "fish", "flowers", "food_containers", "fruit_and_vegetables",
    "household_electrical_devices", "household_furniture", "insects", "large_carnivores",
    "large_man-made_outdoor_things", "large_natural_outdoor_scenes", "large_omnivores_and_herbivores",
    "medium_mammals", "non-insect_invertebrates", "people", "reptiles", "small_mammals", "trees",
    "vehicles_1", "vehicles_2",
]
INFO = {
    "cifar10": DatasetInfo("cifar10", (3, 32, 32), 10, CIFAR10_CLASSES, *NORMALIZATION["cifar10"]),
    # CIFAR-100 fine class names come from the dataset's own meta file when it is present.
    "cifar100": DatasetInfo("cifar100", (3, 32, 32), 100, None, *NORMALIZATION["cifar100"]),
}
_LAYOUT = {
    "cifar10": {
        "folder": "cifar-10-batches-py",
        "archive": "cifar-10-python.tar.gz",
        "train": [f"data_batch_{index}" for index in range(1, 6)],
        "test": ["test_batch"],
        "meta": "batches.meta",
    },
    "cifar100": {
        "folder": "cifar-100-python",
        "archive": "cifar-100-python.tar.gz",
        "train": ["train"],
        "test": ["test"],
        "meta": "meta",
    },
}
_IMAGE_BYTES = 3 * 32 * 32
_MAX_MEMBER_BYTES = 1 << 30  # official members are ~30-150 MB; refuse absurd sizes before reading


def _encode_latin1(text, encoding="latin1"):
    """What ``_codecs.encode`` does for pickles of bytes written by Python 3 at protocol 2."""
    if not isinstance(text, str) or str(encoding).lower().replace("_", "-") not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"unexpected _codecs.encode({type(text).__name__}, {encoding!r})")
    return text.encode("latin1")


_ARRAY_REBUILDER = np.zeros(1).__reduce__()[0]  # numpy's _reconstruct, wherever this numpy keeps it
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _ARRAY_REBUILDER,  # files written with numpy < 2 (the official ones)
    ("numpy._core.multiarray", "_reconstruct"): _ARRAY_REBUILDER,  # files written with numpy >= 2
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _encode_latin1,
}


class _RefusedGlobal(pickle.UnpicklingError):
    def __init__(self, module: str, name: str):
        super().__init__(f"{module}.{name}")
        self.qualified_name = f"{module}.{name}"


class SafeUnpickler(pickle.Unpickler):
    """Resolves only the globals that a CIFAR batch needs (numpy array rebuilding)."""

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise _RefusedGlobal(module, name) from None

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids are not part of a CIFAR batch")


def safe_unpickle(raw: bytes, source: str) -> dict:
    """Unpickle a CIFAR batch as the official loader does (``encoding="bytes"``), safely.

    Returns the dict with str keys. Raises :class:`DataError` for refused globals and
    for anything that is not a well-formed pickled dict.
    """
    try:
        content = SafeUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except _RefusedGlobal as refused:
        raise DataError(
            f"refusing to unpickle {refused.qualified_name} from {source}: not a CIFAR batch; use the official files"
        ) from None
    except Exception as error:  # any failure to parse means a damaged file
        raise DataError(f"corrupt CIFAR pickle {source}: {type(error).__name__}: {error}; download it again") from None
    if not isinstance(content, dict):
        raise DataError(f"{source} holds a pickled {type(content).__name__}, not a CIFAR batch dict; use the official files")
    return {key.decode("latin1") if isinstance(key, bytes) else str(key): value for key, value in content.items()}


class _Folder:
    """Batch files in a folder."""

    def __init__(self, path: Path):
        self.path = path

    def read(self, filename: str) -> bytes | None:
        file = self.path / filename
        return file.read_bytes() if file.is_file() else None

    def describe(self, filename: str) -> str:
        return str(self.path / filename)


class _Archive:
    """Batch files inside the official .tar.gz, read in memory (nothing is extracted)."""

    def __init__(self, path: Path, folder: str, wanted: set[str]):
        self.path = path
        self.members: dict[str, bytes] = {}
        try:
            with tarfile.open(path, "r:gz") as archive:
                for member in archive:
                    parent, _, filename = member.name.rstrip("/").rpartition("/")
                    if not member.isfile() or filename not in wanted or parent.removeprefix("./") not in ("", folder):
                        continue
                    if member.size > _MAX_MEMBER_BYTES:
                        raise DataError(f"{path} member {member.name} is {member.size} bytes, too large for CIFAR; use the official archive")
                    self.members[filename] = archive.extractfile(member).read()
        except (tarfile.TarError, OSError, EOFError, zlib.error) as error:
            raise DataError(f"cannot read archive {path}: {error}; the download is truncated or corrupt, fetch it again") from None

    def read(self, filename: str) -> bytes | None:
        return self.members.get(filename)

    def describe(self, filename: str) -> str:
        return f"{self.path}:{filename}"


def _open_source(name: str, root, split: str):
    """Find the batches: root as the batch folder, root/<folder>, root/<archive> or root as the archive."""
    layout = _LAYOUT[name]
    root = Path(root) if root is not None else data_root()
    first_batch = layout[split][0]
    wanted = {*layout[split], layout["meta"]}
    if root.is_file() and root.name.endswith((".tar.gz", ".tgz")):
        return _Archive(root, layout["folder"], wanted)
    for folder in (root, root / layout["folder"]):
        if (folder / first_batch).is_file():
            return _Folder(folder)
    if (root / layout["archive"]).is_file():
        return _Archive(root / layout["archive"], layout["folder"], wanted)
    if not root.exists():
        raise DataError(
            f"{name} root {root} does not exist; point root (or $CAMPHIVE_DATA) at the folder holding "
            f"{layout['folder']}/ or {layout['archive']} from https://www.cs.toronto.edu/~kriz/cifar.html"
        )
    raise DataError(
        f"no {name} data in {root}: expected {layout['folder']}/ with {', '.join(layout[split])} "
        f"or {layout['archive']}; download it from https://www.cs.toronto.edu/~kriz/cifar.html"
    )


def _labels_array(batch: dict, key: str, num_classes: int, count: int, source: str) -> np.ndarray:
    if key not in batch:
        raise DataError(f"{source} has no {key!r} entry (keys: {', '.join(sorted(batch))}); not a {num_classes}-class CIFAR batch")
    labels = np.asarray(batch[key])
    if labels.ndim != 1 or labels.dtype.kind not in "iu" or labels.shape[0] != count:
        raise DataError(f"{source} {key!r} must be {count} integers, got an array of shape {labels.shape} and type {labels.dtype}")
    if count and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{source} {key!r} span [{labels.min()}, {labels.max()}], outside [0, {num_classes - 1}]; the file is corrupt")
    return labels.astype(np.int64)


def _images_array(batch: dict, source: str) -> np.ndarray:
    data = batch.get("data")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _IMAGE_BYTES:
        seen = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{source} 'data' must be a uint8 N x {_IMAGE_BYTES} array, got {seen}; not a CIFAR batch")
    return data


def _class_names(source, name: str, label_key: str, num_classes: int) -> list[str] | None:
    """Names from the meta file when present (checked like a batch), else the built-in list."""
    meta_file = _LAYOUT[name]["meta"]
    raw = source.read(meta_file)
    names_key = {"labels": "label_names", "fine_labels": "fine_label_names", "coarse_labels": "coarse_label_names"}[label_key]
    if raw is not None:
        meta = safe_unpickle(raw, source.describe(meta_file))
        names = meta.get(names_key)
        if isinstance(names, list) and len(names) == num_classes:
            return [item.decode("latin1") if isinstance(item, bytes) else str(item) for item in names]
    if label_key == "labels":
        return list(CIFAR10_CLASSES)
    if label_key == "coarse_labels":
        return list(CIFAR100_COARSE_CLASSES)
    return None


def _load_cifar(name: str, root, split: str, transform, label_key: str, num_classes: int) -> TensorImageDataset:
    split = normalize_split(split)
    source = _open_source(name, root, split)
    images, labels = [], []
    for filename in _LAYOUT[name][split]:
        raw = source.read(filename)
        if raw is None:
            raise DataError(f"{name} {split} split is missing {source.describe(filename)}; download the dataset again")
        where = source.describe(filename)
        batch = safe_unpickle(raw, where)
        data = _images_array(batch, where)
        images.append(data)
        labels.append(_labels_array(batch, label_key, num_classes, data.shape[0], where))
    pixels = torch.from_numpy(np.concatenate(images).reshape(-1, 3, 32, 32))
    return TensorImageDataset(
        pixels,
        torch.from_numpy(np.concatenate(labels)),
        name=name,
        num_classes=num_classes,
        classes=_class_names(source, name, label_key, num_classes),
        transform=resolve_transform(transform, lambda train: default_transform(name, train), ToFloat(), split),
        split=split,
        source=str(source.path),
    )


def load_cifar10(root=None, split: str = "train", transform="auto", **options) -> TensorImageDataset:
    """CIFAR-10: 50,000 train / 10,000 test 32 x 32 colour images of 10 classes.

    ``root``: the ``cifar-10-batches-py`` folder, a folder holding it or
    ``cifar-10-python.tar.gz``, or that archive itself; default ``$CAMPHIVE_DATA`` or ``./data``.
    """
    check_options("cifar10", options, [])
    return _load_cifar("cifar10", root, split, transform, "labels", 10)


def load_cifar100(root=None, split: str = "train", transform="auto", labels: str = "fine", **options) -> TensorImageDataset:
    """CIFAR-100: like CIFAR-10 with 100 fine classes, or 20 superclasses with ``labels="coarse"``."""
    check_options("cifar100", options, ["labels"])
    kind = str(labels).lower()
    if kind not in ("fine", "coarse"):
        raise ConfigError(f"cifar100 labels must be 'fine' or 'coarse', got {labels!r}")
    if kind == "fine":
        return _load_cifar("cifar100", root, split, transform, "fine_labels", 100)
    return _load_cifar("cifar100", root, split, transform, "coarse_labels", 20)
