"""Accept data the way PyTorch users hold it.

The API takes any iterable of ``(inputs, targets)`` batches: a ``DataLoader``, a list of
tensor pairs, or a ``Dataset`` of single samples, which is batched here.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import islice

import torch
from torch.utils.data import DataLoader, Dataset

from camphive.errors import DataError

Batch = tuple[torch.Tensor, torch.Tensor]


def as_batches(data, batch_size: int = 128, shuffle: bool = False, seed: int = 0) -> Iterable[Batch]:
    """Return something iterable, repeatedly, as ``(inputs, targets)`` batches.

    A ``Dataset`` of samples is wrapped in a ``DataLoader``; a ``DataLoader`` or any other
    re-iterable of batches is returned as is. A one-shot iterator is materialised once so
    that it can be read several times (curvature reads calibration data repeatedly).
    """
    if data is None:
        raise DataError("no data given; pass a DataLoader, a Dataset or a list of (inputs, targets) batches")
    if isinstance(data, DataLoader):
        return data
    if isinstance(data, Dataset) and not isinstance(data, torch.utils.data.IterableDataset):
        generator = torch.Generator().manual_seed(seed)
        return DataLoader(data, batch_size=batch_size, shuffle=shuffle, generator=generator)
    if isinstance(data, Iterator):
        data = list(data)
    if not isinstance(data, Iterable):
        raise DataError(
            f"data of type {type(data).__name__} is not iterable; "
            "pass a DataLoader, a Dataset or a list of (inputs, targets) batches"
        )
    return data


def take_batches(data, num_batches: int | None = None, batch_size: int = 128) -> list[Batch]:
    """Read the first ``num_batches`` batches (all when ``None``) into a list, checked.

    Raises :class:`DataError` when there are none, a batch is not an ``(inputs, targets)`` pair
    of tensors with one target per input, or floating-point inputs hold NaN or inf (they would
    poison every curvature estimate and BatchNorm statistic).
    """
    batches = as_batches(data, batch_size=batch_size)
    taken = list(batches if num_batches is None else islice(batches, num_batches))
    if not taken:
        raise DataError("the calibration data is empty; pass at least one (inputs, targets) batch")
    checked = []
    for index, batch in enumerate(taken):
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise DataError(
                f"batch {index} is a {type(batch).__name__}, not an (inputs, targets) pair; "
                "yield (inputs, targets) from your data"
            )
        inputs, targets = batch[0], batch[1]
        if not torch.is_tensor(inputs) or not torch.is_tensor(targets):
            hint = (" (a model with several inputs: wrap it in an nn.Module that takes one tensor and splits it)"
                    if isinstance(inputs, (tuple, list)) else "")
            raise DataError(f"batch {index} holds {type(inputs).__name__}/{type(targets).__name__}; inputs and "
                            f"targets must be tensors{hint}")
        if inputs.dim() == 0 or inputs.shape[0] == 0:
            raise DataError(f"batch {index} is empty; drop empty batches from the data")
        if targets.dim() > 0 and targets.shape[0] != inputs.shape[0]:
            raise DataError(f"batch {index} has {inputs.shape[0]} inputs but {targets.shape[0]} targets; give one "
                            "target per input (the first dimension is the batch)")
        if inputs.is_floating_point() and not bool(torch.isfinite(inputs).all()):
            raise DataError(f"batch {index} holds NaN or inf inputs; clean or drop those samples")
        checked.append((inputs, targets))
    return checked
