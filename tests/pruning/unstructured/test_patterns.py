"""N:M semi-structured patterns: groups in the GEMM order, exact counts, cycles, dense layers, errors, the merge."""
import json

import pytest
import torch
from torch import nn

from camphive.errors import ConfigError
from camphive.layers import prunable_parameters
from camphive.pruning import UnstructuredSettings, prune
from camphive.pruning.unstructured.patterns import (
    group_columns,
    pattern_layout,
    pattern_violations,
    pruned_per_group,
    select_pattern,
)


def patterned_cnn(classes: int = 3) -> nn.Module:
    """A 1-channel stem (no N:M layout), a plain conv, a grouped conv (8 channels per group) and two linears."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, (3, 2), padding=1, groups=2), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, classes),
    )


def batches(classes: int = 3, count: int = 3, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 1, 8, 8, generator=generator), torch.randint(0, classes, (16,), generator=generator))
            for _ in range(count)]


def gemm_groups(mask: torch.Tensor, m: int) -> torch.Tensor:
    """``(out, groups, m)``: the mask in the hardware's reduction order, by an explicit permute:
    a conv weight ``(out, c, kh, kw)`` becomes ``(out, kh, kw, c)`` (NHWC implicit GEMM)."""
    if mask.ndim > 2:
        mask = mask.permute(0, *range(2, mask.ndim), 1)
    return mask.reshape(mask.shape[0], -1, m)


@pytest.mark.parametrize("criterion", ["camp-hive", "magnitude", "taylor", "random", "obd", "wanda", "sparsegpt", "obc"])
@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_pattern_holds_exactly_in_every_group_of_linear_conv_and_grouped_conv(criterion, pattern):
    n, m = map(int, pattern.split(":"))
    model = patterned_cnn()
    result = prune(model, batches(), criterion=criterion, pattern=pattern, hutchinson_probes=2)
    parameters = dict(model.named_parameters())
    assert result.extra["dense_layers"] == {"0.weight": "1 input channel, not a multiple of " + str(m)}
    assert result.masks["0.weight"].all()
    for name in ("3.weight", "6.weight", "11.weight", "13.weight"):
        pruned = (~gemm_groups(result.masks[name], m)).sum(-1)
        assert (pruned == n).all(), (name, pruned.unique())
        assert torch.count_nonzero(parameters[name][~result.masks[name]]) == 0
    assert result.config["pattern"] == pattern and result.config["sparsity"] == n / m
    assert result.to_dict()["dense_layers"] == result.extra["dense_layers"]


def test_conv_groups_are_consecutive_input_channels_at_one_kernel_position():
    shape, m = (5, 8, 3, 2), 4
    flat = torch.arange(8 * 3 * 2).view(8, 3, 2)  # columns of W.reshape(out, -1): (in_channel, kh, kw) order
    expected = flat.permute(1, 2, 0).reshape(-1, m)  # the GEMM's (kh, kw, in_channel) order, m at a time
    assert torch.equal(group_columns(shape, m), expected)
    assert torch.equal(group_columns((5, 8), m), torch.arange(8).view(2, 4))  # linear: consecutive features


def test_selection_matches_an_explicit_permute_of_the_weight():
    torch.manual_seed(1)
    conv = nn.Conv2d(16, 6, 3, groups=2)  # 8 input channels per group
    weight = conv.weight.detach()
    scores = {"weight": weight.abs()}
    alive = {"weight": torch.ones_like(weight, dtype=torch.bool)}
    chosen = select_pattern(scores, alive, pattern_layout(conv, {"weight": weight}, "2:4"))["weight"]
    nhwc = weight.abs().permute(0, 2, 3, 1).reshape(6, -1, 4)
    lowest = torch.zeros_like(nhwc, dtype=torch.bool).scatter_(-1, nhwc.argsort(-1)[..., :2], True)
    assert torch.equal(chosen.permute(0, 2, 3, 1).reshape(6, -1, 4), lowest)


def test_already_pruned_entries_count_towards_n():
    linear = nn.Linear(8, 2)
    weight = linear.weight.detach()
    alive = torch.ones_like(weight, dtype=torch.bool)
    alive[0, 0] = alive[0, 1] = False  # group 0 of unit 0 already holds 2 pruned
    alive[1, 4] = False
    layout = pattern_layout(linear, {"weight": weight}, "2:4")
    chosen = select_pattern({"weight": torch.arange(16.0).view(2, 8)}, {"weight": alive}, layout)["weight"]
    assert not chosen[0, :4].any() and chosen[0, 4:].sum() == 2
    assert chosen[1, :4].sum() == 2 and chosen[1, 4:].sum() == 1
    assert (pruned_per_group(alive & ~chosen, layout.columns["weight"]) == 2).all()


@pytest.mark.parametrize("schedule, expected", [("linear", [1, 3, 4]), ("cubic", [3, 4, 4])])
def test_cycles_spread_the_pattern_and_reach_exactly_n(schedule, expected):
    model = patterned_cnn()
    counts = []

    def on_cycle_end(cycle, masks, record):
        counts.append({name: pruned_per_group(masks[name], columns).unique().tolist()
                       for name, columns in layout.columns.items()})

    layout = pattern_layout(model, prunable_parameters(model), "4:8")
    result = prune(model, batches(), pattern="4:8", cycles=3, schedule=schedule, on_cycle_end=on_cycle_end)
    # cycle t of T prunes up to round(N * fraction_t) per group; linear: 4/3 -> 1, 8/3 -> 3, 4
    assert [set(sum(cycle.values(), [])) for cycle in counts] == [{count} for count in expected]
    assert not pattern_violations(result.masks, layout)


def test_layers_without_an_n_m_layout_are_left_dense_and_named():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=8), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 4 * 4, 6), nn.ReLU(), nn.Linear(6, 3))
    result = prune(model, batches(), criterion="magnitude", pattern="2:4")
    assert result.extra["dense_layers"] == {
        "0.weight": "1 input channel, not a multiple of 4",
        "2.weight": "1 input channel per conv group, not a multiple of 4",
        "7.weight": "6 input features, not a multiple of 4",
    }
    assert all(result.masks[name].all() for name in result.extra["dense_layers"])
    assert (~result.masks["5.weight"]).sum() == 6 * 128 // 2


@pytest.mark.parametrize("options, message", [
    ({"pattern": "4:2"}, "pattern 4:2 has N > M; use N:M with N < M, e.g. 2:4"),
    ({"pattern": "4:4"}, "would prune every weight"),
    ({"pattern": "0:4"}, "needs positive N and M"),
    ({"pattern": "2/4"}, "pattern '2/4' is not N:M"),
    ({"pattern": "two:four"}, "is not N:M"),
    ({"pattern": "124"}, "quote it"),
    ({"pattern": 124}, "quote it"),
    ({"pattern": "2:4", "sparsity": 0.9}, "sparsity 0.9 contradicts pattern 2:4"),
])
def test_bad_patterns_are_one_line_errors(options, message):
    with pytest.raises(ConfigError) as error:
        UnstructuredSettings(**options)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_pattern_sets_the_sparsity_and_is_unstructured_only():
    assert UnstructuredSettings(pattern=" 2 : 4 ").sparsity == 0.5
    assert UnstructuredSettings(pattern="4:8", sparsity=0.5).pattern == "4:8"
    with pytest.raises(ConfigError, match="apply to unstructured pruning only"):
        prune(patterned_cnn(), batches(), mode="structured", sparsity=0.5, pattern="2:4")


def _tiny_linear_problem(seed=0):
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(64, 8, generator=generator)
    inputs[:, 1] += 0.9 * inputs[:, 0]  # correlated inputs within a group and across groups
    inputs[:, 6] -= 0.7 * inputs[:, 3]
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 3, bias=False))
    return model, [(inputs[:32], torch.randint(0, 3, (32,), generator=generator)),
                   (inputs[32:], torch.randint(0, 3, (32,), generator=generator))], inputs.double()


@pytest.mark.parametrize("pattern", ["2:4", "1:4", "3:4"])
def test_least_squares_merge_is_the_closed_form_fold_for_the_forced_mask(pattern):
    n, m = map(int, pattern.split(":"))
    model, calib, inputs = _tiny_linear_problem()
    weight = model[0].weight.detach().double().clone()
    gram = inputs.T @ inputs / inputs.shape[0]
    damped = gram + 0.01 * gram.diagonal().mean() * torch.eye(8, dtype=torch.float64)
    scores = 0.5 * weight**2 * gram.diagonal()  # CAMP-HiVe's score, no BatchNorm reads this layer
    pruned = torch.zeros_like(weight, dtype=torch.bool)
    for start in range(0, 8, m):
        lowest = scores[:, start:start + m].argsort(dim=1)[:, :n] + start
        pruned.scatter_(1, lowest, True)
    expected = torch.zeros_like(weight)
    for row in range(3):
        kept, gone = (~pruned[row]).nonzero().flatten(), pruned[row].nonzero().flatten()
        fold = torch.linalg.solve(damped[kept][:, kept], damped[kept][:, gone] @ weight[row, gone])
        expected[row, kept] = weight[row, kept] + fold  # dW_S = G_SS^-1 G_SP w_P
    result = prune(model, calib, pattern=pattern, cycles=1, merge="least_squares", damping=0.01, refit=False)
    assert torch.equal(~result.masks["0.weight"], pruned)
    assert torch.allclose(model[0].weight.detach().double(), expected, atol=1e-5, rtol=1e-4)


def test_prune_command_and_compare_prune_options_take_a_pattern(tmp_path):
    from camphive.cli import main
    from camphive.jobs.compare import compare_job

    data = "num_classes=3,shape=4x8x8,num_samples=48"
    assert main(["train", "--dataset", "synthetic", "--dataset-options", data, "--epochs", "1", "--batch-size", "16",
                 "--out", str(tmp_path / "t"), "--device", "cpu"]) == 0
    assert main(["prune", "--checkpoint", str(tmp_path / "t" / "model.safetensors"), "--pattern", "2:4",
                 "--criterion", "magnitude", "--calib-samples", "16", "--out", str(tmp_path / "p"),
                 "--device", "cpu"]) == 0
    prune_record = json.loads((tmp_path / "p" / "results.json").read_text())["prune"]
    assert prune_record["config"]["pattern"] == "2:4" and prune_record["dense_layers"] == {}
    assert prune_record["sparsity"] == pytest.approx(0.5)
    results = compare_job(out=tmp_path / "c", model="small-cnn", dataset="synthetic",
                          dataset_options={"num_samples": 48, "shape": [1, 8, 8]}, dense_epochs=1, finetune_epochs=0,
                          batch_size=16, calib_samples=16, calib_batch_size=16, spectrum_top_k=0, device="cpu",
                          criteria="magnitude", sparsities="0.5", prune_options="pattern=2:4")
    (row,) = results["rows"]
    assert row["prune"]["dense_layers"] == {"conv1.weight": "1 input channel, not a multiple of 4"}
    assert 0.45 < row["sparsity"] < 0.5
