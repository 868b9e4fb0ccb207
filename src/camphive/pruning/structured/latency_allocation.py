"""Round each group up or down by measured speed: the uniform allocation, made fast on this machine.

With channel counts rounded to multiples (:func:`~camphive.pruning.structured.budget.
uniform_kept_for_macs`), every group keeps the multiple just below or just above its uniform
count, and the mix is chosen by MACs alone. Mixes with the same MACs differ in speed: kernels
pad channel counts to the vector width, and narrow layers at high resolution are bound by
memory traffic, not arithmetic. So this module times the layers at each candidate shape
(:class:`~camphive.measure.layer_timing.LayerTimer`) and searches the choices
(:func:`~camphive.pruning.structured.budget.rounding_choices`) for the mix of lowest predicted
latency whose MACs stay within the target and no more than ``band`` below it; it keeps the
uniform mix unless the best saves more than ``margin`` of its predicted latency, so timing
noise does not move channels for nothing. With the choices one multiple either side of the
uniform count (the default), accuracy stays that of the uniform mix (benchmarks/structured.py);
wider choices buy more speed and lose accuracy right after pruning.
"""
from __future__ import annotations

import itertools
import logging
import math
import time
from dataclasses import dataclass

from camphive.measure.layer_timing import LayerTimer
from camphive.pruning.structured.budget import MacsModel

log = logging.getLogger("camphive.pruning")

MAX_SHAPES_PER_LAYER = 64  # a layer reading more combinations of groups is left to the uniform mix


@dataclass
class LatencyAllocation:
    """What the search did: the kept counts, and the predicted cost of the uniform mix and of them."""

    kept: dict[str, int]
    uniform_seconds: float  # predicted seconds per sample of the uniform mix's timed layers
    seconds: float  # the same for ``kept``
    changed_groups: int
    timed_shapes: int
    timing_seconds: float
    search_seconds: float
    reason: str | None = None  # why the uniform mix was kept as it was, if it was

    def describe(self) -> dict:
        return {"predicted_speedup_over_uniform": self.uniform_seconds / self.seconds if self.seconds else 1.0,
                "changed_groups": self.changed_groups, "timed_shapes": self.timed_shapes,
                "timing_seconds": round(self.timing_seconds, 3), "search_seconds": round(self.search_seconds, 3),
                "kept_uniform_because": self.reason}


class _Costs:
    """Per-layer MACs and predicted seconds of an allocation, updated one group change at a time."""

    def __init__(self, macs_model: MacsModel, timer: LayerTimer, kept: dict[str, int]):
        self.macs_model, self.timer = macs_model, timer
        self.layers = [layer for layer in macs_model.layers if layer.out_groups or layer.in_groups]
        self.touching: dict[str, list[int]] = {}
        for index, layer in enumerate(self.layers):
            for key, _ in layer.out_groups + layer.in_groups:
                self.touching.setdefault(key, []).append(index)
        self.kept = dict(kept)
        self.per_layer = [self._layer(index, self.kept) for index in range(len(self.layers))]
        self.macs = macs_model.predict(self.kept)
        self.seconds = sum(seconds for _, seconds in self.per_layer)

    def _layer(self, index: int, kept: dict[str, int]) -> tuple[float, float]:
        layer = self.layers[index]
        channels = self.macs_model.layer_channels(layer, self.macs_model.removed(kept))
        return self.macs_model.layer_macs(layer, *channels), self.timer.seconds(layer.name, *channels)

    def change(self, changes: dict[str, int]) -> tuple[float, float]:
        """(MACs, seconds) of the allocation with ``changes`` applied (nothing is changed)."""
        trial = {**self.kept, **changes}
        indices = sorted({index for key in changes for index in self.touching.get(key, [])})
        macs, seconds = self.macs, self.seconds
        for index in indices:
            new_macs, new_seconds = self._layer(index, trial)
            macs += new_macs - self.per_layer[index][0]
            seconds += new_seconds - self.per_layer[index][1]
        return macs, seconds

    def apply(self, changes: dict[str, int]) -> None:
        self.kept.update(changes)
        for index in {index for key in changes for index in self.touching.get(key, [])}:
            self.per_layer[index] = self._layer(index, self.kept)
        self.macs = self.macs_model.predict(self.kept)
        self.seconds = sum(seconds for _, seconds in self.per_layer)


def _possible_shapes(macs_model: MacsModel, kept: dict[str, int], choices: dict[str, tuple[int, ...]]
                     ) -> list[tuple[str, int, int]] | None:
    """Every (layer, in, out) the choices can give; None if a layer would have too many."""
    shapes = []
    for layer in macs_model.layers:
        keys = sorted({key for key, _ in layer.out_groups + layer.in_groups})
        if not keys:
            continue
        if math.prod(len(choices.get(key, (0,))) for key in keys) > MAX_SHAPES_PER_LAYER:
            return None
        for values in itertools.product(*(choices.get(key, (kept[key],)) for key in keys)):
            trial = {**kept, **dict(zip(keys, values))}
            shapes.append((layer.name, *macs_model.layer_channels(layer, macs_model.removed(trial))))
    return shapes


