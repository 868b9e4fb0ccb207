"""Unstructured pruning by layer solvers (SparseGPT, OBC): one cycle of :class:`~camphive.pruning.unstructured.
prune.UnstructuredRun` with a :class:`~camphive.pruning.criteria.LayerSolverCriterion`.

1. **Counts per layer** (entries pruned in all after the cycle, those pruned before included), per
   group of a grouped convolution: ``selection="layer"`` (the solvers' default, as in their papers)
   prunes every layer to the cycle's target, ``round(target * numel)``, split over its groups in
   proportion to their alive entries; ``selection="global"`` takes each layer's and group's count
   from CAMP-HiVe's global selection with its default scores (``1/2 w^2 G_jj (gamma/sigma)^2``).
   Both keep every layer's ``min_keep`` floor. With an N:M ``pattern`` every group of m loses its
   share of n instead, in the layout of :mod:`~camphive.pruning.unstructured.patterns` (layers it
   does not fit stay dense).
2. **Layers in forward order**, each solved on ``G = E[x x^T]`` of its own inputs gathered on the
   model with the layers before it already solved (sequential, SparseGPT's order; the forward
   stops once the layer has its inputs, unless the layer runs more than once per forward), then
   ``solve_layer(W_g, G_g, count_g, alive_g, pattern)`` per group g, which picks the entries and
   updates the kept ones (the solver's own merge; ``merge`` other than "none" is refused).

The weights are written in place; the run masks them. The cycle's record gains ``solver``: the
layers solved, their counts and seconds, and the seconds spent gathering Grams.
"""
from __future__ import annotations

import time

import torch
from torch import nn

from camphive.curvature.reconstruction import layer_input_covariances
from camphive.errors import ConfigError
from camphive.modules import eval_mode
from camphive.pruning.core.unit_curvature import unit_matrix
from camphive.pruning.criteria import canonical_name, is_layer_solver, make_criterion
from camphive.pruning.unstructured.defaults import DEFAULTS
from camphive.pruning.unstructured.selection import check_target_reachable, select_to_prune

SOLVER_SELECTIONS = ("layer", "global")


def default_selection(criterion) -> str:
    """The measured or published default per criterion: "unit" for Wanda (its paper compares within
    each output unit), "layer" for the layer solvers (uniform per layer, as in their papers), else "global"."""
    if is_layer_solver(criterion):
        return "layer"
    return "unit" if canonical_name(criterion) == "wanda" else "global"


def check_solver_settings(settings) -> None:
    """The options a layer solver refuses, each in one line."""
    name = canonical_name(settings.criterion)
    if settings.merge not in (None, "none"):
        raise ConfigError(f"criterion {name} updates the kept weights itself (that is its merge); drop "
                          f"merge={settings.merge!r} or pass merge='none'")
    if settings.selection not in SOLVER_SELECTIONS:
        raise ConfigError(f"criterion {name} takes selection 'layer' (uniform per layer) or 'global' (counts from "
                          f"CAMP-HiVe's global selection), got {settings.selection!r}")


