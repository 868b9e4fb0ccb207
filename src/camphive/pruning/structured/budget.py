"""How many channels each group keeps: sparsity or MACs targets, uniform or global, rounded.

MACs are predicted without pruning anything: one counted forward pass
(:func:`camphive.measure.count_macs`) gives, for every conv, linear and BatchNorm, the
number of positions at which each of its weights (or channels) is used; a layer's MACs
after removal are those positions times its new weight count, which follows from how many
input and output channels its groups keep. MACs of other operations (residual additions)
are held at their current value, so the prediction slightly overestimates what is left:
a MACs target is met or beaten, never missed by the prediction.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from camphive.errors import ConfigError
from camphive.measure import MacsReport
from camphive.pruning.structured.groups import ChannelGroup


@dataclass
class _LayerCost:
    name: str
    positions: float  # uses of each weight (conv/linear) or channel (norm) per sample
    kind: str  # "weights" or "norm"
    out_channels: int
    in_channels: int
    weight_per_pair: float  # weights per (output channel, input channel) pair: kernel / groups
    depthwise: bool
    out_groups: list[tuple[str, int]]  # (group key, layer channels per group channel)
    in_groups: list[tuple[str, int]]


class MacsModel:
    """Predicts per-sample MACs (the :func:`count_macs` convention) for any kept channel counts."""

    def __init__(self, model: nn.Module, groups: list[ChannelGroup], report: MacsReport):
        """``report``: :func:`count_macs` of ``model`` as it is now, on one sample."""
        self.total = report.total
        self.sizes = {group.key: group.size for group in groups}
        memberships: dict[str, dict[str, list]] = {}
        for group in groups:
            for member in group.members:
                entry = memberships.setdefault(member.name, {"out": [], "in": []})
                per_channel = max(1, member.indices.numel() // max(group.size, 1))
                side = "in" if member.role == "consumer" else "out"
                entry[side].append((group.key, per_channel))
        self.layers: list[_LayerCost] = []
        modelled = 0
        for name, module in model.named_modules():
            macs = report.per_layer.get(name or "(model)", 0)
            if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)) and macs:
                entry = memberships.get(name, {"out": [], "in": []})
                weight = module.weight
                if isinstance(module, nn.Linear):
                    out_channels, in_channels, per_pair, depthwise = module.out_features, module.in_features, 1.0, False
                else:
                    out_channels, in_channels = module.out_channels, module.in_channels
                    depthwise = module.groups > 1 and module.groups == module.in_channels
                    per_pair = weight.numel() / (out_channels * in_channels)
                self.layers.append(_LayerCost(name, macs / weight.numel(), "weights", out_channels, in_channels,
                                              per_pair, depthwise, entry["out"], entry["in"]))
                modelled += macs
            elif isinstance(module, nn.modules.batchnorm._BatchNorm) and macs:
                entry = memberships.get(name, {"out": [], "in": []})
                self.layers.append(_LayerCost(name, macs / module.num_features, "norm", module.num_features, 0, 0.0,
                                              False, entry["out"], []))
                modelled += macs
        self.fixed = self.total - modelled

    def predict(self, kept: dict[str, int]) -> float:
        """Per-sample MACs when group ``key`` keeps ``kept[key]`` channels (others keep all)."""
        removed = self.removed(kept)
        return float(self.fixed) + sum(self.layer_macs(layer, *self.layer_channels(layer, removed))
                                       for layer in self.layers)

    def removed(self, kept: dict[str, int]) -> dict[str, int]:
        """Channels each group loses when group ``key`` keeps ``kept[key]``."""
        return {key: size - kept.get(key, size) for key, size in self.sizes.items()}

    @staticmethod
    def layer_channels(layer: _LayerCost, removed: dict[str, int]) -> tuple[int, int]:
        """A layer's (input, output) channel counts after the groups lose ``removed`` channels (a
        depthwise conv's inputs follow its filters; a norm's input count is its channel count)."""
        out_channels = layer.out_channels - sum(removed[key] * n for key, n in layer.out_groups)
        if layer.kind == "norm":
            return out_channels, out_channels
        if layer.depthwise:
            return out_channels * layer.in_channels // layer.out_channels, out_channels
        return layer.in_channels - sum(removed[key] * n for key, n in layer.in_groups), out_channels

    @staticmethod
    def layer_macs(layer: _LayerCost, in_channels: int, out_channels: int) -> float:
        """Per-sample MACs of one layer at these channel counts."""
        if layer.kind == "norm":
            return layer.positions * out_channels
        if layer.depthwise:  # weights per filter unchanged
            return layer.positions * out_channels * layer.in_channels * layer.weight_per_pair
        return layer.positions * out_channels * in_channels * layer.weight_per_pair


def minimum_kept(original: int, min_channels: int | float) -> int:
    """At least one channel; ``min_channels`` >= 1 is a count, in (0, 1) a fraction of ``original``."""
    if min_channels >= 1:
        return max(1, min(original, int(min_channels)))
    return max(1, math.ceil(min_channels * original))


def round_kept(kept: int, current: int, round_to: int | None) -> int:
    """Round a channel count to a multiple of ``round_to`` (at least one multiple, at most ``current``)."""
    if not round_to or round_to <= 1:
        return kept
    rounded = max(round_to, int(round(kept / round_to)) * round_to)
    return current if rounded >= current else rounded


@dataclass(frozen=True)
class ChannelRounding:
    """Kept channel counts in multiples of ``multiple`` for groups that had at least ``min_group``
    channels before pruning (smaller groups keep exact counts: rounding them would remove all or none).
    A group narrower than twice the multiple uses half of it, halved again while needed but never
    below 8 (under multiples of 16 a 16-channel group keeps 8 or 16, instead of all of them)."""

    multiple: int = 1
    min_group: int = 0

    def multiple_for(self, original_size: int) -> int:
        """The multiple for a group of ``original_size`` channels before pruning (1: exact counts)."""
        if self.multiple <= 1 or original_size < self.min_group:
            return 1
        multiple = self.multiple
        while multiple // 2 >= 8 and original_size < 2 * multiple:
            multiple //= 2
        return multiple


def as_rounding(round_to: ChannelRounding | int | None) -> ChannelRounding:
    """``round_to`` as a :class:`ChannelRounding` (an int rounds every group; None rounds none)."""
    return round_to if isinstance(round_to, ChannelRounding) else ChannelRounding(int(round_to or 1))


def channel_step(group: ChannelGroup, round_to: ChannelRounding | int | None, original_size: int | None = None
                 ) -> int | None:
    """The multiple a group's kept count is rounded to: the rounding's multiple (where it applies to a
    group of ``original_size`` channels, default its size now) and the group's own constraint (the number
    of its GroupNorm blocks), whichever both divide; None = no rounding."""
    multiple = as_rounding(round_to).multiple_for(group.size if original_size is None else original_size)
    step = math.lcm(multiple, group.multiple)
    return step if step > 1 else None


def uniform_kept(groups: list[ChannelGroup], original: dict[str, int], fraction: float, round_to: int | None,
                 min_channels: int | float) -> dict[str, int]:
    """Every group keeps ``1 - fraction`` of its original channels (never more than it has now)."""
    kept = {}
    for group in groups:
        n0 = original.get(group.key, group.size)
        count = max(minimum_kept(n0, min_channels), n0 - int(round(fraction * n0)))
        kept[group.key] = min(group.size, round_kept(count, group.size, channel_step(group, round_to, n0)))
    return kept


def uniform_kept_for_macs(groups, original, macs_model: MacsModel, target_macs: float, round_to, min_channels
                          ) -> tuple[dict[str, int], float]:
    """Channel counts, and the uniform fraction, whose predicted MACs are <= ``target_macs``.

    The fraction is the smallest that reaches the target (bisection). With ``round_to``,
    rounding every group to its nearest multiple can overshoot far (a 16-channel group
    keeps 8 or 16), so counts are first rounded *up* from the exact uniform ones and then
    lowered, one multiple at a time, in the groups that are furthest above their uniform
    count, until the target is reached, then raised again where the target still holds: the
    result stays as uniform as the multiples allow and close to the target.
    """
    def fraction_reaching(rounding) -> float:
        if macs_model.predict(uniform_kept(groups, original, 0.0, rounding, min_channels)) <= target_macs:
            return 0.0
        low, high = 0.0, 1.0
        for _ in range(40):
            middle = 0.5 * (low + high)
            if macs_model.predict(uniform_kept(groups, original, middle, rounding, min_channels)) <= target_macs:
                high = middle
            else:
                low = middle
        return high

    fraction = fraction_reaching(None)
    exact = uniform_kept(groups, original, fraction, None, min_channels)
    steps = {group.key: channel_step(group, round_to, original.get(group.key, group.size)) or 1 for group in groups}
    if as_rounding(round_to).multiple <= 1:
        return exact, fraction  # (counts of groups with GroupNorm blocks are already multiples of them)
    sizes = {group.key: group.size for group in groups}
    floors = {key: max(steps[key], minimum_kept(original.get(key, sizes[key]), min_channels)) for key in sizes}
    kept = {key: min(sizes[key], -(-count // steps[key]) * steps[key]) for key, count in exact.items()}
    while macs_model.predict(kept) > target_macs:
        lowerable = [key for key in kept if kept[key] - steps[key] >= floors[key] and kept[key] % steps[key] == 0]
        if not lowerable:  # the multiples cannot reach the target this way: fall back to nearest rounding
            return uniform_kept(groups, original, fraction_reaching(round_to), round_to, min_channels), fraction
        key = max(lowerable, key=lambda k: (kept[k] / max(exact[k], 1), sizes[k]))
        kept[key] -= steps[key]
    return _raise_while_within(kept, exact, steps, sizes, macs_model, target_macs), fraction


def rounding_choices(groups, original, fraction: float, kept: dict[str, int], round_to, min_channels,
                     reach: int = 0) -> dict[str, tuple[int, ...]]:
    """Per group: the multiples from ``reach`` below the one just under its exact uniform count at
    ``fraction`` to ``reach`` above the one just over it (within its floor and its size now), and its
    count in ``kept``: the counts a latency-aware rounding may choose from
    (:mod:`~camphive.pruning.structured.latency_allocation`)."""
    exact = uniform_kept(groups, original, fraction, None, min_channels)
    choices = {}
    for group in groups:
        n0 = original.get(group.key, group.size)
        step = channel_step(group, round_to, n0) or 1
        floor = max(step, minimum_kept(n0, min_channels))
        below, above = exact[group.key] // step - reach, -(-exact[group.key] // step) + reach
        values = {min(group.size, multiple * step) for multiple in range(max(1, below), above + 1)}
        choices[group.key] = tuple(sorted({v for v in values if v >= floor} | {kept[group.key]}))
    return choices


def _raise_while_within(kept, exact, steps, sizes, macs_model: MacsModel, target_macs: float) -> dict[str, int]:
    """Give channels back, one multiple at a time, to the groups furthest below their uniform count,
    while the predicted MACs stay within the target: with coarse multiples the last lowering can
    overshoot far (resnet20 under multiples of 16 went to 2.9x for a 2x target)."""
    raised = True
    while raised:
        raised = False
        for key in sorted(kept, key=lambda k: (kept[k] / max(exact[k], 1), -sizes[k])):
            if kept[key] >= sizes[key]:
                continue
            previous, kept[key] = kept[key], min(sizes[key], kept[key] + steps[key])
            if macs_model.predict(kept) <= target_macs:
                raised = True
                break
            kept[key] = previous
    return kept


def _global_order(groups: list[ChannelGroup], scores: list[torch.Tensor]) -> list[tuple[float, str]]:
    """All channels by ascending score, each group's scores divided by their mean (as
    Torch-Pruning normalizes), so groups of different scales compare."""
    order = []
    for group, score in zip(groups, scores):
        mean = float(score.abs().mean()) or 1.0
        order.extend((float(s) / mean, group.key) for s in score)
    order.sort(key=lambda item: item[0])
    return order


def _global_counts(groups, original, order, count, round_to, min_channels) -> dict[str, int]:
    kept = {group.key: group.size for group in groups}
    floor = {group.key: minimum_kept(original.get(group.key, group.size), min_channels) for group in groups}
    removed = 0
    for _, key in order:
        if removed >= count:
            break
        if kept[key] > floor[key]:
            kept[key] -= 1
            removed += 1
    by_key = {group.key: group for group in groups}
    return {key: min(by_key[key].size, round_kept(value, by_key[key].size,
                                                                   channel_step(by_key[key], round_to, original.get(key))))
            for key, value in kept.items()}


def global_kept(groups, original, scores, remove_count: int, round_to, min_channels) -> dict[str, int]:
    """Remove the ``remove_count`` channels of lowest normalized score over all groups."""
    return _global_counts(groups, original, _global_order(groups, scores), remove_count, round_to, min_channels)


def global_kept_for_macs(groups, original, scores, macs_model: MacsModel, target_macs: float, round_to,
                         min_channels) -> dict[str, int]:
    """Remove lowest-score channels over all groups until predicted MACs <= ``target_macs``."""
    order = _global_order(groups, scores)
    low, high = 0, len(order)
    if macs_model.predict(_global_counts(groups, original, order, 0, round_to, min_channels)) <= target_macs:
        return _global_counts(groups, original, order, 0, round_to, min_channels)
    while low < high:  # smallest count reaching the target (MACs fall as count grows)
        middle = (low + high) // 2
        if macs_model.predict(_global_counts(groups, original, order, middle, round_to, min_channels)) <= target_macs:
            high = middle
        else:
            low = middle + 1
    return _global_counts(groups, original, order, low, round_to, min_channels)


def lowest_channels(score: torch.Tensor, count: int, blocks: torch.Tensor | None = None) -> torch.Tensor:
    """Indices of the ``count`` lowest-scoring channels (ties broken by index); with ``blocks``
    (a block id per channel), ``count / number of blocks`` from every block."""
    if count <= 0:
        return torch.zeros(0, dtype=torch.int64)
    if blocks is not None and int(blocks.max()) > 0:
        number = int(blocks.max()) + 1
        if count % number:
            raise ConfigError(f"cannot remove {count} channels evenly from {number} GroupNorm groups")
        chosen = [members[lowest_channels(score[members], count // number)]
                  for members in (torch.nonzero(blocks == b).flatten() for b in range(number))]
        return torch.cat(chosen).sort().values
    order = torch.argsort(score.double(), stable=True)
    return order[:count].sort().values


def check_targets(sparsity: float | None, target_macs_ratio: float | None) -> None:
    if (sparsity is None) == (target_macs_ratio is None):
        raise ConfigError("give exactly one of sparsity (fraction of channels, e.g. 0.5) or target_macs_ratio "
                          "(e.g. 2.0 for half the MACs)")
    if sparsity is not None and not 0.0 <= sparsity < 1.0:
        raise ConfigError(f"structured sparsity must be a fraction of channels in [0, 1), got {sparsity}")
    if target_macs_ratio is not None and not target_macs_ratio >= 1.0:
        raise ConfigError(f"target_macs_ratio must be >= 1 (2.0 halves the MACs), got {target_macs_ratio}")
