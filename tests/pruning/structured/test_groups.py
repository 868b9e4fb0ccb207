"""Channel groups from Torch-Pruning's dependency graph, channel scores and the MACs model."""
import pytest
import torch
import torch_pruning as tp
from torch import nn

from camphive import models
from camphive.errors import ConfigError
from camphive.measure import count_macs
from camphive.pruning.core.calibration import CalibrationInfo
from camphive.pruning.criteria import make_criterion
from camphive.pruning.structured.budget import (
    ChannelRounding,
    MacsModel,
    channel_step,
    round_kept,
    uniform_kept,
    uniform_kept_for_macs,
)
from camphive.pruning.structured.groups import (
    build_dependency_graph,
    channel_groups,
    remove_channels,
    resolve_ignored,
    weight_scores_to_channels,
)
from camphive.pruning.structured.prune import prune_structured


def _groups(model, example):
    graph = build_dependency_graph(model, example)
    return graph, {group.key: group for group in channel_groups(model, graph)}


def test_small_cnn_groups_hold_producer_norm_and_consumer():
    model = models.create("small-cnn", in_channels=1)
    _, groups = _groups(model, torch.randn(1, 1, 28, 28))
    assert set(groups) == {"conv1", "conv2", "conv3", "fc1"}  # fc2's outputs are the model's outputs
    conv3 = groups["conv3"]
    roles = {(m.name, m.role) for m in conv3.members}
    assert roles == {("conv3", "producer"), ("bn3", "norm"), ("fc1", "consumer")}
    (fc1,) = conv3.consumers
    columns = fc1.columns(conv3.size)
    assert columns.shape == (128, 9) and torch.equal(columns[5], torch.arange(45, 54))  # channel-major flatten


def test_residual_stream_is_one_group_with_every_partner():
    model = models.create("resnet20")
    _, groups = _groups(model, torch.randn(1, 3, 32, 32))
    (stream,) = [g for g in groups.values() if "layer1.0.conv2" in g.key]
    producers = {m.name for m in stream.by_role("producer")}
    consumers = {m.name for m in stream.consumers}
    assert producers == {"conv1", "layer1.0.conv2", "layer1.1.conv2", "layer1.2.conv2"}
    assert consumers == {"layer1.0.conv1", "layer1.1.conv1", "layer1.2.conv1", "layer2.0.conv1",
                         "layer2.0.downsample.0"}


def test_residual_coupled_channels_are_removed_together():
    model = models.create("resnet20")
    norms = ["bn1", "layer1.0.bn2", "layer1.1.bn2", "layer1.2.bn2"]
    with torch.no_grad():  # tag each BN channel with its index to see which channels survive
        for name in norms:
            model.get_submodule(name).bias.copy_(torch.arange(16.0))
    data = [(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,)))]
    prune_structured(model, data, 0.5, criterion="random", seed=3, measure_latency=False)
    survivors = [model.get_submodule(name).bias.detach() for name in norms]
    assert survivors[0].numel() == 8 and all(torch.equal(s, survivors[0]) for s in survivors)
    assert not torch.equal(survivors[0], torch.arange(8.0))  # random picked, not the first 8
    assert model.layer2[0].conv1.in_channels == model.layer2[0].downsample[0].in_channels == 8


def test_depthwise_filters_go_with_their_expansion_channels():
    model = models.create("mobilenetv2")
    _, groups = _groups(model, torch.randn(1, 3, 32, 32))
    (group,) = [g for g in groups.values() if "features.2.depthwise.conv" in g.key]
    roles = {m.name: m.role for m in group.members}
    assert roles["features.2.expand.conv"] == "producer" and roles["features.2.depthwise.conv"] == "depthwise"
    assert roles["features.2.project"] == "consumer"


def test_ignored_layers_and_classifier_keep_their_outputs():
    model = models.create("small-cnn", in_channels=1)
    data = [(torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,)))]
    prune_structured(model, data, 0.5, criterion="magnitude", ignored_layers=["conv1"], measure_latency=False)
    assert model.conv1.out_channels == 32 and model.conv2.out_channels == 32 and model.fc1.out_features == 128
    assert model.fc2.out_features == 10
    with pytest.raises(ConfigError, match="not a module"):
        resolve_ignored(model, ["conv9"])


def test_summed_scores_add_producer_rows_and_consumer_columns():
    model = models.create("small-cnn", in_channels=1)
    _, groups = _groups(model, torch.randn(1, 1, 28, 28))
    scores = {name: p.detach().abs() for name, p in model.named_parameters() if name.endswith("weight") and p.dim() > 1}
    conv3 = weight_scores_to_channels(groups["conv3"], scores)
    expected = model.conv3.weight.abs().sum((1, 2, 3)) + model.fc1.weight.abs().reshape(256, 128, 9).sum((0, 2))
    assert torch.allclose(conv3, expected.double(), rtol=1e-6)


