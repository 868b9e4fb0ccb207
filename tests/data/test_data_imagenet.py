"""ImageFolder trees of PNG/JPEG files written here with Pillow."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from camphive.data import load
from camphive.data.imagenet import RandomResizedCrop, ResizeCenterCrop
from camphive.errors import DataError

from .official_formats import assert_close

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def _pixels(seed: int, height: int = 30, width: int = 40) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.fixture()
def image_folder(tmp_path):
    """train: n01 (2 PNG), n02 (1 PNG + a grey JPEG); val: n02 (1 PNG)."""
    pixels = {}
    layout = {"train/n01/a.png": 1, "train/n01/b.png": 2, "train/n02/c.png": 3, "val/n02/d.png": 4}
    for relative, seed in layout.items():
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels[relative] = _pixels(seed)
        Image.fromarray(pixels[relative]).save(path)
    Image.new("L", (50, 20), color=128).save(tmp_path / "train/n02/e.JPEG", quality=95)
    (tmp_path / "train/n02/notes.txt").write_text("not an image")
    return tmp_path, pixels


def test_samples_labels_and_pixels(image_folder):
    root, pixels = image_folder
    train = load("imagenet", root=root, split="train", transform=None)
    assert train.classes == ["n01", "n02"] and train.num_classes == 2 and train.name == "imagenet"
    assert [path.name for path, _ in train.samples] == ["a.png", "b.png", "c.png", "e.JPEG"]
    assert train.targets == [0, 0, 1, 1]
    image, label = train[1]
    assert label == 0
    assert torch.equal(image, torch.from_numpy(pixels["train/n01/b.png"]).permute(2, 0, 1).float() / 255)
    grey, _ = train[3]  # a greyscale JPEG becomes 3 equal channels
    assert grey.shape == (3, 20, 50)
    assert torch.equal(grey[0], grey[1]) and abs(grey.mean().item() - 128 / 255) < 2 / 255


def test_val_uses_the_train_class_indices(image_folder):
    root, _ = image_folder
    val = load("imagenet", root=root, split="test")  # "test" reads val/
    assert val.classes == ["n01", "n02"] and val.targets == [1]


def test_default_transforms(image_folder):
    root, _ = image_folder
    for split in ("train", "test"):
        dataset = load("imagenet", root=root, split=split, image_size=16)
        torch.manual_seed(0)
        assert all(dataset[index][0].shape == (3, 16, 16) for index in range(len(dataset)))
        assert dataset.input_shape == (3, 16, 16)
    constant = root / "constant"
    (constant / "val" / "k").mkdir(parents=True)  # no train folder: val's own classes
    Image.new("RGB", (37, 23), color=(10, 200, 90)).save(constant / "val" / "k" / "x.png")
    image, _ = load("imagenet", root=constant, split="test", image_size=8)[0]
    expected = (torch.tensor([10, 200, 90]).view(3, 1, 1) / 255 - MEAN) / STD
    assert_close(image, expected.expand(3, 8, 8), atol=1e-5)


def test_train_transform_is_seeded(image_folder):
    root, _ = image_folder
    dataset = load("imagenet", root=root, split="train", image_size=12)
    torch.manual_seed(5)
    first = dataset[0][0]
    torch.manual_seed(5)
    assert torch.equal(first, dataset[0][0])


def test_resize_center_crop_cuts_the_middle():
    pixels = _pixels(9, height=20, width=40)
    cropped = ResizeCenterCrop(resize=20, crop=10)(Image.fromarray(pixels))  # shorter side already 20
    assert np.array_equal(np.asarray(cropped), pixels[5:15, 15:25])
    assert ResizeCenterCrop(resize=10, crop=8)(Image.fromarray(pixels)).size == (8, 8)


def test_random_resized_crop_window_fits():
    crop = RandomResizedCrop(8)
    torch.manual_seed(0)
    for width, height in [(40, 30), (5, 100), (100, 5), (1, 1)]:
        left, top, crop_width, crop_height = crop.window(width, height)
        assert 0 <= left and left + crop_width <= width and 0 <= top and top + crop_height <= height
        assert crop_width > 0 and crop_height > 0
    # A very tall image cannot fit the ratio range: the fallback is the centred window of ratio 3/4.
    assert RandomResizedCrop(8, scale=(1.0, 1.0)).window(5, 100) == (0, 46, 5, 7)


def test_unreadable_image_names_the_file(image_folder):
    root, _ = image_folder
    broken = root / "train" / "n01" / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    dataset = load("imagenet", root=root, split="train")
    index = [path for path, _ in dataset.samples].index(broken)
    with pytest.raises(DataError, match="cannot read image .*broken.jpg"):
        dataset[index]


def test_layout_errors(image_folder, tmp_path):
    root, _ = image_folder
    with pytest.raises(DataError, match="does not exist"):
        load("imagenet", root=tmp_path / "nowhere")
    (root / "val" / "n02").rename(root / "val" / "n03")
    with pytest.raises(DataError, match="n03 missing from .*train"):
        load("imagenet", root=root, split="test")
    (root / "val" / "n03" / "d.png").unlink()
    (root / "val" / "n03").rmdir()
    with pytest.raises(DataError, match="has no class folders"):
        load("imagenet", root=root, split="val")
    (root / "val").rmdir()
    with pytest.raises(DataError, match=r"no .*val folder; expected ImageFolder layout"):
        load("imagenet", root=root, split="test")
    (root / "train" / "n03").mkdir()
    with pytest.raises(DataError, match="class folder .*n03 has no images"):
        load("imagenet", root=root, split="train")
