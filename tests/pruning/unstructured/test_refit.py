"""The refit after the last cycle: least squares to the unpruned model's layer outputs, layer after layer.

References are closed forms in float64: per output unit, ``min |X_S w_S + b - y|^2 + lam |w_S - w0_S|^2``
over the unit's kept inputs S (``lam`` the damping, a fraction of the mean diagonal of the centred Gram).
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from camphive.errors import ConfigError
from camphive.pruning import prune
from camphive.pruning.core.unit_curvature import ReconstructionCurvature
from camphive.pruning.unstructured.merging import least_squares_merge
from camphive.pruning.unstructured.refit import refit_layers

DAMPING = 0.01


def reference_fit(inputs, targets, weights, kept, bias: bool, damping: float = DAMPING):
    """``(weights, bias)`` fitted per unit in float64; ``inputs`` (n, d), ``targets`` (n, units)."""
    inputs, targets, weights = inputs.double(), targets.double(), weights.double()
    mean_x = inputs.mean(0) if bias else torch.zeros(inputs.shape[1], dtype=torch.float64)
    mean_y = targets.mean(0) if bias else torch.zeros(targets.shape[1], dtype=torch.float64)
    centred, centred_y = inputs - mean_x, targets - mean_y
    gram, cross = centred.T @ centred / len(inputs), centred.T @ centred_y / len(inputs)
    shift = damping * gram.diagonal().mean()
    fitted = torch.zeros_like(weights)
    for unit in range(weights.shape[0]):
        chosen = kept[unit].nonzero().squeeze(1)
        system = gram[chosen][:, chosen] + shift * torch.eye(len(chosen), dtype=torch.float64)
        fitted[unit, chosen] = torch.linalg.solve(system, cross[chosen, unit] + shift * weights[unit, chosen])
    return fitted, mean_y - fitted @ mean_x


@pytest.mark.parametrize("solver", ["direct", "cg"])
def test_merge_correction_fits_a_target_output(solver):
    """With ``e = E[x (y - x^T w)]`` the merge lands on the damped least-squares fit of y on the kept inputs, on
    the kept side (units keeping few) and on the complement side (units keeping most) alike."""
    generator = torch.Generator().manual_seed(0)
    samples, fan_in, units = 400, 12, 6
    inputs = torch.randn(samples, fan_in, generator=generator, dtype=torch.float64) @ torch.randn(
        fan_in, fan_in, generator=generator, dtype=torch.float64)
    targets = torch.randn(samples, units, generator=generator, dtype=torch.float64)
    weights = torch.randn(units, fan_in, generator=generator, dtype=torch.float64)
    kept = torch.rand(units, fan_in, generator=generator) < torch.linspace(0.2, 0.9, units)[:, None]
    kept[:, 0] = True
    pruned_now = ~kept & (torch.rand(units, fan_in, generator=generator) < 0.5)
    weights[~kept & ~pruned_now] = 0  # pruned in an earlier cycle
    gram = inputs.T @ inputs / samples
    correction = (targets.T @ inputs / samples - weights @ gram) * kept
    merged = weights.clone()
    least_squares_merge(merged, ReconstructionCurvature({"w": gram}, DAMPING), "w", pruned_now, kept, solver=solver,
                        correction=correction)
    expected, _ = reference_fit(inputs, targets, weights, kept, bias=False)
    tolerance = 1e-9 if solver == "direct" else 2e-2
    assert torch.allclose(merged, expected, atol=tolerance * expected.abs().max(), rtol=0)
    assert (merged[~kept] == 0).all()


def _masked_copy(model: nn.Module, fraction: float, seed: int = 0) -> tuple[nn.Module, dict]:
    generator = torch.Generator().manual_seed(seed)
    pruned, alive = copy.deepcopy(model), {}
    for name, parameter in pruned.named_parameters():
        if name.endswith("weight") and parameter.ndim > 1:
            alive[name] = torch.rand(parameter.shape, generator=generator) > fraction
            alive[name].reshape(parameter.shape[0], -1)[:, 0] = True
            parameter.data[~alive[name]] = 0
    return pruned, alive


def _batches(shape, count=3, size=40, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, *shape, generator=generator), torch.zeros(size, dtype=torch.long)) for _ in range(count)]


def test_refit_of_linear_layers_is_sequential_and_exact():
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 5, bias=False), nn.Tanh(), nn.Linear(5, 3))
    pruned, alive = _masked_copy(dense, 0.6)
    before = {name: parameter.detach().clone() for name, parameter in pruned.named_parameters()}
    batches = _batches((10,))
    record = refit_layers(pruned, dense, batches, alive, DAMPING)
    assert record["layers"] == 3
    inputs = torch.cat([x for x, _ in batches])
    seen = inputs  # the pruned model's input to each layer, earlier layers refitted
    for index in (0, 2, 4):
        layer = pruned[index]
        target = dense[: index + 1](inputs)
        weight, bias = reference_fit(seen, target, before[f"{index}.weight"], alive[f"{index}.weight"],
                                     bias=layer.bias is not None)
        assert torch.allclose(layer.weight.double(), weight, atol=1e-5)
        if layer.bias is not None:
            assert torch.allclose(layer.bias.double(), bias, atol=1e-5)
        assert (layer.weight[~alive[f"{index}.weight"]] == 0).all()
        seen = pruned[: index + 2](inputs) if index < 4 else None


@pytest.mark.parametrize("groups,padding_mode", [(1, "zeros"), (2, "zeros"), (1, "reflect")])
def test_refit_of_a_convolution_matches_its_im2col_least_squares(groups, padding_mode):
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=groups, padding_mode=padding_mode),
                          nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 3))
    pruned, alive = _masked_copy(dense, 0.5)
    before = pruned[0].weight.detach().clone()
    batches = _batches((4, 8, 8))
    refit_layers(pruned, dense, batches, alive, DAMPING)
    inputs = torch.cat([x for x, _ in batches])
    padded = F.pad(inputs, (1, 1, 1, 1), mode="constant" if padding_mode == "zeros" else padding_mode)
    patches = F.unfold(padded, 3, stride=2).transpose(1, 2)  # (n, positions, 4 * 9)
    targets = dense[0](inputs).permute(0, 2, 3, 1).reshape(-1, 6)
    per_group = 6 // groups
    for group in range(groups):
        columns = slice(group * 36 // groups, (group + 1) * 36 // groups)
        units = slice(group * per_group, (group + 1) * per_group)
        weight, bias = reference_fit(patches[..., columns].reshape(-1, 36 // groups), targets[:, units],
                                     before.reshape(6, -1)[units], alive["0.weight"].reshape(6, -1)[units], bias=True)
        assert torch.allclose(pruned[0].weight.reshape(6, -1)[units].double(), weight, atol=1e-5)
        assert torch.allclose(pruned[0].bias[units].double(), bias, atol=1e-5)


def test_refit_of_an_unpruned_model_against_itself_changes_nothing():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 7, 2))
    alive = {name: torch.ones_like(parameter, dtype=torch.bool) for name, parameter in model.named_parameters()
             if parameter.ndim > 1}
    batches = _batches((3, 7))
    expected = torch.cat([model(x) for x, _ in batches])
    refit_layers(model, copy.deepcopy(model), batches, alive, DAMPING)
    assert torch.allclose(torch.cat([model(x) for x, _ in batches]), expected, atol=1e-5)


def test_a_reference_of_another_architecture_is_refused():
    model = nn.Sequential(nn.Linear(4, 3))
    alive = {"0.weight": torch.ones(3, 4, dtype=torch.bool)}
    with pytest.raises(ConfigError, match="reference model has no Linear '0'"):
        refit_layers(model, nn.Sequential(nn.Linear(5, 3)), _batches((4,)), alive, DAMPING)


def test_prune_with_refit_keeps_its_masks_and_lowers_the_output_error():
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    batches = [(x, torch.randint(0, 4, (x.shape[0],))) for x, _ in _batches((2, 6, 6), count=4, size=32)]
    dense.eval()
    with torch.no_grad():
        dense(batches[0][0])
    inputs = torch.cat([x for x, _ in batches])
    errors = {}
    for refit in (False, True):
        model = copy.deepcopy(dense)
        result = prune(model, batches, sparsity=0.7, refit=refit, recalibrate_bn=False)
        for name, parameter in model.named_parameters():
            if name in result.masks:
                assert (parameter[~result.masks[name]] == 0).all()
        with torch.no_grad():
            errors[refit] = float((model.eval()(inputs) - dense(inputs)).pow(2).mean())
        assert ("refit" in result.extra) == refit
    assert errors[True] < errors[False]


def _matching_rows(pruned: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """The dense row each pruned row was sliced from (rows compared on the columns both have)."""
    columns = pruned.shape[1]
    found = [next(i for i in range(dense.shape[0]) if torch.equal(dense[i, :columns], row)) for row in pruned]
    return torch.as_tensor(found)


def _structured_net() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 6, 3, padding=1),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4))
    with torch.no_grad():
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 2.0)
    return net.eval()


def test_structured_refit_fits_each_layer_to_the_reference_channels_it_kept():
    """Channels removed without merges, then each layer refitted in order: layer by layer the im2col least squares
    of the reference's outputs at the kept channels (found by matching the sliced weights) on the refitted model's
    inputs; the classifier to all the reference's logits."""
    dense = _structured_net()
    batches = _batches((2, 5, 5))
    options = dict(mode="structured", sparsity=0.5, merge="none", recalibrate_bn=False, measure_latency=False,
                   round_to=1, criterion="magnitude")
    as_pruned, refitted = copy.deepcopy(dense), copy.deepcopy(dense)
    prune(as_pruned, batches, **options)
    result = prune(refitted, batches, refit=True, **options)
    assert result.extra["refit"]["layers"] == 3
    rows_first = _matching_rows(as_pruned[0].weight.flatten(1), dense[0].weight.flatten(1))
    rows_second = _matching_rows(as_pruned[3].weight[:, :, 0, 0], dense[3].weight[:, rows_first, 0, 0])
    assert len(rows_first) == 4 and len(rows_second) == 3
    inputs = torch.cat([x for x, _ in batches])
    with torch.no_grad():
        for index, rows in ((0, rows_first), (3, rows_second), (7, None)):
            layer, seen = refitted[index], refitted[:index](inputs)
            target = dense[: index + 1](inputs)
            target = target if rows is None else target[:, rows]
            if isinstance(layer, nn.Conv2d):
                seen = F.unfold(seen, 3, padding=1).transpose(1, 2).reshape(-1, layer.weight[0].numel())
                target = target.permute(0, 2, 3, 1).reshape(-1, target.shape[1])
            start = as_pruned[index].weight.flatten(1)
            weight, bias = reference_fit(seen, target, start, torch.ones_like(start, dtype=torch.bool), bias=True)
            # the pooled features have large means and a small spread: centring from sums loses a few digits there
            tolerance = 1e-4 if index == 7 else 1e-5
            assert torch.allclose(layer.weight.flatten(1).double(), weight, atol=tolerance)
            assert torch.allclose(layer.bias.double(), bias, atol=tolerance)
        assert torch.equal(refitted[1].running_mean, as_pruned[1].running_mean)  # BN statistics left as they were


