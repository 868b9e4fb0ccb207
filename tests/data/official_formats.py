"""Writers of tiny files in the datasets' official on-disk formats, for the data tests."""
from __future__ import annotations

import gzip
import io
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np

IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def idx_bytes(array: np.ndarray) -> bytes:
    """An idx file of unsigned bytes: magic 0x0000 08 <ndim>, big-endian uint32 dims, data."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.tobytes()


def write_idx_split(folder: Path, split: str, images: np.ndarray, labels: np.ndarray, compress: bool = True) -> tuple[Path, Path]:
    """Write ``images`` (N, 28, 28) and ``labels`` (N,) as the official (gzipped) idx pair."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for stem, array in zip(IDX_FILES[split], (images, labels)):
        content = idx_bytes(array)
        path = folder / (stem + ".gz" if compress else stem)
        path.write_bytes(gzip.compress(content) if compress else content)
        paths.append(path)
    return paths[0], paths[1]


def random_idx_data(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (count, 28, 28), dtype=np.uint8), rng.integers(0, 10, count, dtype=np.uint8)


def cifar_batch(count: int, seed: int, label_keys: dict[bytes, int]) -> dict:
    """A batch dict as in the official files: b'data' uint8 (N, 3072) and list labels."""
    rng = np.random.default_rng(seed)
    batch = {
        b"batch_label": f"batch {seed}".encode(),
        b"data": rng.integers(0, 256, (count, 3072), dtype=np.uint8),
        b"filenames": [f"image_{seed}_{index}.png".encode() for index in range(count)],
    }
    for key, num_classes in label_keys.items():
        batch[key] = [int(label) for label in rng.integers(0, num_classes, count)]
    return batch


def write_pickle(path: Path, content) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as file:
        pickle.dump(content, file, protocol=2)
    return path


def write_cifar10(root: Path, count: int = 3) -> dict[str, dict]:
    """``root/cifar-10-batches-py`` with data_batch_1..5, test_batch and batches.meta."""
    folder = root / "cifar-10-batches-py"
    batches = {}
    for index, filename in enumerate([f"data_batch_{number}" for number in range(1, 6)] + ["test_batch"]):
        batches[filename] = cifar_batch(count, index, {b"labels": 10})
        write_pickle(folder / filename, batches[filename])
    names = [f"name_{index}".encode() for index in range(10)]
    write_pickle(folder / "batches.meta", {b"label_names": names, b"num_cases_per_batch": count, b"num_vis": 3072})
    return batches


def write_cifar100(root: Path, count: int = 4) -> dict[str, dict]:
    """``root/cifar-100-python`` with train, test and meta."""
    folder = root / "cifar-100-python"
    batches = {}
    for index, filename in enumerate(["train", "test"]):
        batches[filename] = cifar_batch(count, 10 + index, {b"fine_labels": 100, b"coarse_labels": 20})
        write_pickle(folder / filename, batches[filename])
    write_pickle(folder / "meta", {
        b"fine_label_names": [f"fine_{index}".encode() for index in range(100)],
        b"coarse_label_names": [f"coarse_{index}".encode() for index in range(20)],
    })
    return batches


def tar_folder(folder: Path, archive: Path) -> Path:
    """Pack ``folder`` into a .tar.gz whose members sit under the folder's name, as the official archives."""
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    return archive


def cifar_images(batch: dict) -> np.ndarray:
    """(N, 3, 32, 32): each row is 1024 red, 1024 green, 1024 blue values, row-major."""
    return batch[b"data"].reshape(-1, 3, 32, 32)


def png_bytes(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def assert_close(actual, expected, atol: float) -> None:
    """Same shape and every element within ``atol`` (torch.testing's first call costs ~1.5 s)."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert float((actual - expected).abs().max()) <= atol
