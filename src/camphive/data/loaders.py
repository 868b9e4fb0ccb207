"""Batches from datasets: a seeded DataLoader, or a faster batch-wise loader for in-memory data.

For a dataset held in memory as one tensor (Fashion-MNIST, CIFAR, synthetic), fetching
items one by one and collating them costs far more than the images themselves;
:class:`TensorBatchLoader` gathers a whole batch with one index operation and applies the
transform to the batch at once.
"""
from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from camphive.data.base import TensorImageDataset
from camphive.errors import ConfigError

# In-memory datasets up to this size (the stored pixels, e.g. uint8) are held on the GPU
# during training and evaluation: Fashion-MNIST is 47 MB, CIFAR-10 150 MB.
GPU_RESIDENT_MAX_BYTES = 2 * 1024**3


@contextmanager
def _intra_op_threads(count: int | None):
    """Run torch ops with ``count`` intra-op threads, restoring the setting after."""
    previous = torch.get_num_threads()
    if count is None or count == previous:
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class TensorBatchLoader:
    """Iterate ``(inputs (B, C, H, W), targets (B,))`` batches of a :class:`TensorImageDataset`.

    ``shuffle`` draws a new order each pass from a generator seeded with ``seed`` (so the
    sequence of epochs is repeatable, as with a seeded DataLoader); augmentation draws from
    torch's global RNG. ``indices`` restricts the loader to those samples.

    ``threads``: intra-op threads for gathering and transforming a batch (default 1;
    ``None`` keeps torch's setting). These ops take well under a millisecond, and on a
    busy machine splitting them over threads made an epoch of Fashion-MNIST 30x slower
    (38 s instead of 1.2 s on 2 shared cores), while one thread costs little when idle.

    ``device``: hold the images and labels there (copied once) and gather, augment and
    normalise each batch there: for a GPU, no host-to-device copy per step. The random
    choices are still drawn on the CPU, so the batches equal those of a CPU loader.
    """

    def __init__(
        self,
        dataset: TensorImageDataset,
        batch_size: int = 128,
        shuffle: bool = False,
        seed: int = 0,
        indices: Sequence[int] | torch.Tensor | None = None,
        drop_last: bool = False,
        threads: int | None = 1,
        device: torch.device | str | None = None,
    ):
        if not dataset.supports_batches:
            raise ConfigError(f"{dataset.name}'s transform {dataset.transform!r} cannot transform batches; use a DataLoader")
        if batch_size <= 0:
            raise ConfigError(f"batch_size must be positive, got {batch_size}")
        self.source = dataset if device is None else _on_device(dataset, torch.device(device))
        self.indices = torch.arange(len(dataset)) if indices is None else torch.as_tensor(indices, dtype=torch.int64)
        self.dataset = dataset if indices is None else Subset(dataset, self.indices.tolist())
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.generator = torch.Generator().manual_seed(int(seed))
        self.threads = threads

    def __len__(self) -> int:
        count = self.indices.numel()
        return count // self.batch_size if self.drop_last else -(-count // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self.indices
        if self.shuffle:
            order = order[torch.randperm(order.numel(), generator=self.generator)]
        for batch in range(len(self)):
            with _intra_op_threads(self.threads):
                inputs, targets = self.source.batch(order[batch * self.batch_size : (batch + 1) * self.batch_size])
            yield inputs, targets

    def __repr__(self) -> str:
        return f"TensorBatchLoader({self.source.name}, samples={self.indices.numel()}, batch_size={self.batch_size}, shuffle={self.shuffle})"


def _on_device(dataset: TensorImageDataset, device: torch.device) -> TensorImageDataset:
    """A shallow copy of ``dataset`` whose image and label tensors live on ``device``."""
    if dataset.images.device == device:
        return dataset
    moved = copy.copy(dataset)
    moved.images, moved.labels = dataset.images.to(device), dataset.labels.to(device)
    return moved