def test_depthwise_scores_count_the_filter_of_each_channel():
    model = nn.Sequential(nn.Conv2d(2, 4, 1), nn.ReLU(), nn.Conv2d(4, 4, 3, groups=4), nn.ReLU(), nn.Conv2d(4, 3, 1))
    graph = build_dependency_graph(model, torch.randn(1, 2, 6, 6))
    (group, ) = [g for g in channel_groups(model, graph) if g.size == 4 and "0" in g.key]
    scores = {f"{i}.weight": model[i].weight.detach().abs() for i in (0, 2, 4)}
    expected = model[0].weight.abs().sum((1, 2, 3)) + model[2].weight.abs().sum((1, 2, 3)) \
        + model[4].weight.abs().sum((0, 2, 3))
    assert torch.allclose(weight_scores_to_channels(group, scores), expected.double(), rtol=1e-6)


def test_tp_magnitude_is_torch_pruning_group_importance():
    model = models.create("resnet20")
    _, groups = _groups(model, torch.randn(1, 3, 32, 32))
    group = next(iter(groups.values()))
    ours = make_criterion("tp-magnitude").channel_scores([group], CalibrationInfo(model, [], {}))[0]
    theirs = tp.importance.GroupMagnitudeImportance(p=2)(group.tp_group)
    assert torch.allclose(ours, theirs.double())


def test_tp_hessian_uses_mean_squared_sample_gradients():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    x, y = torch.randn(5, 3), torch.randint(0, 2, (5,))
    graph = build_dependency_graph(model, x[:1])
    (group,) = channel_groups(model, graph)
    ours = make_criterion("tp-hessian").channel_scores([group], CalibrationInfo(model, [(x, y)], {}))[0]
    assert all(p.grad is None for p in model.parameters())  # scoring leaves no gradients behind
    squares = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    for i in range(5):  # the reference: per-sample gradients, one backward each
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        for name, p in model.named_parameters():
            squares[name] += p.grad**2 / 5
    hidden = (model[0].weight**2 * squares["0.weight"]).sum(1) + (model[2].weight**2 * squares["2.weight"]).sum(0)
    expected = hidden / 2
    assert torch.allclose(ours, (expected / expected.mean()).double(), rtol=1e-5)  # Torch-Pruning's mean reduction


def test_macs_model_predicts_the_pruned_count_exactly():
    model = models.create("mobilenetv2")
    example = torch.randn(1, 3, 32, 32)
    graph, by_key = _groups(model, example)
    groups = list(by_key.values())
    kept = uniform_kept(groups, {}, 0.4, None, 1)
    predicted = MacsModel(model, groups, count_macs(model, example)).predict(kept)
    for group in groups:
        remove_channels(graph, group, list(range(group.size - kept[group.key])))
    actual = count_macs(model, example)
    adds_before = count_macs(models.create("mobilenetv2"), example).by_kind["add"]
    # conv, linear and BN MACs are predicted exactly; residual additions are held at their old count
    assert predicted - actual.total == pytest.approx(adds_before - actual.by_kind["add"], abs=1e-6)
    assert actual.total < 0.5 * adds_before + count_macs(models.create("mobilenetv2"), example).total * 0.5


def test_round_kept_makes_multiples():
    assert round_kept(13, 32, 8) == 16 and round_kept(3, 32, 8) == 8 and round_kept(21, 30, 8) == 24
    assert round_kept(29, 30, 8) == 30  # never more than the group has
    assert round_kept(5, 16, None) == 5


def test_channel_rounding_halves_its_multiple_in_groups_narrower_than_twice_it_but_never_below_8():
    sixteen = ChannelRounding(16, 16)
    assert [sixteen.multiple_for(n) for n in (15, 16, 24, 31, 32, 64)] == [1, 8, 8, 8, 16, 16]
    assert [ChannelRounding(32).multiple_for(n) for n in (8, 16, 40, 64)] == [8, 8, 16, 32]
    assert [ChannelRounding(8, 16).multiple_for(n) for n in (12, 16)] == [1, 8]  # 8 is never halved
    assert ChannelRounding(12).multiple_for(16) == 12 and ChannelRounding(1).multiple_for(64) == 1


@pytest.mark.parametrize("multiple", [8, 16])
def test_uniform_macs_budget_on_coarse_multiples_reaches_the_target_and_gives_back_what_it_can(multiple):
    model = models.create("resnet20")
    example = torch.randn(1, 3, 32, 32)
    _, by_key = _groups(model, example)
    groups = list(by_key.values())
    macs_model = MacsModel(model, groups, count_macs(model, example))
    rounding = ChannelRounding(multiple, 16)
    target = macs_model.total / 2
    kept, _ = uniform_kept_for_macs(groups, {}, macs_model, target, rounding, 1)
    steps = {group.key: channel_step(group, rounding) for group in groups}
    assert macs_model.predict(kept) <= target
    assert all(kept[key] % steps[key] == 0 or kept[key] == by_key[key].size for key in kept)
    for key in kept:  # no group can take one more multiple back without missing the target
        if kept[key] < by_key[key].size:
            assert macs_model.predict({**kept, key: min(by_key[key].size, kept[key] + steps[key])}) > target
    assert macs_model.total / macs_model.predict(kept) < 2.2
