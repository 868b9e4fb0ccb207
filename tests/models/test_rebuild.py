"""Tests for camphive.models.rebuild: loading structurally pruned state dicts."""
from __future__ import annotations

import copy

import pytest
import torch
import torch_pruning as tp
from torch import nn

from camphive import models
from camphive.errors import CheckpointError

ALL = list(models.MODELS)


def classifier(model: nn.Module) -> nn.Linear:
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


def prune_every_third_channel(model: nn.Module, example: torch.Tensor) -> int:
    """Remove channels 0, 3, 6, ... of every dependency group (classifier output kept).

    Builds torch-pruning's DependencyGraph (which must trace the model) and returns how
    many groups were pruned.
    """
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(conv in graph.module2node for conv in convs)  # every conv was traced
    pruned = 0
    for group in graph.get_all_groups(ignored_layers=[classifier(model)]):
        channels = len(group[0][1])
        if channels < 3:
            continue
        group.prune(list(range(0, channels, 3)))
        pruned += 1
    return pruned


@pytest.mark.parametrize("name", ALL)
def test_dependency_graph_prunes_and_pruned_weights_reload(name):
    in_channels = 1 if name == "small-cnn" else 3
    example = torch.randn(2, in_channels, 32, 32)
    torch.manual_seed(0)
    pruned = models.create(name, num_classes=10, in_channels=in_channels)
    # Non-trivial BN statistics, so a mis-mapped channel would change the output.
    for module in pruned.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.bias.data.uniform_(-0.5, 0.5)
    dense_count = sum(p.numel() for p in pruned.parameters())
    assert prune_every_third_channel(pruned, example) > 0
    assert sum(p.numel() for p in pruned.parameters()) < 0.75 * dense_count
    state = copy.deepcopy(pruned.state_dict())

    fresh = models.from_arch(pruned.camphive_arch)
    with pytest.raises(RuntimeError, match="size mismatch"):
        fresh.load_state_dict(state)
    rebuilt = models.rebuild_to_state_dict_shapes(fresh, state)
    assert rebuilt is fresh
    rebuilt.load_state_dict(state)

    pruned.eval(), rebuilt.eval()
    with torch.no_grad():
        assert torch.equal(rebuilt(example), pruned(example))
    for (name_a, a), (name_b, b) in zip(pruned.named_modules(), rebuilt.named_modules()):
        assert name_a == name_b and type(a) is type(b)
        if isinstance(a, nn.Conv2d):
            assert (a.in_channels, a.out_channels, a.groups, a.stride, a.padding) == (
                b.in_channels, b.out_channels, b.groups, b.stride, b.padding)


def test_small_cnn_pruned_by_hand():
    """Without torch-pruning: drop conv2 filters {1, 5} and fc1 units {0, 2, 3} by hand."""
    torch.manual_seed(1)
    model = models.create("small-cnn", in_channels=1).eval()
    keep2 = [c for c in range(64) if c not in (1, 5)]
    keep_fc1 = [u for u in range(256) if u not in (0, 2, 3)]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for key in ("conv2.weight", "bn2.weight", "bn2.bias", "bn2.running_mean", "bn2.running_var"):
        state[key] = state[key][keep2]
    state["conv3.weight"] = state["conv3.weight"][:, keep2]
    for key in ("fc1.weight", "fc1.bias"):
        state[key] = state[key][keep_fc1]
    state["fc2.weight"] = state["fc2.weight"][:, keep_fc1]

    rebuilt = models.rebuild_to_state_dict_shapes(models.create("small-cnn", in_channels=1), state)
    rebuilt.load_state_dict(state)
    rebuilt.eval()
    assert (rebuilt.conv2.out_channels, rebuilt.bn2.num_features, rebuilt.conv3.in_channels,
            rebuilt.fc1.out_features, rebuilt.fc2.in_features) == (62, 62, 62, 253, 253)
    assert rebuilt.conv2.bias is None
    assert rebuilt.conv2.padding == (1, 1)

    # Reference: the dense model with the removed channels' contributions zeroed out.
    reference = copy.deepcopy(model)
    with torch.no_grad():
        reference.conv3.weight[:, [1, 5]] = 0
        reference.fc2.weight[:, [0, 2, 3]] = 0
        x = torch.randn(3, 1, 28, 28)
        torch.testing.assert_close(rebuilt(x), reference(x), rtol=1e-5, atol=1e-6)


def test_depthwise_stays_depthwise_and_grouped_keeps_groups():
    model = nn.Sequential(
        nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=True),  # depthwise
        nn.Conv2d(8, 12, 3, stride=2, groups=4, bias=False),  # grouped: 2 inputs per group
        nn.Conv2d(4, 8, 3, groups=4, dilation=2),  # depthwise with multiplier 2
    )
    state = {
        "0.weight": torch.randn(5, 1, 3, 3), "0.bias": torch.randn(5),
        "1.weight": torch.randn(8, 1, 3, 3),  # 4 groups, 1 input each, 2 filters each
        "2.weight": torch.randn(6, 1, 3, 3), "2.bias": torch.randn(6),
    }
    models.rebuild_to_state_dict_shapes(model, state)
    depthwise, grouped, multiplier = model
    assert (depthwise.in_channels, depthwise.out_channels, depthwise.groups) == (5, 5, 5)
    assert depthwise.bias is not None and depthwise.padding == (1, 1)
    assert (grouped.in_channels, grouped.out_channels, grouped.groups) == (4, 8, 4)
    assert grouped.stride == (2, 2) and grouped.bias is None
    assert (multiplier.in_channels, multiplier.out_channels, multiplier.groups) == (3, 6, 3)
    assert multiplier.dilation == (2, 2)
    model.load_state_dict(state)


def test_batchnorm1d_and_linear_and_root_module():
    model = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4, eps=1e-3, momentum=0.3))
    state = {"0.weight": torch.randn(3, 5), "0.bias": torch.randn(3),
             "1.weight": torch.ones(3), "1.bias": torch.zeros(3),
             "1.running_mean": torch.zeros(3), "1.running_var": torch.ones(3),
             "1.num_batches_tracked": torch.tensor(7)}
    model.eval()
    models.rebuild_to_state_dict_shapes(model, state)
    assert (model[0].in_features, model[0].out_features) == (5, 3)
    assert model[1].num_features == 3 and model[1].eps == 1e-3 and model[1].momentum == 0.3
    assert not model[1].training  # mode kept
    model.load_state_dict(state)
    root = models.rebuild_to_state_dict_shapes(nn.Linear(4, 4), {"weight": torch.zeros(2, 4)})
    assert root.weight.shape == (2, 4)


def test_unchanged_model_is_left_alone():
    model = models.create("resnet20")
    modules_before = list(model.modules())
    models.rebuild_to_state_dict_shapes(model, model.state_dict())
    assert all(a is b for a, b in zip(modules_before, model.modules()))


def test_kernel_mismatch_is_a_checkpoint_error():
    model = models.create("small-cnn", in_channels=1)
    state = dict(model.state_dict())
    state["conv2.weight"] = torch.zeros(64, 32, 5, 5)
    with pytest.raises(CheckpointError, match="conv2.weight"):
        models.rebuild_to_state_dict_shapes(model, state)


def test_unresizable_module_is_a_checkpoint_error():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    state = {"0.weight": torch.zeros(3, 4), "0.bias": torch.zeros(3),
             "1.weight": torch.ones(3), "1.bias": torch.zeros(3)}
    with pytest.raises(CheckpointError, match="1.weight"):
        models.rebuild_to_state_dict_shapes(model, state)