def solve_layers(run, target: float, info) -> tuple[dict[str, torch.Tensor], dict]:
    """Prune every layer of ``run`` (an UnstructuredRun) to this cycle's count with its criterion's
    ``solve_layer``, in place; returns ``({name: bool, alive entries pruned now}, {"solver": record})``."""
    criterion, settings, model = run.criterion, run.settings, run.model
    modules = {name: model.get_submodule(name.rpartition(".")[0]) for name in run.params}
    for name, parameter in run.params.items():
        criterion.check_layer(name, parameter.shape[0], unit_matrix(parameter).shape[1])
    layout = _pattern_layout(model, run.params, settings)
    counts = {} if layout else layer_counts(run.params, modules, run.alive, target, info, settings)
    fraction = target / settings.sparsity if settings.sparsity else 0.0
    order, repeated = forward_order(model, modules, info.batches[0][0][:1])
    pruned_now = {name: torch.zeros_like(mask) for name, mask in run.alive.items()}
    record = {"criterion": criterion.name, "selection": settings.selection, "layers": {}, "gram_seconds": 0.0}
    for name in order:
        if layout:
            if name not in layout.columns:
                continue
            task = _PatternTask(layout.columns[name], _pattern_count(layout.n, fraction), layout.m)
            if task.pattern[0] == 0:
                continue  # this cycle's share of n is still zero
        elif int(counts[name].sum()) == int((~run.alive[name]).sum()):
            continue  # nothing new to prune in this layer
        else:
            task = None
        started = time.perf_counter()
        grams = _layer_grams(model, name, modules[name], info, criterion.sequential, repeated)
        record["gram_seconds"] += time.perf_counter() - started
        started = time.perf_counter()
        pruned_now[name] = _solve_one(criterion, run.params[name], run.alive[name], grams, counts.get(name), task, name)
        record["layers"][name] = {"pruned": int((~run.alive[name] | pruned_now[name]).sum()),
                                  "seconds": time.perf_counter() - started}
    info.seconds["solver_grams"] = info.seconds.get("solver_grams", 0.0) + record["gram_seconds"]
    record["layers_solved"] = len(record["layers"])
    record["solve_seconds"] = sum(layer["seconds"] for layer in record["layers"].values())
    return pruned_now, {"solver": record}


def layer_counts(params, modules, alive, target: float, info, settings) -> dict[str, torch.Tensor]:
    """``{name: (groups,) long}``: entries of each group's rows pruned in all once the cycle is done.

    ``selection="global"``: counted from CAMP-HiVe's global selection (its default weight scores);
    ``"layer"``: ``round(target * numel)`` per layer, split over its groups in proportion to their
    alive entries (cumulative rounding). Both respect the ``min_keep`` floors (or refuse the target).
    """
    if settings.selection == "global":
        scorer = make_criterion("camp-hive", **{key: DEFAULTS[key] for key in ("score", "curvature", "loss_weighting")})
        chosen = select_to_prune(scorer.scores(info), alive, target, "global", settings.min_keep)
        return {name: _per_group(chosen[name] | ~alive[name], modules[name]) for name in params}
    check_target_reachable(alive, target, "layer", settings.min_keep)
    counts = {}
    for name in params:
        dead = _per_group(~alive[name], modules[name])
        to_prune = max(round(target * alive[name].numel()) - int(dead.sum()), 0)
        counts[name] = dead + split_in_proportion(_per_group(alive[name], modules[name]), to_prune)
    return counts


