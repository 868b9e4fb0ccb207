import copy

import pytest
import torch
from torch import nn

from camphive.errors import ConfigError, DataError
from camphive.pruning import prune
from camphive.pruning.unstructured.settings import DEFAULTS
from tests.pruning.cases import image_batches, tiny_cnn


@pytest.mark.parametrize("criterion", ["camp-hive", "magnitude", "random", "taylor", "obd", "hutchinson"])
def test_sparsity_is_exact_and_masks_match_the_zeros(criterion):
    model = tiny_cnn()
    result = prune(model, image_batches(), 0.8, criterion=criterion, min_keep=0.05, hutchinson_probes=4)
    total = sum(mask.numel() for mask in result.masks.values())
    assert abs(result.sparsity - 0.8) <= 0.001 + 1 / total
    parameters = dict(model.named_parameters())
    for name, mask in result.masks.items():
        assert torch.count_nonzero(parameters[name][~mask]) == 0
        assert mask.sum() >= 1
    assert result.after["prunable_nonzero"] < result.before["prunable_nonzero"]


def test_no_layer_is_emptied_at_extreme_sparsity():
    model = tiny_cnn()
    result = prune(model, image_batches(), 0.97, criterion="magnitude", min_keep=0.01)
    for name, sparsity in result.layer_sparsity.items():
        assert sparsity < 1.0, name


@pytest.mark.parametrize("options", [
    {"score": "obs"}, {"loss_weighting": "unit"}, {"loss_weighting": "layer", "loss_diagonal": "hutchinson"},
    {"loss_weighting": "batchnorm"},
    {"score": "diag_lowrank", "top_k": 3}, {"score": "hv_product", "top_k": 2},
    {"curvature": "loss", "merge": "least_squares", "top_k": 3},
    {"curvature": "loss", "merge": "curvature", "pairing": "coupled", "top_k": 3, "scope": "layer"},
    {"merge": "half", "pairing": "cyclic"}, {"merge": "none"}, {"first_order_weight": 1.0},
    {"cycles": 3, "schedule": "cubic", "recovery_steps": 1}, {"selection": "layer", "recalibrate_bn": True},
])
def test_every_camp_hive_option_runs_and_reports(options):
    model = tiny_cnn()
    result = prune(model, image_batches(), 0.6, criterion="camp-hive", hutchinson_probes=2, **options)
    assert abs(result.sparsity - 0.6) < 0.01
    assert len(result.cycles) == options.get("cycles", DEFAULTS["cycles"])
    uses_loss_hessian = options.get("curvature") == "loss" or options.get("score") in ("diag_lowrank", "hv_product")
    if uses_loss_hessian:
        assert result.num_hvps > 0 and result.eigenvalues
    for key in ("sparsity", "config", "before", "after", "num_hvps", "curvature_seconds"):
        assert key in result.to_dict()


def _regression_problem(seed=0):
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(256, 8, generator=generator, dtype=torch.float64)
    inputs[:, 1] += inputs[:, 0]  # correlated inputs: merging has something to exploit
    inputs[:, 5] -= 0.7 * inputs[:, 4]
    truth = torch.randn(3, 8, generator=generator, dtype=torch.float64)
    targets = inputs @ truth.T
    return [(inputs[i : i + 64], targets[i : i + 64]) for i in range(0, 256, 64)], truth


def _loss(model, batches):
    with torch.no_grad():
        return sum(nn.functional.mse_loss(model(x), y, reduction="sum").item() for x, y in batches)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("pairing", ["cyclic", "coupled"])
def test_on_a_quadratic_model_merging_never_loses_to_plain_pruning(seed, pairing):
    batches, truth = _regression_problem(seed)
    losses = {}
    for merge in ("none", "curvature", "least_squares"):
        model = nn.Linear(8, 3, bias=False).double()
        with torch.no_grad():
            model.weight.copy_(truth)
        prune(model, batches, 0.5, criterion="magnitude", merge=merge, pairing=pairing, damping=0.0,
              loss_fn=nn.functional.mse_loss, min_keep=0.0)
        losses[merge] = _loss(model, batches)
    assert losses["curvature"] <= losses["none"] + 1e-9
    assert losses["least_squares"] <= losses["curvature"] + 1e-9


