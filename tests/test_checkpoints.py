import pytest
import torch

from camphive import models
from camphive.checkpoints import load_checkpoint, read_checkpoint, save_checkpoint
from camphive.errors import CheckpointError, ConfigError


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


def test_checkpoint_records_its_dataset_options_and_gives_them_back(tmp_path):
    from camphive.jobs.common import checkpoint_dataset, checkpoint_metadata, load_splits, model_for

    options = {"num_samples": 16, "num_classes": 4, "shape": [1, 6, 6]}
    splits = load_splits("synthetic", **options)
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, model_for("small-cnn", splits), **checkpoint_metadata(splits))
    metadata = load_checkpoint(path).metadata
    assert metadata["dataset_options"] == options and metadata["input_shape"] == [1, 6, 6]
    assert checkpoint_dataset(metadata, None, path) == ("synthetic", options)
    assert checkpoint_dataset(metadata, "Synthetic", path) == ("Synthetic", options)  # the same dataset, named
    assert checkpoint_dataset(metadata, "cifar10", path) == ("cifar10", {})  # another dataset: the user's choice
    with pytest.raises(ConfigError, match="does not record its dataset; pass --dataset"):
        checkpoint_dataset({}, None, path)


def test_data_of_another_shape_is_refused_naming_both_shapes():
    from types import SimpleNamespace

    from camphive.jobs.common import check_input_shape

    def data(*shape):
        return SimpleNamespace(input_shape=shape)

    check_input_shape({"input_shape": [1, 6, 6]}, data(1, 6, 6), "m.safetensors", "synthetic")
    check_input_shape({}, data(3, 32, 32), "m.safetensors", "synthetic")  # older checkpoints record no shape
    recorded = {"input_shape": [1, 6, 6], "dataset": "synthetic"}
    with pytest.raises(ConfigError, match=r"^dataset synthetic gives inputs of shape 3x32x32 but checkpoint "
                                          r"m.safetensors was made for 1x6x6; load the data with the options"):
        check_input_shape(recorded, data(3, 32, 32), "m.safetensors", "synthetic")
    with pytest.raises(ConfigError, match="shape 1x28x28 .* for 1x6x6; pass --dataset synthetic"):
        check_input_shape(recorded, data(1, 28, 28), "m.safetensors", "fashion-mnist")