def split_in_proportion(sizes: torch.Tensor, total: int) -> torch.Tensor:
    """``total`` split over parts in proportion to ``sizes (parts,)``, rounded cumulatively so the parts add up
    to ``total`` exactly and none exceeds its size (``total <= sizes.sum()``)."""
    cumulative = torch.cat([torch.zeros(1, dtype=torch.long), sizes.long().cumsum(0)])
    whole = int(cumulative[-1])
    if whole == 0:
        return torch.zeros_like(sizes, dtype=torch.long)
    return ((2 * total * cumulative + whole) // (2 * whole)).diff()


def _per_group(mask: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """``(groups,)``: True entries of ``mask`` in each conv group's rows (one group for other layers)."""
    return unit_matrix(mask).reshape(int(getattr(module, "groups", 1)), -1).sum(1).cpu()


class _PatternTask:
    """An N:M solve: ``columns (groups, m)`` of the layout, ``n`` pruned per group this cycle."""

    def __init__(self, columns: torch.Tensor, n: int, m: int):
        self.order = columns.flatten().cpu()  # unit-matrix columns with each group's m side by side
        self.pattern = (n, m)


def _pattern_layout(model, params, settings):
    if getattr(settings, "pattern", None) is None:
        return None
    from camphive.pruning.unstructured.patterns import pattern_layout

    return pattern_layout(model, params, settings.pattern)


def _pattern_count(n: int, fraction: float) -> int:
    from camphive.pruning.unstructured.patterns import per_group_count

    return per_group_count(n, fraction)


@torch.no_grad()
def _solve_one(criterion, parameter, alive, grams, counts, task, name) -> torch.Tensor:
    """Solve one layer group by group (in place); returns its alive entries pruned now."""
    matrix = unit_matrix(parameter.data).clone()
    live = unit_matrix(alive)
    kept = live.clone()
    rows_per_group = matrix.shape[0] // grams.shape[0]
    for group, gram in enumerate(grams):
        rows = slice(group * rows_per_group, (group + 1) * rows_per_group)
        if task is None and int(counts[group]) == int((~live[rows]).sum()):
            continue  # this group has nothing new to prune
        if task is None:
            new, group_kept = criterion.solve_layer(matrix[rows], gram, int(counts[group]), live[rows], None,
                                                    layer=name)
        else:  # the solvers' N:M groups are m consecutive columns: permute the layout's groups next to each other
            order = task.order.to(matrix.device)
            new, group_kept = criterion.solve_layer(matrix[rows][:, order], gram[order][:, order], None,
                                                    live[rows][:, order], task.pattern, layer=name)
            new, group_kept = _unpermuted(new, order), _unpermuted(group_kept, order)
        matrix[rows] = new.to(matrix)
        kept[rows] = group_kept.to(kept.device).reshape(kept[rows].shape)
    parameter.data.copy_(matrix.reshape(parameter.shape))
    return (live & ~kept).reshape(alive.shape)


def _unpermuted(permuted: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    result = torch.empty_like(permuted)
    result[:, order.to(permuted.device)] = permuted
    return result


class _InputsSeen(Exception):
    """Raised once the layer being gathered has run: the rest of the forward is not needed."""


def _stop_forward(module, args, output):
    raise _InputsSeen


class _UntilInputsSeen(nn.Module):
    """Runs ``model`` and ends its forward quietly where a hook raises :class:`_InputsSeen`."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, inputs):
        try:
            return self.model(inputs)
        except _InputsSeen:
            return None


def _layer_grams(model, name, module, info, sequential: bool, repeated: set) -> torch.Tensor:
    """``(groups, fan_in, fan_in)``: the layer's ``G`` on the model as it is now (``sequential``), or as the cycle
    found it (``info.covariances()``)."""
    if not sequential:
        return info.covariances()[name]
    layer = name.rpartition(".")[0]
    handle = None if layer in repeated else module.register_forward_hook(_stop_forward)
    try:
        found = layer_input_covariances(_UntilInputsSeen(model), info.batches, layers={layer: module})
    finally:
        if handle is not None:
            handle.remove()
    return found[layer].dense()


def forward_order(model: nn.Module, modules: dict[str, nn.Module], inputs: torch.Tensor) -> tuple[list[str], set]:
    """``(parameter names in the order the forward first runs their layers, layer names run more than once)``.

    One forward of ``inputs`` (eval mode, no gradients); layers it never runs come last, in ``modules``' order.
    """
    calls: list[str] = []

    def recorder(name):
        return lambda module, args: calls.append(name)

    handles = [module.register_forward_pre_hook(recorder(name)) for name, module in modules.items()]
    weight = next(iter(modules.values())).weight
    inputs = inputs.to(weight.device, weight.dtype) if inputs.is_floating_point() else inputs.to(weight.device)
    try:
        with torch.no_grad(), eval_mode(model):
            model(inputs)
    finally:
        for handle in handles:
            handle.remove()
    first_seen = list(dict.fromkeys(calls))
    order = first_seen + [name for name in modules if name not in first_seen]
    repeated = {name.rpartition(".")[0] for name in first_seen if calls.count(name) > 1}
    return order, repeated
