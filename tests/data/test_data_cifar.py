"""CIFAR-10/100 from pickles written here exactly as the official files, and refusals."""
from __future__ import annotations

import os
import pickle
import pickletools

import numpy as np
import pytest
import torch

from camphive.data import load
from camphive.data.cifar import safe_unpickle
from camphive.errors import ConfigError, DataError

from .official_formats import assert_close, cifar_batch, tar_folder, write_cifar10, write_cifar100, write_pickle


def _expected_pixels(batch: dict, index: int) -> torch.Tensor:
    """Image ``index`` of a batch decoded by hand: 1024 red, 1024 green, 1024 blue, rows of 32."""
    row = batch[b"data"][index]
    image = torch.empty(3, 32, 32, dtype=torch.uint8)
    for channel in range(3):
        for y in range(32):
            start = channel * 1024 + y * 32
            image[channel, y] = torch.from_numpy(row[start : start + 32].copy())
    return image


def test_globals_needed_by_a_protocol_2_batch_are_the_allowed_ones():
    raw = pickle.dumps(cifar_batch(2, 0, {b"labels": 10}), protocol=2)
    globals_used = {arg for opcode, arg, _ in pickletools.genops(raw) if opcode.name == "GLOBAL"}
    assert globals_used <= {"numpy._core.multiarray _reconstruct", "numpy.core.multiarray _reconstruct", "numpy ndarray", "numpy dtype", "_codecs encode"}


def test_cifar10_folder_is_read_exactly(tmp_path):
    batches = write_cifar10(tmp_path, count=3)
    train = load("cifar10", root=tmp_path, split="train", transform=None)
    assert len(train) == 15 and train.num_classes == 10 and train.name == "cifar10"
    assert train.classes == [f"name_{index}" for index in range(10)]  # from batches.meta
    assert train.input_shape == (3, 32, 32)
    # Sample 4 is the second image of data_batch_2 (batches are concatenated in order).
    second_batch = batches["data_batch_2"]
    assert torch.equal(train.images[4], _expected_pixels(second_batch, 1))
    image, label = train[4]
    assert torch.equal(image, _expected_pixels(second_batch, 1).float() / 255)
    assert label == second_batch[b"labels"][1]
    expected_labels = sum((batches[f"data_batch_{number}"][b"labels"] for number in range(1, 6)), [])
    assert train.labels.tolist() == expected_labels
    test = load("CIFAR-10", root=tmp_path / "cifar-10-batches-py", split="test", transform=None)  # root = the folder itself
    assert torch.equal(test.images[2], _expected_pixels(batches["test_batch"], 2))
    assert test.labels.tolist() == batches["test_batch"][b"labels"]


def test_cifar10_default_transforms(tmp_path):
    batches = write_cifar10(tmp_path, count=2)
    image, _ = load("cifar10", root=tmp_path, split="test")[0]
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(3, 1, 1)
    std = torch.tensor([0.2470, 0.2435, 0.2616]).view(3, 1, 1)
    expected = (_expected_pixels(batches["test_batch"], 0).float() / 255 - mean) / std
    assert_close(image, expected, atol=1e-6)
    train = load("cifar10", root=tmp_path, split="train")
    torch.manual_seed(0)
    assert train[0][0].shape == (3, 32, 32) and train.input_shape == (3, 32, 32)


def test_cifar10_tarball_matches_folder(tmp_path):
    write_cifar10(tmp_path / "unpacked", count=2)
    archive = tar_folder(tmp_path / "unpacked" / "cifar-10-batches-py", tmp_path / "cifar-10-python.tar.gz")
    from_folder = load("cifar10", root=tmp_path / "unpacked", split="train", transform=None)
    from_archive = load("cifar10", root=tmp_path, split="train", transform=None)
    assert torch.equal(from_folder.images, from_archive.images)
    assert torch.equal(from_folder.labels, from_archive.labels)
    assert from_archive.classes == from_folder.classes
    assert len(load("cifar10", root=archive, split="test")) == 2  # root may be the archive itself


def test_cifar100_fine_and_coarse(tmp_path):
    batches = write_cifar100(tmp_path, count=4)
    (tmp_path / "archive").mkdir()
    tar_folder(tmp_path / "cifar-100-python", tmp_path / "archive" / "cifar-100-python.tar.gz")
    for root in (tmp_path, tmp_path / "archive"):
        fine = load("cifar100", root=root, split="test", transform=None)
        assert fine.num_classes == 100 and fine.classes[7] == "fine_7"
        assert fine.labels.tolist() == batches["test"][b"fine_labels"]
        assert torch.equal(fine.images[3], _expected_pixels(batches["test"], 3))
        coarse = load("cifar100", root=root, split="train", labels="coarse")
        assert coarse.num_classes == 20 and coarse.classes[19] == "coarse_19"
        assert coarse.labels.tolist() == batches["train"][b"coarse_labels"]
    with pytest.raises(ConfigError, match="'fine' or 'coarse'"):
        load("cifar100", root=tmp_path, labels="medium")


