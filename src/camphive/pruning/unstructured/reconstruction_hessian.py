"""Inputs shared by the layer-wise one-shot solvers (SparseGPT, OBC), checked and in float64.

A layer's weight is viewed as ``W (out_units, fan_in)`` (``weight.reshape(out_units, -1)``: a
conv's columns in GEMM order, input channel major then kernel position) and
``G (fan_in, fan_in) = E[x x^T]`` over its calibration inputs (im2col patches for a conv). The
reconstruction error of a change ``dW`` is ``sum_r dW_r H dW_r^T`` with ``H`` the damped ``G``,
the same Hessian for every row. Masks are bool, True = kept (or, for ``alive``, not yet pruned).
"""
from __future__ import annotations

import torch

from camphive.errors import ConfigError, NumericalError


def weight_matrix(weight: torch.Tensor) -> torch.Tensor:
    """A float64 CPU copy of ``weight`` viewed as ``(out_units, fan_in)``."""
    if weight.ndim < 2:
        raise ConfigError(f"weight of shape {tuple(weight.shape)} has no fan-in; pass a linear or conv weight")
    return weight.detach().reshape(weight.shape[0], -1).to("cpu", torch.float64, copy=True)


def alive_matrix(alive: torch.Tensor | None, shape: torch.Size) -> torch.Tensor:
    """``alive`` as a bool CPU ``(out_units, fan_in)`` matrix; all True when None."""
    if alive is None:
        return torch.ones(shape, dtype=torch.bool)
    if alive.numel() != shape[0] * shape[1]:
        raise ConfigError(f"alive mask of shape {tuple(alive.shape)} does not fit a weight of {shape[0]} x {shape[1]}")
    return alive.detach().reshape(shape).to("cpu", torch.bool)


def damped_hessian(gram: torch.Tensor, damping: float, fan_in: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(H, dead)``: ``H = G + damping * mean(diag G) * I`` in float64 ``(fan_in, fan_in)``, and which inputs
    were never seen (``G_jj == 0``, ``(fan_in,)`` bool).

    A dead input's row and column of G are zero (G is positive semi-definite), so it is uncoupled from
    every other input; where damping leaves its diagonal at 0 (``damping == 0``, or all inputs dead) it is
    set to 1 so that H stays invertible. That value never changes another weight.
    """
    if gram.shape != (fan_in, fan_in):
        raise ConfigError(f"gram of shape {tuple(gram.shape)} does not fit a fan-in of {fan_in}; "
                          f"pass E[x x^T] of shape ({fan_in}, {fan_in})")
    if damping < 0:
        raise ConfigError(f"damping {damping} is negative; use a fraction of the mean diagonal such as 0.01")
    gram = gram.detach().to("cpu", torch.float64)
    gram = (gram + gram.T) / 2  # round-off asymmetry from accumulation would bias the Cholesky factor
    if not torch.isfinite(gram).all():
        raise NumericalError("gram contains NaN or inf; check the calibration inputs")
    dead = gram.diagonal() == 0
    hessian = gram + damping * gram.diagonal().mean() * torch.eye(fan_in, dtype=torch.float64)
    hessian.diagonal()[dead & (hessian.diagonal() <= 0)] = 1.0
    return hessian, dead


def positive_definite_inverse(hessian: torch.Tensor) -> torch.Tensor:
    """``H^-1`` by Cholesky; a one-line error when H is not positive definite."""
    factor, info = torch.linalg.cholesky_ex(hessian)
    if int(info) != 0:
        raise NumericalError(f"damped gram ({hessian.shape[0]} x {hessian.shape[0]}) is not positive definite; "
                             "raise damping or check the calibration inputs")
    return torch.cholesky_inverse(factor)


def pruned_alive_count(count: int, alive: torch.Tensor) -> int:
    """How many alive entries to prune so that ``count`` entries are pruned in all (dead ones included)."""
    dead_entries = int((~alive).sum())
    if not isinstance(count, int) or isinstance(count, bool) or not dead_entries <= count <= alive.numel():
        raise ConfigError(f"count {count!r} must be an integer between the {dead_entries} entries already pruned "
                          f"and the layer's {alive.numel()} entries")
    return count - dead_entries


def check_pattern(pattern, fan_in: int) -> tuple[int, int]:
    """``(n, m)`` of an N:M pattern (n of every m consecutive inputs pruned), checked against ``fan_in``."""
    try:
        n, m = (int(value) for value in pattern)
    except (TypeError, ValueError):
        raise ConfigError(f"pattern {pattern!r} is not a pair (n, m); use e.g. (2, 4)") from None
    if not (m >= 1 and 0 <= n <= m and fan_in % m == 0):
        raise ConfigError(f"pattern {n}:{m} needs 0 <= n <= m and m dividing the fan-in {fan_in}; use e.g. (2, 4)")
    return n, m
