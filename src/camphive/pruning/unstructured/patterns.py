"""N:M semi-structured sparsity: in every group of M consecutive fan-in weights of an output unit, N are pruned.

2:4 is what Ampere and later sparse tensor cores run (4:8 too). A group is M consecutive
entries of the reduction dimension of the GEMM the layer runs, the order the hardware reads:

* a linear layer: M consecutive input features of one output unit (row);
* a convolution: its implicit GEMM reduces over ``(kh, kw, in_channel)`` (NHWC; cuSPARSELt
  and TensorRT prune groups of M consecutive input channels at each kernel position). camphive's
  unit matrix ``W.reshape(out, -1)`` is in ``(in_channel, kh, kw)`` order, so a group is M
  consecutive input channels ``c`` at a fixed kernel position ``p``: columns ``c * kh * kw + p``.
  A grouped convolution's filter reads only its group's channels, so its groups never cross
  conv groups.

A layer whose input channels per conv group (or in_features) are not a multiple of M (the
first convolution of a 1- or 3-channel model, a depthwise convolution) has no such layout: it
is left dense and named in :attr:`PatternLayout.dense`. Selection (:func:`select_pattern`)
prunes, in every group, the lowest-scoring alive weights until ``round(N * fraction)`` of the
group are pruned (weights pruned earlier count), so over the cycles of a schedule every group
reaches exactly N; ``min_keep`` floors do not apply to patterned layers.

Here "N:M" counts the weights *pruned* per group (sparsity N/M); for 2:4 and 4:8 this is the
same as the hardware's "N non-zeros out of M".
"""
from __future__ import annotations

import math
import numbers
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from camphive.errors import ConfigError
from camphive.pruning.core.unit_curvature import unit_matrix

_PATTERN = re.compile(r"\s*([+-]?\d+)\s*:\s*([+-]?\d+)\s*")


def normalize_pattern(pattern) -> str | None:
    """``pattern`` as checked canonical text ``"N:M"`` (None stays None), or one ConfigError line."""
    if pattern is None:
        return None
    if isinstance(pattern, numbers.Number):
        raise ConfigError(f"pattern {pattern!r} is a number, not N:M (YAML reads an unquoted 2:4 as the base-60 "
                          "number 124); quote it: pattern: \"2:4\"")
    if not isinstance(pattern, str):
        raise ConfigError(f"pattern must be text N:M such as \"2:4\", got {type(pattern).__name__}")
    found = _PATTERN.fullmatch(pattern)
    if not found:
        hint = " (an unquoted 2:4 in a YAML file reads as the base-60 number 124: quote it)" if pattern.isdigit() else ""
        raise ConfigError(f"pattern {pattern!r} is not N:M{hint}; use two positive integers with N < M, e.g. 2:4 or 4:8")
    n, m = int(found.group(1)), int(found.group(2))
    if n < 1 or m < 1:
        raise ConfigError(f"pattern {n}:{m} needs positive N and M; use N:M with 0 < N < M, e.g. 2:4")
    if n > m:
        raise ConfigError(f"pattern {n}:{m} has N > M; use N:M with N < M, e.g. 2:4")
    if n == m:
        raise ConfigError(f"pattern {n}:{m} would prune every weight (N = M); use N:M with N < M, e.g. 2:4")
    return f"{n}:{m}"


def parse_pattern(pattern: str) -> tuple[int, int]:
    """``(N, M)`` of a pattern such as ``"2:4"`` (checked)."""
    n, m = normalize_pattern(pattern).split(":")
    return int(n), int(m)


def pattern_sparsity(pattern: str, sparsity: float | None) -> float:
    """The sparsity ``N/M`` a pattern sets; a different ``sparsity`` given with it is an error."""
    n, m = parse_pattern(pattern)
    implied = n / m
    if sparsity is not None and (not isinstance(sparsity, numbers.Real) or abs(sparsity - implied) > 1e-9):
        raise ConfigError(f"sparsity {sparsity} contradicts pattern {n}:{m}, which prunes {n}/{m} = {implied:g} of "
                          f"the patterned layers; drop sparsity or pass {implied:g}")
    return implied


