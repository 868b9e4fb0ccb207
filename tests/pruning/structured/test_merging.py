"""Channel merges: exact when a removed channel is a multiple of a kept one; least squares and the
fold-aware saliencies checked against the output error they predict."""
import pytest
import torch
from torch import nn

from camphive.pruning.structured.groups import build_dependency_graph, channel_groups, remove_channels
from camphive.pruning.structured.merging import (
    consumer_grams,
    least_squares_coefficients,
    merge_group,
    norm_scales,
    norms_after,
)
from camphive.pruning.structured.prune import prune_structured
from camphive.pruning.structured.saliency import greedy_obs_removal, greedy_obs_scores, obs_saliency

REMOVED, PARTNER, FACTOR = 3, 1, 0.4


def proportional_model() -> nn.Module:
    """Conv -> ReLU -> pool -> flatten -> linear, with channel 3 exactly 0.4 x channel 1."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 5, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(5 * 16, 3))
    with torch.no_grad():
        model[0].weight[REMOVED] = FACTOR * model[0].weight[PARTNER]
        model[0].bias[REMOVED] = FACTOR * model[0].bias[PARTNER]
        model[0].weight[PARTNER] *= 3  # the partner is the most significant channel (cyclic pairs go to it)
        model[0].bias[PARTNER] *= 3
        model[4].weight[:, REMOVED * 16 : (REMOVED + 1) * 16] *= 0.1  # and the removed one the least
    return model


def inputs(samples: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randn(samples, 2, 8, 8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("options", [
    {"merge": "pair", "pairing": "coupled", "beta_from": "activations"},
    {"merge": "pair", "pairing": "cyclic", "beta_from": "activations"},
    {"merge": "pair", "pairing": "cyclic", "beta_from": "weights"},
    {"merge": "pair", "pairing": "coupled", "beta_from": "weights"},
    {"merge": "least_squares"},
    {"merge": "least_squares", "flatten_fit": "per_position"},
])
def test_merging_a_proportional_channel_keeps_outputs(options):
    model, x = proportional_model(), inputs()
    reference = model(x)
    result = prune_structured(model, [(x, torch.zeros(24, dtype=torch.long))], 0.2, criterion="magnitude", damping=0.0,
                              measure_latency=False, **options)
    assert model[0].out_channels == 4 and result.extra["channels"]["0"] == [5, 4]
    assert torch.allclose(model(x), reference, atol=1e-5, rtol=0)
    assert not torch.allclose(model[4].weight[:, PARTNER * 16 : (PARTNER + 1) * 16],
                              proportional_model()[4].weight[:, PARTNER * 16 : (PARTNER + 1) * 16])


def test_plain_removal_of_the_same_channel_changes_outputs():
    model, x = proportional_model(), inputs()
    reference = model(x)
    prune_structured(model, [(x, torch.zeros(24, dtype=torch.long))], 0.2, criterion="magnitude", merge="none",
                     measure_latency=False)
    assert (model(x) - reference).abs().max() > 1e-3  # 100x the tolerance the merges meet


def _mlp_group(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(seed + 1))
    graph = build_dependency_graph(model, x[:1])
    (group,) = channel_groups(model, graph)
    grams = consumer_grams(model, [(x, None)], [group])
    return model, x, graph, group, grams


def _hidden(model, x):
    return model[1](model[0](x))


def _error_after_least_squares(removed) -> float:
    """1/2 mean ||output change||^2 after removing ``removed`` hidden units with the LS fold (no damping)."""
    model, x, graph, group, grams = _mlp_group()
    reference = model(x)
    merge_group(group, torch.as_tensor(removed), torch.zeros(6), grams, "least_squares", "coupled", "activations", 0.0)
    remove_channels(graph, group, removed)
    return 0.5 * float(((model(x) - reference) ** 2).sum(1).mean().detach())


def test_least_squares_coefficients_solve_the_normal_equations():
    model, x, _, group, grams = _mlp_group()
    hidden = _hidden(model, x).double()
    removed, kept = torch.tensor([1, 4]), torch.tensor([0, 2, 3, 5])
    coefficients = least_squares_coefficients(grams[(group.key, "2")].gram, removed, kept, 0.0)[0]
    expected = torch.linalg.lstsq(hidden[:, kept], hidden[:, removed]).solution
    assert torch.allclose(coefficients, expected, atol=1e-8)


def test_least_squares_beats_plain_removal_and_pairs():
    errors = {}
    for merge in ("least_squares", "pair", "none"):
        model, x, graph, group, grams = _mlp_group()
        reference = model(x)
        merge_group(group, torch.tensor([1, 4]), torch.arange(6.0), grams, merge, "coupled", "activations", 0.0)
        remove_channels(graph, group, [1, 4])
        errors[merge] = float(((model(x) - reference) ** 2).mean().detach())
    assert errors["least_squares"] < errors["pair"] < errors["none"]


def test_obs_saliency_is_the_output_error_after_the_fold():
    _, _, _, group, grams = _mlp_group()
    saliency = obs_saliency(group, grams, damping=0.0)
    measured = torch.tensor([_error_after_least_squares([p]) for p in range(6)], dtype=torch.float64)
    assert torch.allclose(saliency, measured, rtol=1e-6, atol=1e-9)


def test_greedy_marginal_costs_add_up_to_the_joint_fold_error():
    _, _, _, group, grams = _mlp_group()
    order, marginal = greedy_obs_removal(group, grams, damping=0.0)
    assert sorted(order.tolist()) == list(range(6))
    assert int(order[0]) == int(torch.argmin(obs_saliency(group, grams, 0.0)))
    for count in (2, 3):
        joint = _error_after_least_squares(order[:count].tolist())
        assert float(marginal[:count].sum()) == pytest.approx(joint, rel=1e-6, abs=1e-9)


def test_greedy_scores_rank_channels_in_removal_order():
    _, _, _, group, grams = _mlp_group()
    order, _ = greedy_obs_removal(group, grams, damping=0.01)
    scores = greedy_obs_scores(group, grams, damping=0.01)
    assert torch.equal(torch.argsort(scores), order)


def test_norm_scales_follow_batchnorm():
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU())
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([1.0, 2.0, -1.0]))
        model[1].running_var.copy_(torch.tensor([1.0, 4.0, 0.25]))
    scales = norm_scales(model)
    expected = torch.tensor([1.0, 2.0, -1.0]) / torch.sqrt(torch.tensor([1.0, 4.0, 0.25]) + model[1].eps)
    assert torch.allclose(scales["0"], expected, atol=1e-5)


def _affine_copy_model(consumer: str) -> nn.Module:
    """Channel 3 = 0.4 x channel 1 + 0.7 exactly (no activation), read by a linear with a bias or
    by a bias-free 1x1 conv with a BatchNorm after it."""
    torch.manual_seed(0)
    if consumer == "linear":
        model = nn.Sequential(nn.Conv2d(2, 5, 3, padding=1), nn.Flatten(), nn.Linear(5 * 64, 3))
    else:
        model = nn.Sequential(nn.Conv2d(2, 5, 3, padding=1), nn.Conv2d(5, 3, 1, bias=False), nn.BatchNorm2d(3))
        with torch.no_grad():
            model[2].running_mean.uniform_(-1, 1)
            model[2].running_var.uniform_(0.5, 2)
    with torch.no_grad():
        model[0].weight[REMOVED] = FACTOR * model[0].weight[PARTNER]
        model[0].bias[REMOVED] = FACTOR * model[0].bias[PARTNER] + 0.7
    return model.eval()


@pytest.mark.parametrize("consumer", ["linear", "conv+bn"])
def test_intercept_folds_a_constant_offset_exactly(consumer):
    errors = {}
    for intercept in (True, False):
        model, x = _affine_copy_model(consumer), inputs()
        reference = model(x)
        graph = build_dependency_graph(model, x[:1])
        (group,) = [g for g in channel_groups(model, graph) if g.key == "0"]
        grams = consumer_grams(model, [(x, None)], [group])
        merge_group(group, torch.tensor([REMOVED]), torch.zeros(5), grams, "least_squares", "coupled", "activations",
                    0.0, norms_after(model), intercept=intercept)
        remove_channels(graph, group, [REMOVED])
        errors[intercept] = float((model(x) - reference).abs().max().detach())
    assert errors[True] <= 1e-5 < 1e-3 < errors[False]


def test_greedy_removal_drops_removed_channels_without_changing_a_bit():
    """Against the same OBS steps on the full matrices (removed rows and columns kept as zeros)."""
    from camphive.pruning.structured.saliency import _marginal_costs, _remove, _states, _unfolded_cost

    _, _, _, group, grams = _mlp_group()
    states = [(inverse.clone(), products.clone()) for inverse, products in _states(group, grams, 0.01)]
    base, alive, expected_order, expected_marginal = _unfolded_cost(group, grams), torch.ones(6, dtype=torch.bool), [], []
    for _ in range(6):
        cost = base + _marginal_costs(states)
        chosen = int(torch.argmin(torch.where(alive, cost, torch.full_like(cost, float("inf")))))
        expected_order.append(chosen)
        expected_marginal.append(cost[chosen])
        alive[chosen] = False
        for inverse, products in states:
            _remove(inverse, products, chosen)
    order, marginal = greedy_obs_removal(group, grams, damping=0.01)
    assert order.tolist() == expected_order and torch.equal(marginal, torch.stack(expected_marginal))


def test_obs_step_matches_the_explicit_fold_at_every_position():
    """``_remove`` (in place, batched over flatten positions) against the fold written out: the
    consumer's weights ``W <- W - w_c r^T`` with ``r = G^-1[c] / G^-1[c, c]``, its products ``W^T W``
    recomputed from them, and ``G^-1`` downdated by the same pivot; channel c's row and column zero."""
    from camphive.pruning.structured.saliency import _remove

    generator = torch.Generator().manual_seed(3)
    positions, outputs, size, chosen = 3, 4, 5, 2
    activations = torch.randn(positions, 40, size, dtype=torch.float64, generator=generator)
    inverse = torch.linalg.inv(activations.transpose(1, 2) @ activations / 40)
    weights = torch.randn(positions, outputs, size, dtype=torch.float64, generator=generator)
    products = weights.transpose(1, 2) @ weights
    row = inverse[:, chosen, :] / inverse[:, chosen, chosen, None]
    folded = weights - weights[:, :, chosen, None] * row[:, None, :]
    expected_products = folded.transpose(1, 2) @ folded
    expected_inverse = inverse - inverse[:, :, chosen, None] * row[:, None, :]
    for matrix in (expected_products, expected_inverse):
        matrix[:, chosen, :] = 0
        matrix[:, :, chosen] = 0
    _remove(inverse, products, chosen)
    assert torch.allclose(products, expected_products, rtol=1e-12, atol=1e-12)
    assert torch.allclose(inverse, expected_inverse, rtol=1e-12, atol=1e-12)
    assert float(folded[:, :, chosen].abs().max()) < 1e-12  # the fold empties the removed channel's column