def test_structured_refit_lowers_the_output_error_of_a_residual_net():
    from camphive import models

    torch.manual_seed(0)
    dense = models.create("resnet20", num_classes=4, in_channels=1).eval()
    batches = [(x, torch.randint(0, 4, (x.shape[0],))) for x, _ in _batches((1, 12, 12), count=2, size=24)]
    with torch.no_grad():
        dense.train()
        for x, _ in batches:
            dense(x)  # BatchNorm statistics of these images, not of the initialisation
        dense.eval()
        expected = torch.cat([dense(x) for x, _ in batches])
    errors = {}
    for refit in (False, True):
        model = copy.deepcopy(dense)
        result = prune(model, batches, mode="structured", target_macs_ratio=2.0, refit=refit, measure_latency=False,
                       latency_aware=False)
        assert result.extra["macs_ratio"] > 1.8
        with torch.no_grad():
            errors[refit] = float((torch.cat([model(x) for x, _ in batches]) - expected).pow(2).mean())
    assert errors[True] < 0.5 * errors[False]


def test_structured_refit_refuses_a_reference_of_another_architecture():
    reference = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                              nn.Linear(3, 4))
    with pytest.raises(ConfigError, match="reference model has no Conv2d '0' with the 4 output channels"):
        prune(_structured_net(), _batches((2, 5, 5)), mode="structured", sparsity=0.5, refit=True,
              measure_latency=False, round_to=1, reference=reference)


