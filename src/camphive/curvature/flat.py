"""Flat-vector helpers: the curvature operators act on one vector holding several tensors.

The flat layout is the concatenation of ``tensor.reshape(-1)`` in the given order, so entry
``offset(i) + j`` of the flat vector is element ``j`` (row-major) of tensor ``i``.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch


def flatten_tensors(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """Concatenate tensors into one 1-D vector of length ``sum(t.numel())``."""
    return torch.cat([tensor.reshape(-1) for tensor in tensors])


def split_flat(vector: torch.Tensor, shapes: Sequence[torch.Size]) -> list[torch.Tensor]:
    """Split a flat vector into views shaped like ``shapes`` (the inverse of :func:`flatten_tensors`).

    A leading batch dimension is kept: a ``(k, dim)`` matrix gives tensors of shape
    ``(k, *shape)``, which is how several vectors travel together.
    """
    sizes = [int(torch.Size(shape).numel()) for shape in shapes]
    pieces = torch.split(vector, sizes, dim=-1)
    lead = tuple(vector.shape[:-1])
    return [piece.reshape(lead + tuple(shape)) for piece, shape in zip(pieces, shapes)]


def offsets(shapes: Sequence[torch.Size]) -> list[int]:
    """Start index of each tensor in the flat vector, plus the total length at the end."""
    starts = [0]
    for shape in shapes:
        starts.append(starts[-1] + int(torch.Size(shape).numel()))
    return starts


def rademacher(shape: tuple[int, ...], generator: torch.Generator, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Random signs (+1/-1 with equal probability), drawn on the CPU so seeds agree across devices."""
    signs = torch.randint(0, 2, shape, generator=generator, dtype=torch.int8)
    return (signs.to(dtype) * 2 - 1).to(device)


def seeded_normal(dim: int, seed: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A standard normal vector from ``seed``, drawn on the CPU so seeds agree across devices."""
    generator = torch.Generator().manual_seed(int(seed))
    return torch.randn(dim, generator=generator, dtype=torch.float64).to(dtype=dtype, device=device)
