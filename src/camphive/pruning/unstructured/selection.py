"""Which weights to prune: sparsity schedules and score thresholds with per-layer (or per-unit) floors.

Selections: ``"global"`` compares scores over all layers; ``"layer"`` prunes each layer to the
target; ``"unit"`` prunes each output unit (row of the weight viewed as ``(out_units, fan_in)``)
to the target fraction of its own entries, comparing scores only within the unit (Wanda's
comparison group).
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from camphive.errors import ConfigError

SCHEDULES = ("linear", "cubic", "constant")
SELECTIONS = ("global", "layer", "unit")


def cycle_targets(sparsity: float, cycles: int, schedule: str = "linear") -> list[float]:
    """Target sparsity after each of ``cycles`` cycles, ending exactly at ``sparsity``.

    ``linear``: s * t / T. ``cubic`` (Zhu & Gupta 2017): s * (1 - (1 - t / T)^3), which
    prunes most in the first cycles, while the network is still dense and redundant.
    ``constant``: the full target in every cycle (later cycles only re-merge with fresh
    curvature).
    """
    if cycles < 1:
        raise ConfigError(f"cycles must be >= 1, got {cycles}")
    if schedule not in SCHEDULES:
        raise ConfigError(f"unknown schedule {schedule!r}; use one of {', '.join(SCHEDULES)}")
    targets = []
    for t in range(1, cycles + 1):
        fraction = t / cycles
        if schedule == "linear":
            targets.append(sparsity * fraction)
        elif schedule == "cubic":
            targets.append(sparsity * (1.0 - (1.0 - fraction) ** 3))
        else:
            targets.append(sparsity)
    targets[-1] = sparsity
    return targets


def check_sparsity(sparsity: float) -> None:
    if not isinstance(sparsity, (int, float)) or math.isnan(sparsity) or not 0.0 <= sparsity < 1.0:
        raise ConfigError(f"sparsity must be in [0, 1), got {sparsity}; e.g. 0.9 prunes 90% of the weights")


def keep_floor(numel: int, min_keep: float | int) -> int:
    """Entries a layer always keeps: a fraction of it (``min_keep < 1``) or a count, at least 1."""
    if min_keep < 0:
        raise ConfigError(f"min_keep must be >= 0, got {min_keep}")
    count = math.ceil(min_keep * numel) if min_keep < 1 else int(min_keep)
    return max(1, min(count, numel))


def check_target_reachable(alive: Mapping[str, torch.Tensor], target_sparsity: float, selection: str = "global",
                           min_keep: float | int = 0.01) -> None:
    """Refuse a sparsity the layers' floors (``min_keep``) cannot allow, from the masks ``alive``
    now: called before the first cycle, so a run never stops half-way for it."""
    if selection not in SELECTIONS:
        raise ConfigError(f"unknown selection {selection!r}; use global, layer or unit")
    check_sparsity(target_sparsity)
    if selection == "unit":
        _check_units_reachable(alive, target_sparsity, min_keep)
        return
    floors = {name: keep_floor(mask.numel(), min_keep) for name, mask in alive.items()}
    prunable_now = {name: int(mask.sum()) - floors[name] for name, mask in alive.items()}
    if selection == "layer":
        for name, mask in alive.items():
            wanted = round(target_sparsity * mask.numel()) - (mask.numel() - int(mask.sum()))
            if wanted > prunable_now[name]:
                raise ConfigError(
                    f"sparsity {target_sparsity:.4f} would leave layer {name!r} fewer than {floors[name]} weights; "
                    "lower the sparsity or min_keep"
                )
        return
    total = sum(mask.numel() for mask in alive.values())
    already = sum(mask.numel() - int(mask.sum()) for mask in alive.values())
    capacity = sum(max(count, 0) for count in prunable_now.values())
    if round(target_sparsity * total) - already > capacity:
        raise ConfigError(
            f"sparsity {target_sparsity:.4f} would empty a layer: only {capacity + already} of {total} weights can be "
            f"pruned while every layer keeps its floor (min_keep={min_keep}); lower the sparsity or min_keep"
        )


def select_to_prune(
    scores: Mapping[str, torch.Tensor],
    alive: Mapping[str, torch.Tensor],
    target_sparsity: float,
    selection: str = "global",
    min_keep: float | int = 0.01,
) -> dict[str, torch.Tensor]:
    """Return ``{name: bool tensor}`` of alive entries to prune now, lowest scores first.

    After pruning, exactly ``round(target_sparsity * total)`` entries are pruned in all (or
    in each layer with ``selection="layer"``), where total counts every entry of the masked
    parameters, already pruned ones included. Each layer keeps at least
    ``keep_floor(numel, min_keep)`` entries; a target that cannot respect the floors is an
    error, not a silent shortfall. Ties are broken by position, so the result is exact.
    ``selection="unit"``: see :func:`unit_rank_scores`; the global count is exact too.
    """
    check_target_reachable(alive, target_sparsity, selection, min_keep)
    if selection == "unit":
        rank_scores = {name: unit_rank_scores(scores[name], alive[name], min_keep) for name in alive}
        return select_to_prune(rank_scores, alive, target_sparsity, "global", 0)
    names = list(alive)
    floors = {name: keep_floor(alive[name].numel(), min_keep) for name in names}
    if selection == "layer":
        chosen = {}
        for name in names:
            total = alive[name].numel()
            wanted = round(target_sparsity * total) - (total - int(alive[name].sum()))
            chosen[name] = _lowest(scores[name], alive[name], max(wanted, 0))
        return chosen
    total = sum(alive[name].numel() for name in names)
    already = sum(alive[name].numel() - int(alive[name].sum()) for name in names)
    wanted = round(target_sparsity * total) - already
    if wanted <= 0:
        return {name: torch.zeros_like(alive[name]) for name in names}
    # Protect each layer's floor (its highest-scoring alive entries), then take the lowest globally.
    candidates = []
    for name in names:
        score = scores[name].detach().flatten().double().clone()
        live = alive[name].flatten()
        score[~live] = math.inf
        score[_first_in_order(score.masked_fill(~live, -math.inf), floors[name], largest=True)] = math.inf
        candidates.append(score)
    picked = _first_in_order(torch.cat(candidates), wanted)
    chosen, offset = {}, 0
    for name in names:
        size = alive[name].numel()
        chosen[name] = picked[offset : offset + size].view_as(alive[name]).to(alive[name].device)
        offset += size
    return chosen


def _first_in_order(values: torch.Tensor, count: int, largest: bool = False) -> torch.Tensor:
    """Bool mask of the ``count`` entries a stable sort of the 1-D ``values`` puts first (ascending, or descending
    with ``largest``; ties by position). In linear time: all entries beyond the count-th value, then the
    first of those equal to it, by position."""
    picked = torch.zeros(values.numel(), dtype=torch.bool, device=values.device)
    if count <= 0:
        return picked
    ranked = -values if largest else values
    threshold = torch.kthvalue(ranked.cpu(), min(count, values.numel())).values.to(values.device)
    picked |= ranked < threshold
    ties = (ranked == threshold).nonzero().flatten()
    picked[ties[: count - int(picked.sum())]] = True
    return picked


def _lowest(score: torch.Tensor, alive: torch.Tensor, count: int) -> torch.Tensor:
    flat = score.detach().flatten().double().clone()
    flat[~alive.flatten()] = math.inf
    return _first_in_order(flat, count).view_as(alive)


def _unit_rows(tensor: torch.Tensor) -> torch.Tensor:
    """``(out_units, fan_in)``: a weight's output units as rows (a 1-D tensor is one unit)."""
    return tensor.reshape(tensor.shape[0] if tensor.ndim > 1 else 1, -1)