def test_a_resumed_structured_refit_without_its_reference_is_refused():
    with pytest.raises(ConfigError, match="unpruned model as reference"):
        prune(_structured_net(), _batches((2, 5, 5)), mode="structured", sparsity=0.5, refit=True,
              measure_latency=False, start_cycle=1, resume_state={"kept": {}})


def test_one_pass_and_stopped_forwards_refit_a_residual_net_alike(monkeypatch):
    """The one-pass refit (both models' traced graphs evaluated node by node over all batches) and the forwards
    stopped at each layer read the same inputs and targets, so they refit every layer to the same weights."""
    from camphive import models
    from camphive.pruning.unstructured import refit

    torch.manual_seed(0)
    dense = models.create("resnet20", num_classes=4, in_channels=1).eval()
    pruned, alive = _masked_copy(dense, 0.7)
    batches = _batches((1, 10, 10), count=2, size=16)
    by_pass = copy.deepcopy(pruned)
    record = refit_layers(by_pass, dense, batches, alive, DAMPING)
    monkeypatch.setattr(refit, "ONE_PASS", False)
    by_layer = copy.deepcopy(pruned)
    fallback = refit_layers(by_layer, dense, batches, alive, DAMPING)
    assert record["passes"] == "one forward of each model" and fallback["passes"] == "stopped forwards per layer"
    assert record["layers"] == fallback["layers"] == len(alive)
    for (name, fitted), (_, expected) in zip(by_pass.named_parameters(), by_layer.named_parameters()):
        assert torch.allclose(fitted, expected, atol=1e-5), name
    assert any(not torch.equal(a, b) for a, b in zip(by_pass.parameters(), pruned.parameters()))