def group_columns(weight_shape, m: int) -> torch.Tensor:
    """``(groups, m)``: the columns of the unit matrix ``W.reshape(out, -1)`` forming each N:M group.

    ``weight_shape``: ``(out, in_per_group)`` (linear) or ``(out, in_per_group, *kernel)``
    (convolution), with ``in_per_group`` a multiple of ``m``. Groups are listed in the GEMM's
    reduction order: kernel position first, then blocks of ``m`` consecutive input channels.
    """
    channels, positions = int(weight_shape[1]), math.prod(int(size) for size in weight_shape[2:])
    channel = torch.arange(channels).view(channels // m, m)  # (blocks, m)
    position = torch.arange(positions)
    return (channel[None] * positions + position[:, None, None]).reshape(-1, m)  # (positions * blocks, m)


def dense_reason(module: nn.Module, weight: torch.Tensor, m: int) -> str | None:
    """Why ``module`` cannot hold an N:M pattern along its fan-in (None when it can)."""
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return "a transposed convolution (its fan-in is not the weight's second dimension)"
    channels = int(weight.shape[1])
    if channels % m == 0:
        return None
    if weight.ndim == 2:
        return f"{channels} input features, not a multiple of {m}"
    groups = getattr(module, "groups", 1)
    per_group = " per conv group" if groups > 1 else ""
    return f"{channels} input channel{'s' if channels != 1 else ''}{per_group}, not a multiple of {m}"


@dataclass
class PatternLayout:
    """Where a pattern applies: ``columns`` ``{parameter name: (groups, m) columns}`` of the
    patterned layers, ``dense`` ``{parameter name: reason}`` of the layers left dense."""

    n: int
    m: int
    columns: dict[str, torch.Tensor] = field(default_factory=dict)
    dense: dict[str, str] = field(default_factory=dict)

    @property
    def pattern(self) -> str:
        return f"{self.n}:{self.m}"


def pattern_layout(model: nn.Module, params: Mapping[str, torch.Tensor], pattern: str) -> PatternLayout:
    """The groups of every prunable weight in ``params`` (names of ``model.named_parameters()``)."""
    n, m = parse_pattern(pattern)
    layout = PatternLayout(n, m)
    for name, weight in params.items():
        module = model.get_submodule(name.rpartition(".")[0])
        reason = dense_reason(module, weight, m)
        if reason is None:
            layout.columns[name] = group_columns(weight.shape, m).to(weight.device)
        else:
            layout.dense[name] = reason
    return layout


def pattern_extra(model: nn.Module, params: Mapping[str, torch.Tensor], pattern: str | None) -> dict:
    """What a patterned run adds to its result's ``extra``: ``{"dense_layers": {name: reason}}`` ({} without one)."""
    if pattern is None:
        return {}
    return {"dense_layers": pattern_layout(model, params, pattern).dense}


def per_group_count(n: int, fraction: float) -> int:
    """Weights pruned per group once a ``fraction`` of the schedule is done: ``round(n * fraction)``
    (halves up), within ``[0, n]``."""
    return min(n, max(0, math.floor(n * fraction + 0.5 + 1e-9)))


def select_pattern(scores: Mapping[str, torch.Tensor], alive: Mapping[str, torch.Tensor], layout: PatternLayout,
                   fraction: float = 1.0) -> dict[str, torch.Tensor]:
    """``{name: bool}`` of the alive weights to prune now, shaped like ``alive[name]``.

    In each group of a patterned layer, the lowest-scoring alive weights (ties by position)
    until ``per_group_count(n, fraction)`` of the group are pruned; nothing in dense layers.
    """
    count = per_group_count(layout.n, fraction)
    chosen = {}
    for name, mask in alive.items():
        if name in layout.columns:
            picked = _select_in_groups(unit_matrix(scores[name]), unit_matrix(mask), layout.columns[name], count)
            chosen[name] = picked.view_as(mask)
        else:
            chosen[name] = torch.zeros_like(mask, dtype=torch.bool)
    return chosen


def _select_in_groups(score: torch.Tensor, live: torch.Tensor, columns: torch.Tensor, count: int) -> torch.Tensor:
    """``(out, fan_in)`` bool: per unit and group ``columns`` ``(groups, m)``, the lowest-scoring
    live entries until ``count`` of the group are dead."""
    live = live.bool()
    columns = columns.to(live.device)
    grouped_live = live[:, columns]  # (out, groups, m)
    big = torch.finfo(torch.float64).max
    grouped = score.detach().to(device=live.device, dtype=torch.float64)[:, columns].nan_to_num(big, big, -big)
    grouped = grouped.masked_fill(~grouped_live, math.inf)  # dead entries sort last
    rank = ranks_in_groups(grouped)
    wanted = (count - (~grouped_live).sum(-1, keepdim=True)).clamp_min(0)
    picked = torch.zeros_like(live)
    picked[:, columns] = grouped_live & (rank < wanted)
    return picked


def ranks_in_groups(grouped: torch.Tensor, descending: bool = False) -> torch.Tensor:
    """Each entry's place (0 first) in the order of its group, the last dimension; ties by position."""
    order = torch.sort(grouped, dim=-1, descending=descending, stable=True).indices
    places = torch.arange(grouped.shape[-1], device=grouped.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, places)


def pruned_per_group(mask: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """``(out, groups)``: pruned entries (``mask`` False) in each group of each output unit."""
    return (~unit_matrix(mask.bool())[:, columns.to(mask.device)]).sum(-1)


def pattern_violations(masks: Mapping[str, torch.Tensor], layout: PatternLayout) -> dict[str, int]:
    """``{name: groups}`` of the patterned layers whose groups do not hold exactly N pruned weights."""
    counts = {name: int((pruned_per_group(masks[name], columns) != layout.n).sum())
              for name, columns in layout.columns.items() if name in masks}
    return {name: count for name, count in counts.items() if count}
