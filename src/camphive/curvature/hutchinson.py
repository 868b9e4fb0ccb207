"""Hutchinson's estimators of diag(H) and tr(H) from products with random sign vectors.

With Rademacher probes ``z`` (entries +1/-1, independent), ``E[z * Hz] = diag(H)`` and
``E[z . Hz] = tr(H)``. Both are unbiased; the diagonal estimate is exact for a diagonal
matrix (``z * Dz = D z^2 = diag(D)``), and its error otherwise shrinks like
``1/sqrt(num_probes)``. Probes go through ``matmat`` in blocks when the operator has it
(a :class:`HessianOperator` then shares each batch's first backward).

Probes are drawn on the CPU from ``seed`` alone, so under torchrun every process draws the same
probes; with a distributed operator (products reduced over the processes) every process then
gets the same estimate, that of one process holding all the data.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from camphive.curvature.flat import rademacher
from camphive.curvature.operators import operator_device, operator_dtype
from camphive.errors import ConfigError


@dataclass
class DiagonalEstimate:
    """``diagonal``: ``(dim,)`` estimate of diag(H); ``standard_error``: ``(dim,)`` per entry
    (sample standard deviation / sqrt(num_probes); ``nan`` with a single probe)."""

    diagonal: torch.Tensor
    standard_error: torch.Tensor
    num_probes: int
    num_matvecs: int
    seed: int
    wall_time_s: float

    def to_dict(self) -> dict:
        return {
            "dim": int(self.diagonal.numel()),
            "num_probes": self.num_probes,
            "num_matvecs": self.num_matvecs,
            "seed": self.seed,
            "wall_time_s": self.wall_time_s,
            "diagonal_sum": float(self.diagonal.sum()),
            "diagonal_mean": float(self.diagonal.mean()),
            "mean_standard_error": float(self.standard_error.mean()),
        }


@dataclass
class TraceEstimate:
    """``trace``: the estimate; ``standard_error``: sample standard deviation of the per-probe
    values / sqrt(num_probes) (``nan`` with a single probe); ``samples``: those values."""

    trace: float
    standard_error: float
    samples: list[float]
    num_probes: int
    num_matvecs: int
    seed: int
    wall_time_s: float

    def to_dict(self) -> dict:
        return {
            "trace": self.trace,
            "standard_error": self.standard_error,
            "num_probes": self.num_probes,
            "num_matvecs": self.num_matvecs,
            "seed": self.seed,
            "wall_time_s": self.wall_time_s,
            "samples": list(self.samples),
        }


def _probe_products(operator, num_probes: int, seed: int, block_size: int):
    """Yield ``(Z, HZ)`` blocks of ``(dim, b)`` Rademacher probes and their products."""
    if num_probes < 1:
        raise ConfigError(f"num_probes={num_probes}; Hutchinson needs at least one probe")
    if block_size < 1:
        raise ConfigError(f"block_size={block_size}; use a positive number of probes per pass")
    dtype, device = operator_dtype(operator), operator_device(operator)
    generator = torch.Generator().manual_seed(int(seed))
    done = 0
    while done < num_probes:
        size = min(block_size, num_probes - done)
        probes = rademacher((size, operator.dim), generator, dtype, device).T  # probe by probe: same stream for any block size
        if hasattr(operator, "matmat"):
            products = operator.matmat(probes)
        else:
            products = torch.stack([operator.matvec(column) for column in probes.T], dim=1)
        done += size
        yield probes, products


def hutchinson_diagonal(operator, num_probes: int = 32, seed: int = 0, block_size: int = 8) -> DiagonalEstimate:
    """Estimate diag(H) as the mean of ``z * Hz`` over ``num_probes`` Rademacher probes."""
    start = time.perf_counter()
    dtype, device = operator_dtype(operator), operator_device(operator)
    total = torch.zeros(operator.dim, dtype=dtype, device=device)
    squares = torch.zeros(operator.dim, dtype=dtype, device=device)
    for probes, products in _probe_products(operator, num_probes, seed, block_size):
        samples = probes * products
        total += samples.sum(dim=1)
        squares += (samples * samples).sum(dim=1)
    mean = total / num_probes
    if num_probes > 1:
        variance = ((squares - num_probes * mean * mean) / (num_probes - 1)).clamp_min(0)
        error = (variance / num_probes).sqrt()
    else:
        error = torch.full_like(mean, float("nan"))
    return DiagonalEstimate(mean, error, num_probes, num_probes, int(seed), time.perf_counter() - start)


def hutchinson_trace(operator, num_probes: int = 32, seed: int = 0, block_size: int = 8) -> TraceEstimate:
    """Estimate tr(H) as the mean of ``z . Hz`` over ``num_probes`` Rademacher probes."""
    start = time.perf_counter()
    samples: list[float] = []
    for probes, products in _probe_products(operator, num_probes, seed, block_size):
        samples.extend(float(value) for value in (probes * products).sum(dim=0))
    trace = math.fsum(samples) / num_probes
    if num_probes > 1:
        variance = math.fsum((value - trace) ** 2 for value in samples) / (num_probes - 1)
        error = math.sqrt(variance / num_probes)
    else:
        error = float("nan")
    return TraceEstimate(trace, error, samples, num_probes, num_probes, int(seed), time.perf_counter() - start)
