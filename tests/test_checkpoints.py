import pytest
import torch

from camphive import models
from camphive.checkpoints import load_checkpoint, read_checkpoint, save_checkpoint
from camphive.errors import CheckpointError


def test_round_trip_rebuilds_model_masks_and_metadata(tmp_path):
    model = models.create("small-cnn", num_classes=10, in_channels=1)
    masks = {"fc1.weight": torch.rand(model.fc1.weight.shape) > 0.5}
    path = save_checkpoint(tmp_path / "m.safetensors", model, masks, dataset="fashion-mnist", input_shape=[1, 28, 28])
    loaded = load_checkpoint(path)
    assert loaded.metadata["dataset"] == "fashion-mnist"
    assert torch.equal(loaded.masks["fc1.weight"], masks["fc1.weight"])
    inputs = torch.randn(2, 1, 28, 28)
    model.eval(), loaded.model.eval()
    assert torch.equal(model(inputs), loaded.model(inputs))


def test_truncated_checkpoint_is_refused(tmp_path):
    model = models.create("small-cnn", num_classes=10, in_channels=1)
    path = save_checkpoint(tmp_path / "m.safetensors", model)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or not a safetensors file"):
        load_checkpoint(path)


def test_pickle_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "evil.safetensors"
    torch.save({"x": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError):
        read_checkpoint(path)


def test_other_class_count_is_refused(tmp_path):
    model = models.create("small-cnn", num_classes=10, in_channels=1)
    path = save_checkpoint(tmp_path / "m.safetensors", model)
    with pytest.raises(CheckpointError, match="does not fit the model"):
        load_checkpoint(path, model=models.create("small-cnn", num_classes=5, in_channels=1))


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "none.safetensors")


def test_user_model_without_architecture_needs_the_model(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    path = save_checkpoint(tmp_path / "m.safetensors", model)
    with pytest.raises(CheckpointError, match="does not record its architecture"):
        load_checkpoint(path)
    loaded = load_checkpoint(path, model=torch.nn.Sequential(torch.nn.Linear(3, 2)))
    assert torch.equal(loaded.model[0].weight, model[0].weight)
