"""Latency-aware rounding: the choices, the search against brute force, and the option end to end."""
import itertools
import math

import pytest
import torch
from torch import nn

from camphive import models
from camphive.measure import count_macs
from camphive.pruning.structured.budget import ChannelRounding, MacsModel, rounding_choices, uniform_kept_for_macs
from camphive.pruning.structured.groups import build_dependency_graph, channel_groups
from camphive.pruning.structured.latency_allocation import latency_aware_kept
from camphive.pruning.structured.prune import prune_structured


class PaddedTimer:
    """A stand-in for LayerTimer: a layer costs its MACs with channels padded to multiples of ``pad``,
    plus a memory term per output channel and position, so that narrow layers are slow per MAC."""

    def __init__(self, macs_model: MacsModel, memory_weight: float = 1.0, pad: int = 32):
        self.layers = {layer.name: layer for layer in macs_model.layers}
        self.memory_weight, self.pad = memory_weight, pad
        self.measured: list = []
        self.timed_shapes, self.timing_seconds = 0, 0.0

    def measure(self, shapes) -> None:
        self.measured.extend(shapes)

    def seconds(self, name: str, in_channels: int, out_channels: int) -> float:
        layer = self.layers[name]
        padded_out = math.ceil(out_channels / self.pad) * self.pad
        if layer.kind == "norm":
            return layer.positions * padded_out
        padded_in = in_channels if layer.depthwise else math.ceil(in_channels / self.pad) * self.pad
        return layer.positions * (padded_in * padded_out * layer.weight_per_pair + self.memory_weight * padded_out)


def _three_stage_cnn() -> nn.Module:
    layers, width, channels = [], 1, (16, 32, 64)
    for stage, out in enumerate(channels):
        layers += [nn.Conv2d(width, out, 3, stride=1 if stage == 0 else 2, padding=1, bias=False), nn.BatchNorm2d(out),
                   nn.ReLU(), nn.Conv2d(out, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU()]
        width = out
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10)).eval()


def _setup(model: nn.Module, example: torch.Tensor, multiple: int = 16, ratio: float = 2.0):
    groups = channel_groups(model, build_dependency_graph(model, (example,)), [], {})
    macs_model = MacsModel(model, groups, count_macs(model, example))
    rounding = ChannelRounding(multiple, 16)
    target = macs_model.total / ratio
    kept, fraction = uniform_kept_for_macs(groups, {}, macs_model, target, rounding, 1)
    return groups, macs_model, rounding, target, kept, fraction


