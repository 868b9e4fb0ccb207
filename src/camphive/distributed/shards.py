"""Data shards: each process's share of calibration batches, training loaders and evaluation loaders."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, Sampler, SequentialSampler

from camphive.distributed.group import is_distributed, rank, world_size
from camphive.errors import ConfigError, DataError


def shard_batches(batches: Sequence, rank_: int | None = None, world_size_: int | None = None) -> list:
    """This process's share of a list of calibration batches; the shares are disjoint and cover all.

    When the number of batches is a multiple of the process count, rank ``r`` takes batches
    ``r, r+W, ...`` (whole batches); otherwise every batch is split into ``W`` near-equal parts
    and rank ``r`` takes part ``r`` of each, so every process gets the same number of batches.
    Curvature reduced over the shares (weighted by samples) equals that of all the batches.
    """
    rank_ = rank() if rank_ is None else rank_
    size = world_size() if world_size_ is None else world_size_
    batches = list(batches)
    if size == 1:
        return batches
    total = sum(int(inputs.shape[0]) for inputs, *_ in batches)
    if total < size:
        raise DataError(f"{total} calibration sample(s) cannot be shared by {size} processes; use more calibration samples")
    if len(batches) % size == 0:
        return batches[rank_::size]
    share = []
    for inputs, targets, *rest in batches:
        part = torch.tensor_split(torch.arange(inputs.shape[0]), size)[rank_]
        if part.numel():
            start, stop = int(part[0]), int(part[-1]) + 1
            share.append((inputs[start:stop], targets[start:stop], *rest))
    return share


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank+W, ...`` of ``range(size)``, in order and unpadded: for evaluation,
    where every sample must count exactly once (unlike ``DistributedSampler``, which pads)."""

    def __init__(self, size: int, rank_: int, world_size_: int) -> None:
        self.indices = range(rank_, size, world_size_)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class ShardedBatchLoader:
    """One process's shard of a :class:`~camphive.data.TensorBatchLoader`.

    Every pass draws the same permutation on every process (from the shared ``generator``,
    which ``train`` seeds per epoch), pads it by wrapping around like ``DistributedSampler``
    when ``pad`` (training: equal step counts), and keeps positions ``rank, rank+W, ...``.
    """

    def __init__(self, base, rank_: int, world_size_: int, pad: bool) -> None:
        self.base, self.rank, self.world_size, self.pad = base, rank_, world_size_, pad
        self.generator = base.generator
        self.dataset, self.batch_size, self.drop_last = base.dataset, base.batch_size, base.drop_last

    def _shard_size(self) -> int:
        count = self.base.indices.numel()
        return math.ceil(count / self.world_size) if self.pad else len(range(self.rank, count, self.world_size))

    def __len__(self) -> int:
        size = self._shard_size()
        return size // self.batch_size if self.drop_last else -(-size // self.batch_size)

    def __iter__(self):
        order = self.base.indices
        if self.base.shuffle:
            order = order[torch.randperm(order.numel(), generator=self.generator)]
        if self.pad and order.numel() % self.world_size:
            extra = self.world_size - order.numel() % self.world_size
            order = torch.cat([order, order.repeat(math.ceil(extra / order.numel()))[:extra]])
        mine = order[self.rank :: self.world_size]
        for batch in range(len(self)):
            threads = torch.get_num_threads()
            if self.base.threads:  # the base loader's setting, for the gathering only (see TensorBatchLoader)
                torch.set_num_threads(self.base.threads)
            try:
                item = self.base.source.batch(mine[batch * self.batch_size : (batch + 1) * self.batch_size])
            finally:
                torch.set_num_threads(threads)
            yield item

    def __repr__(self) -> str:
        return f"ShardedBatchLoader({self.base!r}, rank={self.rank}, world_size={self.world_size}, pad={self.pad})"


def is_sharded(data) -> bool:
    sampler = getattr(data, "sampler", None)
    return isinstance(data, ShardedBatchLoader) or isinstance(sampler, (DistributedSampler, ShardSampler))


def shard_loader(data, *, pad: bool, seed: int = 0):
    """This process's shard of a loader; anything else (a list of batches) is returned as it is.

    ``pad``: repeat a few samples so every process gets the same number of batches (training,
    as ``DistributedSampler`` does); without it each sample is seen exactly once (evaluation).
    A ``DataLoader`` is rebuilt around a ``DistributedSampler`` (shuffled with ``seed`` when it
    shuffled) or a :class:`ShardSampler`; loaders already sharded are returned unchanged.
    """
    from camphive.data.loaders import TensorBatchLoader

    if not is_distributed() or is_sharded(data):
        return data
    if isinstance(data, TensorBatchLoader):
        return ShardedBatchLoader(data, rank(), world_size(), pad)
    if not isinstance(data, DataLoader) or isinstance(data.dataset, torch.utils.data.IterableDataset):
        return data
    shuffle = isinstance(data.sampler, RandomSampler)
    if data.batch_size is None or not isinstance(data.sampler, (RandomSampler, SequentialSampler)):
        raise ConfigError("under torchrun a DataLoader must use shuffle=True/False with a batch_size, or a "
                          "DistributedSampler of your own; custom samplers cannot be sharded here")
    if pad:
        sampler = DistributedSampler(data.dataset, num_replicas=world_size(), rank=rank(), shuffle=shuffle, seed=seed)
    else:
        sampler = ShardSampler(len(data.dataset), rank(), world_size())
    return DataLoader(data.dataset, batch_size=data.batch_size, sampler=sampler, num_workers=data.num_workers,
                      collate_fn=data.collate_fn, pin_memory=data.pin_memory, drop_last=data.drop_last,
                      timeout=data.timeout, worker_init_fn=data.worker_init_fn,
                      persistent_workers=data.persistent_workers and data.num_workers > 0)


class PaddingFilter:
    """Which samples of a ``DistributedSampler`` shard are padding (repeats added to even the shards).

    The padded list has ``total_size`` positions; this process reads positions ``rank + i W``, and
    those at or past the dataset's size are repeats. Call :meth:`keep` with each batch's size in order.
    """

    def __init__(self, size: int, rank_: int, world_size_: int) -> None:
        self.size, self.rank, self.world_size, self.position = size, rank_, world_size_, 0

    def keep(self, count: int) -> torch.Tensor:
        positions = self.rank + (self.position + torch.arange(count)) * self.world_size
        self.position += count
        return positions < self.size


def padding_filter(data) -> PaddingFilter | None:
    """A :class:`PaddingFilter` for a ``DataLoader`` over a padding ``DistributedSampler``, else ``None``."""
    sampler = getattr(data, "sampler", None)
    if not isinstance(sampler, DistributedSampler) or sampler.drop_last:
        return None
    size = len(sampler.dataset)
    if sampler.total_size == size:
        return None
    return PaddingFilter(size, sampler.rank, sampler.num_replicas)
