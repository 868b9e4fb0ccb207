"""Tensor transforms: exact values for single images and batches."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from camphive.data.transforms import Compose, Normalize, RandomCrop, RandomHorizontalFlip, ToFloat, default_transform
from camphive.errors import ConfigError

from .official_formats import assert_close


def _images(count: int = 16, channels: int = 3, size: int = 8) -> torch.Tensor:
    return torch.randint(0, 256, (count, channels, size, size), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)


def _crop_offset(padded: torch.Tensor, window: torch.Tensor) -> tuple[int, int] | None:
    """The (top, left) where ``window`` sits in ``padded`` (C, H, W), searched exhaustively."""
    height, width = window.shape[-2:]
    for top in range(padded.shape[-2] - height + 1):
        for left in range(padded.shape[-1] - width + 1):
            if torch.equal(padded[:, top : top + height, left : left + width], window):
                return top, left
    return None


def test_to_float_is_exact():
    pixels = torch.tensor([[[0, 1, 128, 255]]], dtype=torch.uint8)
    assert torch.equal(ToFloat()(pixels), torch.tensor([[[0, 1, 128, 255]]]) / 255.0)
    already = torch.rand(1, 2, 2)
    assert ToFloat()(already) is already


def test_normalize_is_exact_per_channel():
    image = torch.arange(12, dtype=torch.float32).reshape(3, 2, 2)
    normalized = Normalize((1.0, 2.0, 3.0), (0.5, 2.0, 4.0))(image)
    expected = torch.stack([(image[0] - 1) / 0.5, (image[1] - 2) / 2, (image[2] - 3) / 4])
    assert torch.equal(normalized, expected)
    batch = torch.stack([image, image + 1])
    assert torch.equal(Normalize((1.0, 2.0, 3.0), (0.5, 2.0, 4.0))(batch)[1], Normalize((1.0, 2.0, 3.0), (0.5, 2.0, 4.0))(image + 1))
    with pytest.raises(ConfigError, match="1 channel"):
        Normalize((0.5,), (0.5,))(image)
    with pytest.raises(ConfigError, match="positive"):
        Normalize((0.5,), (0.0,))


@pytest.mark.parametrize("batched", [False, True])
def test_random_crop_keeps_shape_and_cuts_a_window_of_the_padded_image(batched):
    images = _images()
    crop = RandomCrop(8, padding=2)
    torch.manual_seed(1)
    cropped = crop(images) if batched else torch.stack([crop(image) for image in images])
    assert cropped.shape == images.shape and cropped.dtype == torch.uint8
    offsets = []
    for image, window in zip(images, cropped):
        offset = _crop_offset(F.pad(image, (2, 2, 2, 2)), window)
        assert offset is not None
        offsets.append(offset)
    assert len(set(offsets)) > 3  # independent offsets per image


def test_random_crop_without_padding_is_identity_and_smaller_crops_work():
    images = _images(4)
    assert torch.equal(RandomCrop(8)(images), images)
    small = RandomCrop((3, 5))(images[0])
    assert small.shape == (3, 3, 5) and _crop_offset(images[0], small) is not None
    with pytest.raises(ConfigError, match="larger than the padded image"):
        RandomCrop(9)(images)


def test_random_crop_is_seeded():
    images = _images()
    crop = RandomCrop(8, padding=4)
    torch.manual_seed(7)
    first = crop(images)
    torch.manual_seed(7)
    assert torch.equal(first, crop(images))


def test_flip_flips_exactly():
    images = _images(32)
    assert torch.equal(RandomHorizontalFlip(1.0)(images[0]), images[0][..., torch.arange(7, -1, -1)])
    assert torch.equal(RandomHorizontalFlip(0.0)(images), images)
    assert torch.equal(RandomHorizontalFlip(1.0)(images), images.flip(-1))
    torch.manual_seed(0)
    mixed = RandomHorizontalFlip(0.5)(images)
    flipped = [torch.equal(out, image.flip(-1)) for out, image in zip(mixed, images)]
    kept = [torch.equal(out, image) for out, image in zip(mixed, images)]
    assert all(a or b for a, b in zip(flipped, kept)) and 0 < sum(flipped) < 32


def test_compose_and_batch_support():
    pipeline = Compose([RandomHorizontalFlip(1.0), ToFloat(), Normalize((0.5,) * 3, (0.5,) * 3)])
    images = _images(2)
    assert pipeline.supports_batches
    assert torch.equal(pipeline(images), (images.flip(-1).float() / 255 - 0.5) / 0.5)
    assert not Compose([ToFloat(), lambda image: image]).supports_batches
    with pytest.raises(ConfigError, match="not callable"):
        Compose([3])


def test_default_transforms():
    train = default_transform("cifar100", train=True)
    assert [type(step) for step in train.transforms] == [RandomCrop, RandomHorizontalFlip, ToFloat, Normalize]
    assert train.transforms[0].padding == 4 and train.transforms[0].size == (32, 32)
    test = default_transform("cifar100", train=False)
    assert [type(step) for step in test.transforms] == [ToFloat, Normalize]
    assert_close(test.transforms[1].mean.flatten(), torch.tensor([0.5071, 0.4865, 0.4409]), atol=1e-7)
    assert_close(test.transforms[1].std.flatten(), torch.tensor([0.2673, 0.2564, 0.2762]), atol=1e-7)
    fashion = default_transform("fashion-mnist", train=True)
    assert fashion.transforms[0].padding == 2 and fashion.transforms[0].size == (28, 28)
    assert RandomHorizontalFlip not in [type(step) for step in default_transform("mnist", train=True).transforms]
    with pytest.raises(ConfigError):
        default_transform("imagenet", train=True)


def test_bad_arguments():
    with pytest.raises(ConfigError):
        RandomCrop(0)
    with pytest.raises(ConfigError):
        RandomCrop(4, padding=-1)
    with pytest.raises(ConfigError):
        RandomHorizontalFlip(1.5)
    with pytest.raises(ConfigError, match=r"\(C, H, W\) or \(N, C, H, W\)"):
        RandomCrop(2)(torch.zeros(4, 4))
