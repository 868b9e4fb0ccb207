"""Pieces shared by the jobs: seeding, datasets and models from names."""
from __future__ import annotations

import os
import platform
import random
from dataclasses import dataclass, field

import numpy as np
import torch

from camphive import data as datasets
from camphive import distributed, models
from camphive.errors import ConfigError


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class DataSplits:
    train: torch.utils.data.Dataset
    test: torch.utils.data.Dataset
    name: str
    options: dict = field(default_factory=dict)  # as given to datasets.load (synthetic shape, num_classes, ...)

    @property
    def num_classes(self) -> int:
        return self.train.num_classes

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.test.input_shape)


def load_splits(name: str, root: str | None = None, **options) -> DataSplits:
    """Load the train and test splits of a dataset by name."""
    train = datasets.load(name, root=root, split="train", **options)
    test = datasets.load(name, root=root, split="test", **options)
    return DataSplits(train=train, test=test, name=getattr(train, "name", name), options=dict(options))


def loaders(splits: DataSplits, batch_size: int, seed: int, train_subset: int | None = None,
            test_subset: int | None = None, num_workers: int = 0, device=None):
    """Train and test loaders; on a GPU ``device`` small in-memory datasets are held there."""
    train_loader = datasets.loader(splits.train, batch_size=batch_size, train=True, seed=seed,
                                   subset=train_subset, num_workers=num_workers, device=device)
    test_loader = datasets.loader(splits.test, batch_size=max(batch_size, 256), train=False, seed=seed,
                                  subset=test_subset, num_workers=num_workers, device=device)
    return train_loader, test_loader


def model_for(name: str, splits: DataSplits, **options) -> torch.nn.Module:
    return models.create(name, num_classes=splits.num_classes, in_channels=splits.input_shape[0], **options)


def machine_description() -> dict:
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def checkpoint_metadata(splits: DataSplits, **extra) -> dict:
    """What a checkpoint records of its data: enough for evaluate and prune to load the same data again."""
    return {
        "dataset": splits.name,
        "dataset_options": dict(splits.options),
        "classes": list(getattr(splits.train, "classes", []) or []),
        "num_classes": splits.num_classes,
        "input_shape": list(splits.input_shape),
        **extra,
    }


def checkpoint_dataset(metadata: dict, dataset: str | None, checkpoint) -> tuple[str, dict]:
    """``(name, options)`` of the data to use with a checkpoint: ``dataset`` when the user names one,
    else the dataset the checkpoint records; with the options it was made with (a synthetic
    dataset's shape and classes) when it is the recorded dataset."""
    recorded = metadata.get("dataset")
    name = dataset or recorded
    if not name:
        raise ConfigError(f"checkpoint {checkpoint} does not record its dataset; pass --dataset")
    same = recorded is not None and _dataset_key(name) == _dataset_key(recorded)
    return name, dict(metadata.get("dataset_options") or {}) if same else {}


def _dataset_key(name: str) -> str:
    try:
        return datasets.canonical_name(name)
    except ConfigError:
        return str(name)


def check_input_shape(metadata: dict, data, checkpoint, dataset: str) -> None:
    """Refuse data whose samples differ in shape from the ones the checkpoint records it was made for
    (a model with global pooling would otherwise run on them and report a meaningless accuracy)."""
    recorded = metadata.get("input_shape")
    shape = getattr(data, "input_shape", None)
    if not recorded or shape is None or tuple(recorded) == tuple(shape):
        return
    trained_on = metadata.get("dataset")
    fix = (f"pass --dataset {trained_on}, the data it was trained on" if trained_on and _dataset_key(trained_on) !=
           _dataset_key(dataset) else "load the data with the options the model was trained with (e.g. shape)")
    raise ConfigError(f"dataset {dataset} gives inputs of shape {_shape(shape)} but checkpoint {checkpoint} was made for "
                      f"{_shape(recorded)}; {fix}")


def _shape(shape) -> str:
    return "x".join(str(size) for size in shape)


def calibration_batches(name: str, root: str | None, samples: int, batch_size: int, seed: int, **options) -> list:
    """A seeded random subset of the training split, with the test-time transform, as a list of batches."""
    if samples < 1:
        raise ConfigError(f"calibration samples must be >= 1, got {samples}")
    dataset = datasets.load(name, root=root, split="train", transform="eval", **options)
    samples = min(samples, len(dataset))
    return list(datasets.loader(dataset, batch_size=batch_size, subset=samples, random_subset=True, seed=seed))


def calibration_share(batches: list) -> list:
    """This process's calibration batches under torchrun (all of them in one process).

    Every curvature quantity (HVPs, gradients, Fisher, layer covariances, the Grams of
    structured pruning's merges and scores) and the BatchNorm statistics are reduced over the
    processes, so each process takes a shard, in both pruning modes.
    """
    return distributed.shard_batches(batches)