def latency_aware_kept(kept: dict[str, int], choices: dict[str, tuple[int, ...]], macs_model: MacsModel,
                       target_macs: float, timer: LayerTimer, band: float = 0.02, margin: float = 0.01
                       ) -> LatencyAllocation:
    """The counts among ``choices`` (per group) of lowest predicted latency with MACs in
    ``[(1 - band) * target_macs, target_macs]``; ``kept`` (the uniform mix) unless one saves more
    than ``margin`` of its predicted latency.

    Moving time between stages needs many groups to move together (with wider choices, resnet20's
    fastest mix at 2x narrows stages 1-2 and widens all of stage 3), which single or paired
    changes do not find one at a time. So the search first prices a MAC: for each of a range of
    weights ``w`` it descends, one group at a time, on ``seconds - w * MACs`` from the uniform mix,
    brings the result into the band, and keeps the fastest; then it polishes that with single and
    paired changes while they save time within the band.
    """
    started = time.perf_counter()
    shapes = _possible_shapes(macs_model, kept, choices)
    if shapes is None:
        return LatencyAllocation(dict(kept), 0.0, 0.0, 0, 0, 0.0, 0.0,
                                 f"a layer reads more than {MAX_SHAPES_PER_LAYER} combinations of channel groups")
    log.info("timing %d layer shapes for a latency-aware channel allocation", len(set(shapes)))
    timer.measure(shapes)
    uniform = _Costs(macs_model, timer, kept)
    lowest = (1.0 - band) * target_macs
    movable = [key for key, values in choices.items() if len(values) > 1]
    best = _Costs(macs_model, timer, kept)
    for weight in PRICE_GRID:
        costs = _Costs(macs_model, timer, kept)
        _descend(costs, choices, movable, weight * uniform.seconds / max(uniform.macs, 1.0))
        _into_band(costs, choices, movable, lowest, target_macs)
        if lowest <= costs.macs <= target_macs and costs.seconds < best.seconds:
            best = costs
    _polish(best, choices, movable, lowest, target_macs)
    if best.seconds > uniform.seconds * (1.0 - margin):
        best = uniform
    changed = sum(best.kept[key] != kept[key] for key in kept)
    return LatencyAllocation(dict(best.kept), uniform.seconds, best.seconds, changed, timer.timed_shapes,
                             timer.timing_seconds, time.perf_counter() - started)


PRICE_GRID = tuple(2.0 ** (k / 4) for k in range(-8, 13))  # a MAC worth 1/4 to 8 times the uniform mix's rate


def _single_moves(kept: dict[str, int], choices: dict[str, tuple[int, ...]], movable: list[str]):
    for key in movable:
        for value in choices[key]:
            if value != kept[key]:
                yield {key: value}


def _descend(costs: _Costs, choices, movable, weight: float) -> None:
    """Change one group at a time while ``seconds - weight * MACs`` falls."""
    improved = True
    while improved:
        improved = False
        for changes in _single_moves(costs.kept, choices, movable):
            macs, seconds = costs.change(changes)
            if seconds - weight * macs < costs.seconds - weight * costs.macs - 1e-12 * costs.seconds:
                costs.apply(changes)
                improved = True


def _into_band(costs: _Costs, choices, movable, lowest: float, highest: float) -> None:
    """Lower (or raise) groups until the MACs are in ``[lowest, highest]``, each time by the change
    that saves the most time per MAC removed (adds the least per MAC added)."""
    for _ in range(sum(len(values) for values in choices.values())):
        if lowest <= costs.macs <= highest:
            return
        too_many = costs.macs > highest
        best, best_rate = None, math.inf
        for changes in _single_moves(costs.kept, choices, movable):
            macs, seconds = costs.change(changes)
            if (macs < costs.macs) != too_many or macs == costs.macs:
                continue
            rate = (seconds - costs.seconds) / abs(macs - costs.macs)  # seconds per MAC moved: lowest is best
            if rate < best_rate:
                best, best_rate = changes, rate
        if best is None:
            return
        costs.apply(best)


def _polish(costs: _Costs, choices, movable, lowest: float, highest: float) -> None:
    """Take the fastest single or paired change within the band while one saves time."""
    while True:
        best, best_seconds = None, costs.seconds * (1.0 - 1e-3)
        for changes in _moves(costs.kept, choices, movable):
            macs, seconds = costs.change(changes)
            if seconds < best_seconds and lowest <= macs <= highest:
                best, best_seconds = changes, seconds
        if best is None:
            return
        costs.apply(best)


def _moves(kept: dict[str, int], choices: dict[str, tuple[int, ...]], movable: list[str]):
    """Every change of one group to another of its choices, and of two groups, one up and one down."""
    yield from _single_moves(kept, choices, movable)
    for first, second in itertools.combinations(movable, 2):
        for up in (v for v in choices[first] if v > kept[first]):
            for down in (v for v in choices[second] if v < kept[second]):
                yield {first: up, second: down}
        for down in (v for v in choices[first] if v < kept[first]):
            for up in (v for v in choices[second] if v > kept[second]):
                yield {first: down, second: up}