def test_batches_from_numpy_1_files_load(tmp_path):
    """The official files name numpy.core.multiarray (numpy < 2); both spellings are accepted."""
    batch = cifar_batch(2, 0, {b"labels": 10})
    raw = pickle.dumps(batch, protocol=2).replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
    assert b"numpy.core.multiarray\n_reconstruct" in raw
    loaded = safe_unpickle(raw, "old")
    assert np.array_equal(loaded["data"], batch[b"data"]) and loaded["labels"] == batch[b"labels"]


class _RunsACommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_with_code_is_refused_and_nothing_runs(tmp_path):
    write_cifar10(tmp_path, count=2)
    marker = tmp_path / "pwned"
    batch = cifar_batch(2, 0, {b"labels": 10})
    batch[b"batch_label"] = _RunsACommand(marker)
    write_pickle(tmp_path / "cifar-10-batches-py" / "data_batch_3", batch)
    with pytest.raises(DataError, match=r"refusing to unpickle (posix|os|nt)\.system from .*data_batch_3: not a CIFAR batch") as error:
        load("cifar10", root=tmp_path)
    assert "\n" not in str(error.value)
    assert not marker.exists()
    # Sanity: the crafted file would indeed run the command through a plain unpickler.
    pickle.loads((tmp_path / "cifar-10-batches-py" / "data_batch_3").read_bytes())
    assert marker.exists()


@pytest.mark.parametrize("payload", [pickle.dumps(eval, protocol=2), pickle.dumps({b"data": np.array([print], dtype=object)}, protocol=2)])
def test_other_globals_are_refused(payload):
    with pytest.raises(DataError, match="refusing to unpickle"):
        safe_unpickle(payload, "crafted")


def test_corrupt_pickles(tmp_path):
    write_cifar10(tmp_path, count=2)
    test_batch = tmp_path / "cifar-10-batches-py" / "test_batch"
    test_batch.write_bytes(test_batch.read_bytes()[:-100])
    with pytest.raises(DataError, match="corrupt CIFAR pickle .*test_batch"):
        load("cifar10", root=tmp_path, split="test")
    write_pickle(test_batch, [1, 2, 3])
    with pytest.raises(DataError, match="pickled list, not a CIFAR batch dict"):
        load("cifar10", root=tmp_path, split="test")


def _replace(batch: dict, **changes) -> dict:
    return {**batch, **{key.encode(): value for key, value in changes.items()}}


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"data": np.zeros((2, 3000), np.uint8)}, "uint8 N x 3072 array, got uint8 array of shape"),
        ({"data": np.zeros((2, 3072), np.int64)}, "got int64 array"),
        ({"data": "pixels"}, "got str"),
        ({"labels": [1]}, "must be 2 integers"),
        ({"labels": [1, 10]}, r"outside \[0, 9\]"),
        ({"labels": [-1, 0]}, r"outside \[0, 9\]"),
        ({"labels": ["cat", "dog"]}, "must be 2 integers"),
    ],
)
def test_wrong_arrays_are_refused(tmp_path, changes, message):
    write_cifar10(tmp_path, count=2)
    test_batch = tmp_path / "cifar-10-batches-py" / "test_batch"
    write_pickle(test_batch, _replace(cifar_batch(2, 0, {b"labels": 10}), **changes))
    with pytest.raises(DataError, match=message):
        load("cifar10", root=tmp_path, split="test")


def test_missing_label_key_and_missing_files(tmp_path):
    write_cifar10(tmp_path, count=2)
    folder = tmp_path / "cifar-10-batches-py"
    write_pickle(folder / "test_batch", cifar_batch(2, 0, {b"fine_labels": 10}))
    with pytest.raises(DataError, match="no 'labels' entry"):
        load("cifar10", root=tmp_path, split="test")
    (folder / "data_batch_4").unlink()
    with pytest.raises(DataError, match="missing .*data_batch_4"):
        load("cifar10", root=tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        load("cifar10", root=tmp_path / "nowhere")
    with pytest.raises(DataError, match="expected cifar-100-python/ with train or cifar-100-python.tar.gz"):
        load("cifar100", root=tmp_path)


def test_corrupt_archive(tmp_path):
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"\x1f\x8b\x08\x00" + b"\x00" * 40)
    with pytest.raises(DataError, match="cannot read archive .*cifar-10-python.tar.gz"):
        load("cifar10", root=tmp_path)


def test_default_root_is_the_environment_variable(tmp_path, monkeypatch):
    write_cifar10(tmp_path, count=2)
    monkeypatch.setenv("CAMPHIVE_DATA", str(tmp_path))
    assert len(load("cifar10", split="test")) == 2
