"""The one-shot peers through prune(): Wanda's scores and per-unit selection, SparseGPT and OBC as layer solvers."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from camphive.curvature.reconstruction import layer_input_covariances
from camphive.errors import ConfigError
from camphive.pruning import prune
from camphive.pruning.core.calibration import CalibrationInfo
from camphive.pruning.criteria import make_criterion
from camphive.pruning.criteria.layer_solvers import OptimalBrainCompression
from camphive.pruning.unstructured.selection import select_to_prune
from camphive.pruning.unstructured.settings import DEFAULTS
from camphive.pruning.unstructured.sparsegpt import sparsegpt_prune
from tests.pruning.cases import image_batches, tiny_cnn
from tests.pruning.unstructured.obs_reference import closed_form_obs, damped


class Shuffled(nn.Module):
    """Modules registered in another order than the forward runs them; a grouped convolution in the middle."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.head = nn.Linear(24, 3)
        self.grouped = nn.Conv2d(4, 6, 3, padding=1, groups=2)
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4)
        self.pool = nn.AdaptiveAvgPool2d(2)

    def forward(self, x):
        x = torch.relu(self.norm(self.stem(x)))
        x = torch.relu(self.grouped(x))
        return self.head(self.pool(x).flatten(1))


FORWARD_ORDER = ["stem", "grouped", "head"]


def layer_inputs(model, layer, batches):
    """The inputs ``layer`` receives over all batches (eval mode), concatenated."""
    seen = []
    handle = layer.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    model.eval()
    with torch.no_grad():
        for inputs, _ in batches:
            model(inputs)
    handle.remove()
    return torch.cat(seen)


def explicit_feature_norms(layer, inputs):
    """``(groups, fan_in)``: ||X_j||_2 over every input row (im2col patches of a conv), and the row count."""
    if isinstance(layer, nn.Linear):
        return inputs.double().norm(dim=0)[None], inputs.shape[0]
    patches = F.unfold(inputs.double(), layer.kernel_size, padding=layer.padding, stride=layer.stride)  # (N, C*k*k, L)
    groups = layer.groups
    rows = patches.reshape(patches.shape[0], groups, -1, patches.shape[2]).permute(1, 0, 3, 2)
    rows = rows.reshape(groups, -1, rows.shape[-1])
    return rows.norm(dim=1), rows.shape[1]


def test_wanda_scores_are_weight_magnitude_times_input_feature_norm():
    model, batches = Shuffled(), image_batches()
    params = {f"{name}.weight": getattr(model, name).weight for name in FORWARD_ORDER}
    scores = make_criterion("wanda").scores(CalibrationInfo(model, batches, params))
    for name in FORWARD_ORDER:
        layer = getattr(model, name)
        norms, rows = explicit_feature_norms(layer, layer_inputs(model, layer, batches))
        per_unit = norms.repeat_interleave(layer.weight.shape[0] // norms.shape[0], dim=0)
        expected = layer.weight.detach().double().reshape(per_unit.shape[0], -1).abs() * per_unit
        # The scores use the root mean square of each feature: the norm over sqrt(rows), one constant per layer.
        got = scores[f"{name}.weight"].double().reshape(expected.shape) * rows**0.5
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-8)


def test_wanda_defaults_prune_each_unit_to_the_target_by_its_lowest_scores():
    model, batches = tiny_cnn(), image_batches()
    dense = copy.deepcopy(model)
    params = {name: p for name, p in dense.named_parameters() if name.endswith("weight") and p.ndim > 1}
    scores = make_criterion("wanda").scores(CalibrationInfo(dense, batches, params))
    result = prune(model, batches, 0.6, criterion="wanda")
    assert (result.config["selection"], result.config["merge"], result.config["cycles"]) == ("unit", "none", 1)
    total = sum(mask.numel() for mask in result.masks.values())
    assert sum(int((~mask).sum()) for mask in result.masks.values()) == round(0.6 * total)  # exact count
    for name, mask in result.masks.items():
        pruned, score = ~mask.reshape(mask.shape[0], -1), scores[name].reshape(mask.shape[0], -1)
        fan_in = pruned.shape[1]
        assert set(pruned.sum(1).tolist()) <= {int(0.6 * fan_in), int(0.6 * fan_in) + 1}  # the same fraction per unit
        for row in range(pruned.shape[0]):  # and each unit's lowest scores (ties by position)
            lowest = torch.sort(score[row], stable=True).indices[: int(pruned[row].sum())]
            assert set(lowest.tolist()) == set(pruned[row].nonzero().flatten().tolist())
        assert torch.equal(params[name].detach() * mask, dict(model.named_parameters())[name].detach())  # no update