def unit_rank_scores(score: torch.Tensor, alive: torch.Tensor, min_keep: float | int = 0.01) -> torch.Tensor:
    """Scores that make a global selection prune every output unit to the same fraction of its entries.

    Within each unit (row of ``(out_units, fan_in)``) the alive entries are ranked by ``score``,
    lowest first (ties by position); the k-th of them gets ``(dead + k + 1/2) / fan_in``, the
    fraction of the unit pruned once it goes (``dead``: the unit's entries already pruned). So a
    global selection of the lowest of these takes from every unit in turn, its lowest scores first,
    until all units reach the same fraction (to within one entry). Each unit's
    ``keep_floor(fan_in, min_keep)`` highest-scoring alive entries, and the dead ones, get ``inf``:
    never chosen. Returns float64 of ``score``'s shape.
    """
    rows, live = _unit_rows(score.detach()).double(), _unit_rows(alive)
    fan_in = rows.shape[1]
    by_score = torch.sort(rows, dim=1, stable=True).indices
    dead_last = torch.sort((~live).gather(1, by_score).to(torch.uint8), dim=1, stable=True).indices
    order = by_score.gather(1, dead_last)  # alive entries by ascending score, then the dead ones
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(fan_in, device=order.device).expand_as(order))
    alive_count = live.sum(1, keepdim=True)
    dead = fan_in - alive_count
    ranked = (dead + rank + 0.5).double() / fan_in
    ranked[rank >= alive_count - keep_floor(fan_in, min_keep)] = math.inf
    return ranked.reshape(score.shape)


def _check_units_reachable(alive: Mapping[str, torch.Tensor], target_sparsity: float, min_keep: float | int) -> None:
    total = sum(mask.numel() for mask in alive.values())
    already = sum(mask.numel() - int(mask.sum()) for mask in alive.values())
    capacity = 0
    for mask in alive.values():
        units = _unit_rows(mask)
        capacity += int((units.sum(1) - keep_floor(units.shape[1], min_keep)).clamp_min(0).sum())
    if round(target_sparsity * total) - already > capacity:
        raise ConfigError(
            f"sparsity {target_sparsity:.4f} would empty an output unit: only {capacity + already} of {total} weights "
            f"can be pruned while every unit keeps its floor (min_keep={min_keep}); lower the sparsity or min_keep, "
            "or use selection='global'"
        )