def test_activations_over_the_budget_refit_the_first_layers_on_the_batches_that_fit(monkeypatch):
    """With a budget that the frontier of all batches passes in the first layers, the pass takes one batch through
    them and the other batches join where all fit: the layers before that point are refitted exactly as a refit on
    the first batch alone, the others exactly as a refit on all batches of the model so refitted."""
    from camphive import models
    from camphive.pruning.unstructured import refit
    from camphive.pruning.unstructured.refit_graph import LockstepGraphs, frontier_profile, plan_pass

    torch.manual_seed(0)
    dense = models.create("resnet20", num_classes=4, in_channels=1).eval()
    pruned, alive = _masked_copy(dense, 0.7)
    batches = _batches((1, 10, 10), count=3, size=8)
    graphs = LockstepGraphs(copy.deepcopy(pruned), dense)
    profile = frontier_profile(graphs, batches)
    budget = max(profile[len(profile) // 2:]) * 24  # all 24 samples fit from the middle on, not at the start
    first, switch = plan_pass(profile, batches, budget)
    assert first == 1 and 0 < switch <= len(profile) // 2
    position = {node.target: index for index, (node, _) in enumerate(graphs.nodes) if node.op == "call_module"}
    early = {name: mask for name, mask in alive.items() if position[name.rpartition(".")[0]] < switch}
    assert 0 < len(early) < len(alive)

    expected = copy.deepcopy(pruned)
    refit_layers(expected, dense, batches[:1], early, DAMPING)
    refit_layers(expected, dense, batches, {name: mask for name, mask in alive.items() if name not in early}, DAMPING)
    monkeypatch.setattr(refit, "FRONTIER_BUDGET", budget)
    record = refit_layers(pruned, dense, batches, alive, DAMPING)
    assert record["first_layers"] == {"layers": len(early), "samples": 8, "samples_of": 24}
    assert record["passes"] == "one forward of each model" and record["layers"] == len(alive)
    for (name, fitted), (_, wanted) in zip(pruned.named_parameters(), expected.named_parameters()):
        assert torch.allclose(fitted, wanted, atol=1e-5), name


class _BranchesOnData(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.first, self.second = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, inputs):
        hidden = self.first(inputs)
        return self.second(hidden.relu() if hidden.sum() > 0 else hidden.tanh())


def test_a_model_torch_fx_cannot_trace_is_refitted_by_stopped_forwards():
    torch.manual_seed(0)
    dense = _BranchesOnData()
    pruned, alive = _masked_copy(dense, 0.5)
    before = pruned.first.weight.detach().clone()
    batches = _batches((6,))
    record = refit_layers(pruned, dense, batches, alive, DAMPING)
    assert record == {**record, "layers": 2, "passes": "stopped forwards per layer"}
    inputs = torch.cat([x for x, _ in batches])
    weight, bias = reference_fit(inputs, dense.first(inputs), before, alive["first.weight"], bias=True)
    assert torch.allclose(pruned.first.weight.double(), weight, atol=1e-5)
    assert torch.allclose(pruned.first.bias.double(), bias, atol=1e-5)


def test_inputs_whose_mean_dwarfs_their_spread_are_refitted_not_refused():
    """Pooled features before a classifier: the centred Gram, from float32 products, loses its smallest
    eigenvalues below zero; they are clipped, and the fit still lands (it used to stop the refit in Cholesky)."""
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(64, 3))
    pruned, alive = _masked_copy(dense, 0.5)
    generator = torch.Generator().manual_seed(1)
    offset = torch.rand(64, generator=generator) * 100
    batches = [(offset + 0.1 * torch.randn(20, 64, generator=generator), torch.zeros(20, dtype=torch.long))
               for _ in range(2)]
    inputs = torch.cat([x for x, _ in batches])
    with torch.no_grad():
        before = float((pruned(inputs) - dense(inputs)).pow(2).mean())
        refit_layers(pruned, dense, batches, alive, DAMPING)
        after = float((pruned(inputs) - dense(inputs)).pow(2).mean())
    assert torch.isfinite(pruned[0].weight).all() and (pruned[0].weight[~alive["0.weight"]] == 0).all()
    assert after < 1e-3 * before


def test_the_one_pass_memory_estimate_counts_the_values_a_later_node_still_reads():
    """Linear(4, 8) -> ReLU -> Linear(8, 3): the peak is at the ReLU, whose input and output (8 + 8 floats per
    sample) are both held; the input (4) was freed after the first layer read it. Both models, all samples."""
    from camphive.pruning.unstructured.refit_graph import LockstepGraphs, frontier_bytes

    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    batches = [(torch.randn(10, 4), None), (torch.randn(6, 4), None)]
    assert frontier_bytes(LockstepGraphs(model, copy.deepcopy(model)), batches) == 2 * (8 + 8) * 4 * 16


def test_a_model_without_conv_or_linear_layers_to_refit_is_left_as_it_is():
    model = nn.Sequential(nn.Flatten(), nn.ReLU())
    record = refit_layers(model, copy.deepcopy(model), _batches((4,)), {}, DAMPING)
    assert record["layers"] == 0