def test_unit_selection_respects_each_units_floor_and_puts_the_rest_on_other_units():
    scores = {"small": torch.rand(4, 3), "big": torch.rand(4, 50)}
    alive = {name: torch.ones_like(score, dtype=torch.bool) for name, score in scores.items()}
    chosen = select_to_prune(scores, alive, 0.9, "unit", min_keep=0.01)
    assert (chosen["small"].sum(1) == 2).all()  # a unit of 3 keeps one
    assert sum(int(mask.sum()) for mask in chosen.values()) == round(0.9 * 212)
    # 0.9 of 212 is 191: the small units' shortfall (0.7 each) falls on the big units, 45.75 each on average.
    assert sorted(chosen["big"].sum(1).tolist()) == [45, 46, 46, 46]
    with pytest.raises(ConfigError, match="would empty an output unit"):
        select_to_prune(scores, alive, 0.99, "unit", min_keep=0.01)


def sequential_reference(model, batches, sparsity, solve):
    """Layer by layer in forward order: G of the layer's inputs on the model with the layers before it already
    solved, per group g, then ``solve(name, g, weight_rows, gram, count)`` -> the group's new rows. The layer's
    count ``round(sparsity * numel)`` is split over equal groups by rounding the running total half up."""
    model = copy.deepcopy(model)
    for name in FORWARD_ORDER:
        layer = getattr(model, name)
        grams = layer_input_covariances(model, batches, layers=[name])[name].dense()
        rows = layer.weight.detach().reshape(layer.weight.shape[0], -1).double()
        groups, total = grams.shape[0], round(sparsity * layer.weight.numel())
        per_group = rows.shape[0] // groups
        new = [solve(name, g, rows[g * per_group : (g + 1) * per_group], grams[g],
                     (2 * total * (g + 1) + groups) // (2 * groups) - (2 * total * g + groups) // (2 * groups))
               for g in range(groups)]
        layer.weight.data.copy_(torch.cat(new).reshape(layer.weight.shape))
    return model


def test_sparsegpt_through_prune_equals_the_layer_solver_on_sequentially_pruned_grams():
    model, batches = Shuffled(), image_batches()
    expected = sequential_reference(model, batches, 0.7, lambda name, group, rows, gram, count: sparsegpt_prune(
        rows, gram, count, block_size=128, damping=0.01)[0])
    result = prune(model, batches, 0.7, criterion="sparsegpt")
    assert (result.config["selection"], result.config["merge"]) == ("layer", "none")
    for name in FORWARD_ORDER:
        weight = getattr(model, name).weight.detach()
        torch.testing.assert_close(weight, getattr(expected, name).weight.detach(), rtol=1e-5, atol=1e-6)
        assert int((~result.masks[f"{name}.weight"]).sum()) == round(0.7 * weight.numel())  # uniform per layer
        assert torch.equal(weight == 0, ~result.masks[f"{name}.weight"])
    solver = result.cycles[0]["solver"]
    assert list(solver["layers"]) == [f"{name}.weight" for name in FORWARD_ORDER]  # forward order, not module order
    assert solver["layers_solved"] == 3 and solver["solve_seconds"] >= 0 and solver["gram_seconds"] > 0


def test_obc_through_prune_gives_each_layer_the_closed_form_obs_for_its_mask():
    model, batches = Shuffled(), image_batches()
    pruned = copy.deepcopy(model)
    result = prune(pruned, batches, 0.6, criterion="obc")

    def closed_form(name, group, rows, gram, count):
        size = rows.shape[0]
        kept = result.masks[f"{name}.weight"].reshape(-1, rows.shape[1])[group * size : (group + 1) * size]
        assert int((~kept).sum()) == count
        return closed_form_obs(rows, damped(gram), kept)

    expected = sequential_reference(model, batches, 0.6, closed_form)
    for name in FORWARD_ORDER:
        torch.testing.assert_close(getattr(pruned, name).weight.detach(), getattr(expected, name).weight.detach(),
                                   rtol=1e-5, atol=1e-6)


def test_global_selection_takes_each_layers_count_from_camp_hives_global_choice():
    model, batches = tiny_cnn(), image_batches()
    params = {name: p for name, p in model.named_parameters() if name.endswith("weight") and p.ndim > 1}
    options = {key: DEFAULTS[key] for key in ("score", "curvature", "loss_weighting")}
    scores = make_criterion("camp-hive", **options).scores(CalibrationInfo(copy.deepcopy(model), batches, params))
    alive = {name: torch.ones_like(p, dtype=torch.bool) for name, p in params.items()}
    chosen = select_to_prune(scores, alive, 0.8, "global", 0.01)
    for criterion in ("sparsegpt", "obc"):
        result = prune(copy.deepcopy(model), batches, 0.8, criterion=criterion, selection="global")
        assert {name: int((~mask).sum()) for name, mask in result.masks.items()} == \
            {name: int(mask.sum()) for name, mask in chosen.items()}
        layer = prune(copy.deepcopy(model), batches, 0.8, criterion=criterion)  # default: uniform per layer
        assert {name: int((~mask).sum()) for name, mask in layer.masks.items()} == \
            {name: round(0.8 * mask.numel()) for name, mask in layer.masks.items()}


def test_two_cycles_keep_earlier_pruning_and_reach_the_exact_count():
    model = tiny_cnn()
    result = prune(model, image_batches(), 0.75, criterion="sparsegpt", cycles=2)
    assert [cycle["solver"]["layers_solved"] for cycle in result.cycles] == [4, 4]
    for mask in result.masks.values():
        assert int((~mask).sum()) == round(0.75 * mask.numel())


def test_solvers_with_an_n_m_pattern_hold_it_in_every_group():
    from camphive.pruning.unstructured.patterns import pattern_layout, pattern_violations

    model = tiny_cnn()
    result = prune(model, image_batches(), criterion="sparsegpt", pattern="2:4")
    params = {name: p for name, p in model.named_parameters() if name in result.masks}
    layout = pattern_layout(model, params, "2:4")
    assert layout.dense and not pattern_violations(result.masks, layout)  # the 1-channel stem stays dense
    for name in layout.dense:
        assert result.masks[name].all()


@pytest.mark.parametrize("options, message", [
    (dict(criterion="sparsegpt", merge="least_squares"), "updates the kept weights itself"),
    (dict(criterion="obc", merge="curvature"), "updates the kept weights itself"),
    (dict(criterion="obc", selection="unit"), "takes selection 'layer'"),
    (dict(criterion="sparsegpt", mode="structured"), "use mode='unstructured'"),
])
def test_solver_options_that_do_not_apply_are_refused_in_one_line(options, message):
    model = tiny_cnn()
    with pytest.raises(ConfigError, match=message):
        prune(model, image_batches(), 0.5, **options)


def test_obc_refuses_a_fan_in_above_its_limit_before_changing_anything():
    model = tiny_cnn()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ConfigError, match="above OBC's max_fan_in 20"):
        prune(model, image_batches(), 0.5, criterion=OptimalBrainCompression(max_fan_in=20))
    assert all(torch.equal(value, model.state_dict()[key]) for key, value in before.items())


def test_cli_prunes_with_the_peers(tmp_path, capsys):
    import json

    from camphive.cli import main

    assert main(["train", "--dataset", "synthetic", "--dataset-options", "num_classes=4,shape=1x12x12,num_samples=64",
                 "--epochs", "1", "--batch-size", "32", "--out", str(tmp_path / "t"), "--device", "cpu"]) == 0
    checkpoint = str(tmp_path / "t" / "model.safetensors")
    for criterion in ("wanda", "sparsegpt"):
        out = tmp_path / criterion
        assert main(["prune", "--checkpoint", checkpoint, "--criterion", criterion, "--sparsity", "0.5",
                     "--calib-samples", "16", "--device", "cpu", "--out", str(out)]) == 0
        results = json.loads((out / "results.json").read_text())
        assert results["prune"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    capsys.readouterr()
    assert main(["prune", "--checkpoint", checkpoint, "--criterion", "sparsegpt", "--merge", "least_squares",
                 "--sparsity", "0.5", "--device", "cpu", "--out", str(tmp_path / "bad")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "updates the kept weights itself" in error
    assert not (tmp_path / "bad").exists()