def test_cycles_reestimate_on_the_pruned_model_and_follow_the_schedule():
    result = prune(tiny_cnn(), image_batches(), 0.75, cycles=3, schedule="linear")
    assert [round(c["target"], 4) for c in result.cycles] == [0.25, 0.5, 0.75]
    assert [round(c["sparsity"], 2) for c in result.cycles] == [0.25, 0.5, 0.75]
    assert all("covariances" in c["stage_seconds"] for c in result.cycles)
    assert all(isinstance(c["seconds"], float) and c["seconds"] >= c["stage_seconds"]["covariances"]
               for c in result.cycles)  # the cycle's wall time, not overwritten by the statistics' seconds


def test_existing_masks_stay_pruned():
    model = tiny_cnn()
    first = prune(model, image_batches(), 0.5, criterion="magnitude")
    second = prune(model, image_batches(), 0.8, criterion="camp-hive", masks=first.masks)
    for name, mask in first.masks.items():
        assert not (second.masks[name] & ~mask).any()


def test_ignored_layers_are_left_alone():
    model = tiny_cnn()
    before = model[10].weight.detach().clone()
    result = prune(model, image_batches(), 0.5, ignored_layers=["10"])
    assert "10.weight" not in result.masks and torch.equal(model[10].weight, before)


def test_bad_input():
    with pytest.raises(ConfigError, match="no prunable layers"):
        prune(nn.Sequential(nn.ReLU()), image_batches(), 0.5)
    with pytest.raises(DataError, match="calibration data is empty"):
        prune(tiny_cnn(), [], 0.5)
    with pytest.raises(ConfigError, match="unknown merge"):
        prune(tiny_cnn(), image_batches(), 0.5, merge="glue")
    with pytest.raises(ConfigError, match="unknown criterion"):
        prune(tiny_cnn(), image_batches(), 0.5, criterion="vibes")
    with pytest.raises(ConfigError, match="sparsity must be in"):
        prune(tiny_cnn(), image_batches(), 1.5)


def test_report_has_the_top_loss_eigenvalue_before_and_after_pruning():
    from camphive.curvature import HessianOperator

    model, batches = tiny_cnn(), image_batches()
    with HessianOperator(model, batches, params=[n for n, p in model.named_parameters() if p.ndim > 1]) as operator:
        dense = torch.linalg.eigvalsh(operator.to_dense())
    expected = dense[dense.abs().argmax()].item()
    result = prune(model, batches, 0.5, spectrum_top_k=1)
    before = result.to_dict()["sharpness"]["before"][0]
    assert abs(before - expected) <= 0.01 * abs(expected)
    assert len(result.to_dict()["sharpness"]["after"]) == 1 and result.num_hvps > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("criterion", ["camp-hive", "obd"])
def test_a_gpu_model_prunes_with_cpu_calibration_batches_as_on_the_cpu(criterion):
    """CPU batches (what loaders give) and a GPU model: the masks of the CPU run, up to near-ties in the scores."""
    torch.manual_seed(0)
    on_cpu = tiny_cnn()
    on_gpu = copy.deepcopy(on_cpu).cuda()
    data = image_batches()
    expected = prune(on_cpu, data, 0.8, criterion=criterion, spectrum_top_k=0)
    result = prune(on_gpu, data, 0.8, criterion=criterion, spectrum_top_k=0)
    assert result.sparsity == pytest.approx(expected.sparsity)
    agreement = [(result.masks[name].cpu() == mask).float().mean().item() for name, mask in expected.masks.items()]
    assert min(agreement) >= 0.98, agreement
    assert all(p.device.type == "cuda" for p in on_gpu.parameters())


def test_a_layer_whose_inputs_are_all_zero_prunes_without_nan_and_is_not_merged():
    model = tiny_cnn()
    with torch.no_grad():  # every ReLU after the first BatchNorm dead: the second conv reads only zeros
        model[1].running_mean += 1e3
    before = model[3].weight.detach().clone()
    result = prune(model, image_batches(), 0.5, recalibrate_bn=False)
    kept = result.masks["3.weight"]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert torch.equal(model[3].weight[kept], before[kept])  # G = 0: nothing to fold, kept weights unchanged