def _model_device(device) -> torch.device | None:
    """``device`` as jobs give it (``auto``, ``cuda``...), made this process's device (its GPU under torchrun)."""
    if device is None:
        return None
    from camphive.devices import resolve_device
    from camphive.distributed.group import process_device

    return process_device(resolve_device(device))


def device_resident(dataset: Dataset, device: torch.device | str | None, max_bytes: int = GPU_RESIDENT_MAX_BYTES) -> bool:
    """Whether ``loader`` keeps ``dataset`` on ``device``: an accelerator, in-memory data that fits ``max_bytes``."""
    if device is None or torch.device(device).type == "cpu":
        return False
    if not (isinstance(dataset, TensorImageDataset) and dataset.supports_batches):
        return False
    return dataset.images.numel() * dataset.images.element_size() <= max_bytes


def subset_indices(size: int, subset: int | Sequence[int] | None, random_subset: bool, seed: int) -> list[int] | None:
    """The samples ``loader`` keeps: all (``None``), the first N, N drawn with ``seed``, or given indices."""
    if subset is None:
        return None
    if isinstance(subset, bool) or not isinstance(subset, int):
        indices = [int(index) for index in subset]
        if indices and (min(indices) < 0 or max(indices) >= size):
            raise ConfigError(f"subset indices must lie in [0, {size - 1}] for this dataset of {size} samples")
        return indices
    if subset <= 0 or subset > size:
        raise ConfigError(f"subset must be between 1 and the dataset size {size}, got {subset}")
    if not random_subset:
        return list(range(subset))
    # A generator of its own (offset from the shuffling one) so the subset does not change the batch order.
    generator = torch.Generator().manual_seed(int(seed) + 1_000_003)
    return sorted(torch.randperm(size, generator=generator)[:subset].tolist())


def loader(
    dataset: Dataset,
    batch_size: int = 128,
    train: bool = False,
    num_workers: int = 0,
    seed: int = 0,
    subset: int | Sequence[int] | None = None,
    drop_last: bool = False,
    random_subset: bool = False,
    batched: bool | None = None,
    device: torch.device | str | None = None,
):
    """Batches of ``dataset``: shuffled when ``train``, in a repeatable order given ``seed``.

    ``subset``: keep the first N samples (or N drawn with ``seed`` when ``random_subset``),
    or exactly the given indices. ``batched``: use the batch-wise :class:`TensorBatchLoader`
    (default: whenever the dataset is in memory, its transform handles batches and
    ``num_workers == 0``); otherwise a ``torch.utils.data.DataLoader``. Both yield
    ``(inputs, targets)`` tensors and expose ``dataset``, ``batch_size`` and ``len()``.
    ``device``: where the model runs; on a GPU, a batch-wise loader of a dataset that fits
    (:func:`device_resident`) keeps the data there and yields batches already on it.
    """
    if batch_size <= 0:
        raise ConfigError(f"batch_size must be positive, got {batch_size}")
    if num_workers < 0:
        raise ConfigError(f"num_workers must be >= 0, got {num_workers}")
    indices = subset_indices(len(dataset), subset, random_subset, seed)
    can_batch = isinstance(dataset, TensorImageDataset) and dataset.supports_batches and num_workers == 0
    if batched and not can_batch:
        raise ConfigError(
            "batched=True needs an in-memory camphive dataset whose transform supports batches, and num_workers=0"
        )
    if can_batch and batched is not False:
        resident = _model_device(device)
        resident = resident if device_resident(dataset, resident) else None
        return TensorBatchLoader(dataset, batch_size, shuffle=train, seed=seed, indices=indices, drop_last=drop_last,
                                 device=resident)
    return DataLoader(
        dataset if indices is None else Subset(dataset, indices),
        batch_size=batch_size,
        shuffle=train,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(int(seed)),
        drop_last=drop_last,
        persistent_workers=num_workers > 0,
    )
