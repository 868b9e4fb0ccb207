"""Fashion-MNIST / MNIST from idx files written here in the official format."""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from camphive.data import load
from camphive.data.mnist import read_idx
from camphive.errors import DataError

from .official_formats import IDX_FILES, assert_close, idx_bytes, random_idx_data, write_idx_split

REAL_ROOT = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture()
def fashion_root(tmp_path):
    train = random_idx_data(7, seed=1)
    test = random_idx_data(5, seed=2)
    write_idx_split(tmp_path, "train", *train)
    write_idx_split(tmp_path, "test", *test)
    return tmp_path, train, test


def test_idx_header_is_the_official_one():
    content = idx_bytes(np.zeros((2, 28, 28), np.uint8))
    assert struct.unpack(">IIII", content[:16]) == (2051, 2, 28, 28)
    assert struct.unpack(">II", idx_bytes(np.zeros(3, np.uint8))[:8]) == (2049, 3)


@pytest.mark.parametrize("split", ["train", "test"])
def test_pixels_and_labels_are_read_exactly(fashion_root, split):
    root, train, test = fashion_root
    images, labels = train if split == "train" else test
    dataset = load("fashion-mnist", root=root, split=split, transform=None)
    assert len(dataset) == len(labels)
    assert dataset.images.dtype == torch.uint8
    assert torch.equal(dataset.images, torch.from_numpy(images).unsqueeze(1))
    for index in range(len(labels)):
        image, label = dataset[index]
        assert image.dtype == torch.float32 and image.shape == (1, 28, 28)
        assert torch.equal(image[0], torch.from_numpy(images[index]).float() / 255)
        assert label == int(labels[index]) and isinstance(label, int)
    assert dataset.num_classes == 10 and dataset.classes[0] == "T-shirt/top" and dataset.name == "fashion-mnist"
    assert dataset.input_shape == (1, 28, 28)


def test_default_test_transform_normalizes_exactly(fashion_root):
    root, _, (images, _) = fashion_root
    image, _ = load("fashion-mnist", root=root, split="test")[0]
    expected = (torch.from_numpy(images[0]).float() / 255 - 0.2860) / 0.3530
    assert_close(image[0], expected, atol=1e-6)


def test_default_train_transform_keeps_shape_and_is_seeded(fashion_root):
    root, _, _ = fashion_root
    dataset = load("fashion-mnist", root=root, split="train")
    torch.manual_seed(3)
    first = [dataset[index][0] for index in range(len(dataset))]
    torch.manual_seed(3)
    second = [dataset[index][0] for index in range(len(dataset))]
    assert all(image.shape == (1, 28, 28) for image in first)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_uncompressed_files_and_mnist_share_the_reader(tmp_path):
    images, labels = random_idx_data(4, seed=5)
    write_idx_split(tmp_path / "mnist", "test", images, labels, compress=False)
    dataset = load("MNIST", root=tmp_path, split="test", transform=None)  # found in root/mnist
    assert torch.equal(dataset.images[:, 0], torch.from_numpy(images))
    assert dataset.labels.tolist() == labels.tolist()
    assert dataset.classes == [str(digit) for digit in range(10)]


def test_read_idx_parses_other_element_types(tmp_path):
    values = (np.arange(6).reshape(2, 3) - 3).astype(">i4")
    path = tmp_path / "ints"
    path.write_bytes(struct.pack(">IIII", 0x0C02, 2, 3, 0)[:12] + values.tobytes())
    assert read_idx(path).tolist() == values.tolist()


def _write_gz(path: Path, content: bytes) -> None:
    path.write_bytes(gzip.compress(content))


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda content: struct.pack(">I", 2049) + content[4:], "bad magic number 2049"),
        (lambda content: content[:-5], "data bytes but its header"),
        (lambda content: content + b"\x00", "data bytes but its header"),
        (lambda content: content[:10], "ends inside its header"),
    ],
)
def test_damaged_image_files_are_refused(fashion_root, damage, message):
    root, (images, _), _ = fashion_root
    _write_gz(root / "train-images-idx3-ubyte.gz", damage(idx_bytes(images)))
    with pytest.raises(DataError, match=message) as error:
        load("fashion-mnist", root=root)
    assert "train-images-idx3-ubyte.gz" in str(error.value) and "\n" not in str(error.value)


def test_bad_and_truncated_gzip_are_refused(fashion_root):
    root, _, _ = fashion_root
    labels = root / "train-labels-idx1-ubyte.gz"
    labels.write_bytes(labels.read_bytes()[:-6])  # truncated stream
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.gz.*corrupt"):
        load("fashion-mnist", root=root)
    labels.write_bytes(b"\x1f\x8b" + b"garbage" * 5)
    with pytest.raises(DataError, match="corrupt"):
        load("fashion-mnist", root=root)
    labels.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="not a gzip file"):
        load("fashion-mnist", root=root)


def test_missing_file_is_named(fashion_root):
    root, _, _ = fashion_root
    (root / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="lacks t10k-labels-idx1-ubyte"):
        load("fashion-mnist", root=root, split="test")


def test_missing_root_and_empty_root(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load("fashion-mnist", root=tmp_path / "nowhere")
    with pytest.raises(DataError, match=f"no fashion-mnist train files in {tmp_path}"):
        load("fashion-mnist", root=tmp_path)


def test_labels_out_of_range_and_count_mismatch(tmp_path):
    images, labels = random_idx_data(3, seed=0)
    write_idx_split(tmp_path, "train", images, np.array([1, 10, 2], np.uint8))
    with pytest.raises(DataError, match=r"outside \[0, 9\]"):
        load("fashion-mnist", root=tmp_path)
    write_idx_split(tmp_path, "train", images, labels[:2])
    with pytest.raises(DataError, match="3 images but .* 2 labels"):
        load("fashion-mnist", root=tmp_path)


def test_labels_file_given_as_images_is_refused(tmp_path):
    images, labels = random_idx_data(3, seed=0)
    image_name, label_name = IDX_FILES["train"]
    (tmp_path / f"{image_name}.gz").write_bytes(gzip.compress(idx_bytes(labels)))
    (tmp_path / f"{label_name}.gz").write_bytes(gzip.compress(idx_bytes(labels)))
    with pytest.raises(DataError, match=r"bad magic number 2049 .*\(expected 2051\)"):
        load("fashion-mnist", root=tmp_path)


@pytest.mark.skipif(not REAL_ROOT.is_dir(), reason="dataset-fashion-mnist is not installed")
def test_real_fashion_mnist():
    for split, size in (("train", 60000), ("test", 10000)):
        dataset = load("fashion-mnist", split=split)
        assert len(dataset) == size
        assert dataset.input_shape == (1, 28, 28)
        assert sorted(torch.unique(dataset.labels).tolist()) == list(range(10))
        assert torch.bincount(dataset.labels).tolist() == [size // 10] * 10
    pixels = dataset.images.float() / 255  # the test split: its mean is near the train statistics
    assert abs(pixels.mean().item() - 0.2860) < 0.01 and abs(pixels.std().item() - 0.3530) < 0.01


def test_default_root_needs_a_dataset_subfolder(tmp_path, monkeypatch):
    images, labels = random_idx_data(3, seed=4)
    write_idx_split(tmp_path, "test", images, labels)  # bare files: could be MNIST or Fashion-MNIST
    write_idx_split(tmp_path / "fashion-mnist", "test", images[:2], labels[:2])
    monkeypatch.setenv("CAMPHIVE_DATA", str(tmp_path))
    assert len(load("fashion-mnist", split="test")) == 2
    assert len(load("fashion-mnist", root=tmp_path, split="test")) == 3