def _layer_output_error(before: nn.Module, after: nn.Module, batches) -> float:
    with torch.no_grad():
        return sum(float(((before(inputs) - after(inputs)) ** 2).sum()) for inputs, _ in batches)


def _correlated_linear():
    torch.manual_seed(0)
    layer = nn.Linear(24, 6, bias=False).double()
    generator = torch.Generator().manual_seed(1)
    mixing = torch.eye(24, dtype=torch.float64) + 0.6 * torch.randn(24, 24, generator=generator, dtype=torch.float64)
    batches = [(torch.randn(64, 24, generator=generator, dtype=torch.float64) @ mixing, torch.zeros(64, dtype=torch.long))
               for _ in range(2)]
    return layer, batches


def _prune_both_ways(layer, batches, **options):
    runs = {}
    for unit_selection in ("scores", "greedy"):
        model = copy.deepcopy(layer)
        result = prune(model, batches, 0.85, unit_selection=unit_selection, loss_weighting="none",
                       loss_fn=lambda outputs, targets: outputs.pow(2).mean(), **options)
        assert result.config["unit_selection"] == unit_selection
        runs[unit_selection] = (model, result.masks["weight"])
    return runs


def test_greedy_unit_selection_keeps_the_counts_and_reconstructs_better_than_scores():
    layer, batches = _correlated_linear()
    runs = _prune_both_ways(layer, batches, cycles=1)
    (scores_model, scores_mask), (greedy_model, greedy_mask) = runs["scores"], runs["greedy"]
    assert torch.equal(scores_mask.sum(1), greedy_mask.sum(1))  # the selection sets the counts
    assert not torch.equal(scores_mask, greedy_mask)
    assert _layer_output_error(layer, greedy_model, batches) < _layer_output_error(layer, scores_model, batches)


@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_greedy_unit_selection_under_a_pattern_holds_it_and_reconstructs_better_than_scores(pattern):
    n, m = map(int, pattern.split(":"))
    layer, batches = _correlated_linear()
    runs = {}
    for unit_selection in ("scores", "greedy"):
        model = copy.deepcopy(layer)
        result = prune(model, batches, pattern=pattern, unit_selection=unit_selection, loss_weighting="none",
                       loss_fn=lambda outputs, targets: outputs.pow(2).mean())
        pruned = (~result.masks["weight"]).view(6, -1, m).sum(-1)
        assert (pruned == n).all()
        runs[unit_selection] = (model, result.masks["weight"])
    assert not torch.equal(runs["scores"][1], runs["greedy"][1])
    errors = {name: _layer_output_error(layer, model, batches) for name, (model, _) in runs.items()}
    assert errors["greedy"] < errors["scores"]


def test_forward_selection_runs_in_the_last_cycle_only():
    # Constant schedule, two cycles: every weight goes in cycle 1, the last cycle prunes nothing, so forward
    # selection (last cycle only) never chooses and greedy prunes exactly as the scores do; in one cycle it differs.
    layer, batches = _correlated_linear()
    runs = _prune_both_ways(layer, batches, cycles=2, schedule="constant")
    assert torch.equal(runs["scores"][1], runs["greedy"][1])
    runs = _prune_both_ways(layer, batches, cycles=1, schedule="constant")
    assert not torch.equal(runs["scores"][1], runs["greedy"][1])


def test_unit_selection_defaults_and_refusals():
    assert prune(tiny_cnn(), image_batches(), 0.5).config["unit_selection"] == "greedy"
    assert prune(tiny_cnn(), image_batches(), 0.5, criterion="magnitude").config["unit_selection"] == "scores"
    assert prune(tiny_cnn(), image_batches(), 0.5, merge="curvature").config["unit_selection"] == "scores"
    assert prune(tiny_cnn(), image_batches(), pattern="2:4").config["unit_selection"] == "scores"  # opt-in there
    assert prune(tiny_cnn(), image_batches(), pattern="2:4", unit_selection="greedy").config["unit_selection"] == "greedy"
    with pytest.raises(ConfigError, match="unit_selection='greedy'.*merge='least_squares'"):
        prune(tiny_cnn(), image_batches(), 0.5, merge="none", unit_selection="greedy")
    with pytest.raises(ConfigError, match="unknown unit_selection"):
        prune(tiny_cnn(), image_batches(), 0.5, unit_selection="best")