def test_rounding_choices_are_the_multiples_either_side_of_the_uniform_count_and_reach_further_on_request():
    model = _three_stage_cnn()
    groups, macs_model, rounding, target, kept, fraction = _setup(model, torch.randn(1, 1, 16, 16))
    original = {group.key: group.size for group in groups}
    exact = {key: size - int(round(fraction * size)) for key, size in original.items()}
    for reach in (0, 1):
        choices = rounding_choices(groups, original, fraction, kept, rounding, 1, reach=reach)
        for group in groups:
            step = 8 if group.size == 16 else 16  # the halving rule: 16-channel groups use multiples of 8
            low = (exact[group.key] // step - reach) * step
            high = (-(-exact[group.key] // step) + reach) * step
            expected = {min(group.size, v) for v in range(max(step, low), high + 1, step)} | {kept[group.key]}
            assert choices[group.key] == tuple(sorted(expected)), group.key
    wide = rounding_choices(groups, original, fraction, kept, rounding, 40, reach=1)  # every group keeps >= 40
    assert all(value >= min(40, original[key])
               for key, values in wide.items() for value in values if value != kept[key])
    assert any(len(values) > 1 for values in wide.values())


def test_search_ends_where_no_single_or_paired_change_is_faster_and_near_the_brute_force_best():
    model = _three_stage_cnn()
    groups, macs_model, rounding, target, kept, fraction = _setup(model, torch.randn(1, 1, 16, 16))
    choices = rounding_choices(groups, {}, fraction, kept, rounding, 1, reach=1)
    timer = PaddedTimer(macs_model)
    result = latency_aware_kept(kept, choices, macs_model, target, timer, band=0.05, margin=0.0)

    def seconds(allocation):
        removed = macs_model.removed(allocation)
        return sum(timer.seconds(layer.name, *macs_model.layer_channels(layer, removed))
                   for layer in macs_model.layers if layer.out_groups or layer.in_groups)

    keys = list(choices)
    feasible = [dict(zip(keys, values)) for values in itertools.product(*(choices[key] for key in keys))
                if 0.95 * target <= macs_model.predict(dict(zip(keys, values))) <= target]
    fastest = min(feasible, key=seconds)
    assert 0.95 * target <= macs_model.predict(result.kept) <= target
    assert result.seconds == pytest.approx(seconds(result.kept))
    assert result.uniform_seconds == pytest.approx(seconds(kept))
    assert seconds(fastest) < 0.97 * seconds(kept)  # the case is not trivial: the uniform mix is slower
    assert seconds(result.kept) < 0.95 * seconds(kept) and seconds(result.kept) <= 1.03 * seconds(fastest)
    for first, second in itertools.combinations_with_replacement(keys, 2):  # a local optimum of the search's moves
        for a, b in itertools.product(choices[first], choices[second]):
            trial = {**result.kept, first: a, second: b} if first != second else {**result.kept, first: a}
            if 0.95 * target <= macs_model.predict(trial) <= target:
                assert seconds(trial) >= seconds(result.kept) * (1 - 1e-3)
    assert all(result.kept[key] in choices[key] for key in keys)
    # every shape the search could meet was measured first
    assert {(name, i, o) for name, i, o in timer.measured} >= {
        (layer.name, *macs_model.layer_channels(layer, macs_model.removed(result.kept)))
        for layer in macs_model.layers if layer.out_groups or layer.in_groups}


def test_search_keeps_the_uniform_mix_unless_it_saves_more_than_the_margin():
    model = _three_stage_cnn()
    groups, macs_model, rounding, target, kept, fraction = _setup(model, torch.randn(1, 1, 16, 16))
    choices = rounding_choices(groups, {}, fraction, kept, rounding, 1, reach=1)
    free = latency_aware_kept(kept, choices, macs_model, target, PaddedTimer(macs_model), band=0.05, margin=0.0)
    saved = 1 - free.seconds / free.uniform_seconds
    held = latency_aware_kept(kept, choices, macs_model, target, PaddedTimer(macs_model), band=0.05,
                              margin=saved + 0.01)
    assert held.kept == kept and held.changed_groups == 0 and held.seconds == held.uniform_seconds
    assert free.changed_groups > 0 and free.describe()["predicted_speedup_over_uniform"] > 1


def test_resnet20_moves_channels_to_its_late_stage_when_memory_traffic_makes_early_layers_slow_per_mac():
    model = models.create("resnet20", num_classes=10).eval()
    groups, macs_model, rounding, target, kept, fraction = _setup(model, torch.randn(1, 3, 32, 32))
    choices = rounding_choices(groups, {}, fraction, kept, rounding, 1, reach=1)
    timer = PaddedTimer(macs_model, memory_weight=100.0, pad=1)  # no padding: only memory traffic differs
    result = latency_aware_kept(kept, choices, macs_model, target, timer, band=0.05)
    assert 0.95 * target <= macs_model.predict(result.kept) <= target
    assert result.seconds < 0.99 * result.uniform_seconds
    stage3 = [key for key in kept if key.startswith("layer3")]
    stage1 = [key for key in kept if key.startswith("layer1") or key.startswith("conv1")]
    assert sum(result.kept[k] for k in stage3) > sum(kept[k] for k in stage3)
    assert sum(result.kept[k] for k in stage1) <= sum(kept[k] for k in stage1)


def test_latency_aware_prune_times_layers_and_reaches_the_target():
    torch.manual_seed(0)
    model = _three_stage_cnn()
    data = [(torch.randn(8, 1, 16, 16), torch.randint(0, 10, (8,)))]
    result = prune_structured(model, data, target_macs_ratio=2.0, criterion="magnitude", measure_latency=False,
                              round_to=16, latency_aware=True, latency_seconds=0.05, latency_batch_sizes=(4,))
    allocation = result.extra["latency_allocation"]
    assert result.extra["target_reached"] and result.extra["macs_ratio"] >= 2.0
    assert allocation["timed_shapes"] > 0 and allocation["kept_uniform_because"] is None
    assert allocation["runtime"] == "torch"
    assert allocation["predicted_speedup_over_uniform"] >= 1.0
    assert result.config["latency_aware"] is True
    assert model(torch.randn(2, 1, 16, 16)).shape == (2, 10)


def test_latency_reach_widens_the_choices_the_prune_searches(monkeypatch):
    import camphive.pruning.structured.prune as structured_prune

    seen = []

    def recording(*args, **kwargs):
        choices = rounding_choices(*args, **kwargs)
        seen.append((kwargs.get("reach"), choices))
        return choices

    monkeypatch.setattr(structured_prune, "rounding_choices", recording)
    data = [(torch.randn(8, 1, 16, 16), torch.randint(0, 10, (8,)))]
    counts = {}
    for reach in (0, 1):
        model = _three_stage_cnn()
        result = prune_structured(model, data, target_macs_ratio=2.0, criterion="magnitude", measure_latency=False,
                                  round_to=16, latency_reach=reach, latency_seconds=0.05, latency_batch_sizes=(4,))
        assert result.extra["target_reached"] and result.config["latency_reach"] == reach
        counts[reach] = {key: len(values) for key, values in seen[-1][1].items()}
    assert [reach for reach, _ in seen] == [0, 1]
    assert all(counts[1][key] >= counts[0][key] for key in counts[0])
    assert sum(counts[1].values()) > sum(counts[0].values())


def test_latency_runtime_reaches_the_layer_timer_and_unknown_runtimes_are_refused(monkeypatch):
    import camphive.pruning.structured.prune as structured_prune
    from camphive.errors import ConfigError
    from camphive.pruning.structured.settings import StructuredSettings

    runtimes = []

    class Recording(structured_prune.LayerTimer):
        def __init__(self, *args, **kwargs):
            runtimes.append(kwargs.get("runtime"))
            super().__init__(*args, **{**kwargs, "runtime": "torch"})  # timed in PyTorch: only the hand-over is tested

    monkeypatch.setattr(structured_prune, "LayerTimer", Recording)
    data = [(torch.randn(8, 1, 16, 16), torch.randint(0, 10, (8,)))]
    result = prune_structured(_three_stage_cnn(), data, target_macs_ratio=2.0, criterion="magnitude",
                              measure_latency=False, round_to=16, latency_runtime="onnxruntime", latency_seconds=0.05,
                              latency_batch_sizes=(4,))
    assert runtimes == ["onnxruntime"] and result.config["latency_runtime"] == "onnxruntime"
    with pytest.raises(ConfigError, match="unknown latency_runtime 'tvm'; use one of torch, onnxruntime"):
        StructuredSettings(target_macs_ratio=2.0, latency_runtime="tvm")


def test_latency_reach_must_not_be_negative():
    from camphive.errors import ConfigError
    from camphive.pruning.structured.settings import StructuredSettings

    with pytest.raises(ConfigError, match="latency_reach must be"):
        StructuredSettings(target_macs_ratio=2.0, latency_reach=-1)


def test_latency_aware_is_not_used_without_a_macs_target_or_without_rounding():
    data = [(torch.randn(8, 1, 16, 16), torch.randint(0, 10, (8,)))]
    for options in ({"sparsity": 0.5}, {"target_macs_ratio": 2.0, "round_to": 1}):
        result = prune_structured(_three_stage_cnn(), data, criterion="magnitude", measure_latency=False,
                                  latency_aware=True, **options)
        assert result.extra["latency_allocation"] is None


def test_bringing_macs_into_the_band_removes_the_slowest_macs_first():
    from camphive.pruning.structured.latency_allocation import _Costs, _into_band

    model = _three_stage_cnn()
    groups, macs_model, rounding, target, kept, fraction = _setup(model, torch.randn(1, 1, 16, 16))
    choices = rounding_choices(groups, {}, fraction, kept, rounding, 1, reach=1)
    timer = PaddedTimer(macs_model, memory_weight=100.0, pad=1)
    start = {key: max(values) for key, values in choices.items()}  # every group at its widest: too many MACs
    costs = _Costs(macs_model, timer, start)
    assert costs.macs > target
    rates = {}
    for key, values in choices.items():
        for value in values:
            macs, seconds = costs.change({key: value})
            if macs < costs.macs:
                rates[(key, value)] = (seconds - costs.seconds) / (costs.macs - macs)
    applied = []
    original_apply = costs.apply
    costs.apply = lambda changes: (applied.append(changes), original_apply(changes))
    _into_band(costs, choices, list(choices), 0.9 * target, target)
    first_key, first_value = min(rates, key=rates.get)  # the most time saved per MAC removed
    assert applied[0] == {first_key: first_value}
    assert 0.9 * target <= costs.macs <= target
