"""Refit each layer's kept weights to the unpruned model's outputs, layer after layer, masks fixed.

A cycle's merges fit every layer to its own output before the cycle, all layers at once, on the inputs
the model had then: what earlier layers lost is never made up for, and it adds up with depth. The refit
(``refit=True``, after the last cycle) walks the layers in the order the model runs them. For layer l
it reads, over the calibration batches, the pruned model's inputs ``x`` (earlier layers refitted
already) and the reference model's output ``y`` of the same layer on the same images, and solves per
output unit, with its mask fixed,

    min over w_S, b of  E[(x_S^T w_S + b - y)^2] + damping * |w_S - w_S(before)|^2

(``b``: only where the layer has a bias). This is :func:`least_squares_merge` with nothing pruned and
the correction ``e = Cov(x, y) - Cov(x, x) w``, on the Gram ``Cov(x, x)`` damped as the merges damp
it; then ``b = E[y] - E[x]^T w``. Layers are refitted one after the other, never at once: each layer
corrects for the errors of the layers before it, so refitting them together would correct the same
error twice (measured: accuracy falls apart).

How the statistics are read: where both models trace with ``torch.fx``, in ONE forward pass of each model,
evaluated node by node over the calibration batches together, each layer refitted when the pass reaches it
(:mod:`~camphive.pruning.unstructured.refit_graph`). The activations held stay within ``FRONTIER_BUDGET``
bytes: where those of all batches would not fit, the first layers (where activations are large) are refitted on
as many batches as fit, and the layers from the first point where all batches fit on all of them. A model that
does not trace is read from forwards of both models stopped at each layer in turn, about ``L / 2`` forward passes
of each for ``L`` layers. Either way one Gram and one weight-gradient-shaped product per layer, and one more
copy of the model's weights for the reference. A layer called more than once in a forward is refitted on its
first call (the later calls use the refitted weights). Under torchrun the statistics are summed over processes.

With channels removed (structured pruning) ``rows`` names, for each layer, the reference's output
channels it still produces; every weight is kept (``alive`` all true).
"""
from __future__ import annotations

import logging
import time

import torch
from torch import nn

from camphive.curvature.gram import GramSums, padded_2d
from camphive.distributed import all_reduce_int, all_reduce_tensors
from camphive.errors import ConfigError
from camphive.pruning.core.unit_curvature import ReconstructionCurvature, unit_matrix
from camphive.pruning.unstructured.layer_solvers import forward_order
from camphive.pruning.unstructured.merging import least_squares_merge
from camphive.pruning.unstructured.refit_graph import LockstepGraphs, frontier_profile, plan_pass

log = logging.getLogger("camphive.pruning")


REFITTED_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d)  # other layers keep their merged weights
FRONTIER_BUDGET = 4 * 2**30  # bytes of activations the one-pass refit may hold for all batches together
ONE_PASS = True  # False: always the stopped forwards (to compare the two ways)
NOTHING_TO_REFIT = {"layers": 0, "seconds": 0.0, "passes": "none: nothing was pruned"}


class _Reached(Exception):
    """Raised by a hook to stop a forward pass once the layer of interest has been reached."""


@torch.no_grad()
def refit_layers(model: nn.Module, reference: nn.Module, batches, alive: dict[str, torch.Tensor], damping: float,
                 solver: str = "auto", rows: dict[str, torch.Tensor] | None = None) -> dict:
    """Refit the kept weights of the layers whose weights ``alive`` names (``{"<module>.weight": bool mask}``)
    in ``model``, in place; returns ``{"layers": count refitted, "seconds": wall time, "passes": how the
    statistics were read}`` ("one forward of each model" or "stopped forwards per layer"), and where the first
    layers saw fewer batches than the others, ``"first_layers"``: ``{"layers": how many, "samples": how many of
    "samples_of"}``.

    ``rows`` (a model whose channels were removed): ``{module name: int64 indices}``, the reference
    layer's output channels that the layer's outputs are, in order (a layer not named: all of them)."""
    started = time.perf_counter()
    modules = {name: name.rpartition(".")[0] for name in alive}  # "<module>.weight" -> "<module>"
    layers = {name: model.get_submodule(modules[name]) for name in alive}
    layers = {name: layer for name, layer in layers.items() if isinstance(layer, REFITTED_TYPES)}
    rows = {name: rows[modules[name]] for name in layers if modules[name] in (rows or {})}  # by weight name
    references = {name: _same_layer(reference, modules[name], layer, rows.get(name)) for name, layer in layers.items()}

    def fit(name: str, pairs) -> bool:
        """Refit layer ``name`` from its (pruned inputs, reference outputs) per batch; False if it never ran."""
        statistics, kept_rows = _LayerStatistics(layers[name]), rows.get(name)
        channel_dim = -1 if isinstance(layers[name], nn.Linear) else 1  # a linear layer's outputs: the last dim
        for seen, target in pairs:
            statistics.add(seen, target if kept_rows is None else
                           target.index_select(channel_dim, kept_rows.to(target.device)))
        if statistics.cross is None:
            return False  # never run on the calibration batches: nothing to fit
        statistics.solve(name, alive[name], damping, solver)
        log.debug("refit: %s", name)
        return True

    training = model.training, reference.training
    model.eval()
    reference.eval()
    try:
        lockstep = _lockstep_graphs(model, reference, batches) if layers else None
        if lockstep is not None:
            refitted, first_layers = _refit_in_one_pass(*lockstep, batches, layers, fit)
            extra = {"passes": "one forward of each model", **first_layers}
        else:
            extra = {"passes": "stopped forwards per layer"}
            refitted = _refit_by_stopped_forwards(model, reference, batches, layers, references, fit)
    finally:
        model.train(training[0])
        reference.train(training[1])
    return {"layers": refitted, "seconds": time.perf_counter() - started, **extra}


def _lockstep_graphs(model: nn.Module, reference: nn.Module, batches) -> tuple[LockstepGraphs, tuple] | None:
    """Both models' traced graphs and the plan of their pass within ``FRONTIER_BUDGET``, or None where they cannot
    be traced and run alike (on any process under torchrun)."""
    found = None
    if ONE_PASS:
        try:
            graphs = LockstepGraphs(model, reference)
            found = graphs, plan_pass(frontier_profile(graphs, batches), batches, FRONTIER_BUDGET)
        except Exception as error:  # noqa: BLE001 - any tracing failure means: read the layers one by one
            log.info("refit by stopped forwards per layer: the models do not trace alike (%s)", error)
    if not all_reduce_int(int(found is not None), "min"):  # every process reads the layers the same way
        return None
    return found


def _refit_in_one_pass(graphs: LockstepGraphs, plan: tuple[int, int], batches, layers: dict, fit) -> tuple[int, dict]:
    by_module = {name.rpartition(".")[0]: name for name in layers}
    first = plan[0]
    reached: set[str] = set()
    refitted, before_switch = [], []

    def on_layer(module_name: str, inputs: list, targets: list) -> None:
        reached.add(module_name)
        if len(inputs) < len(batches):
            before_switch.append(module_name)
        if fit(by_module[module_name], zip(inputs, targets)):
            refitted.append(module_name)

    graphs.run(batches, on_layer, lambda module_name: module_name in by_module and module_name not in reached,
               plan=plan)
    if not before_switch:
        return len(refitted), {}
    samples = [int(batch[0].shape[0]) for batch in batches]
    log.info("refit: the first %d layers on %d of %d calibration samples (their activations for all would pass "
             "%.1f GiB)", len(before_switch), sum(samples[:first]), sum(samples), FRONTIER_BUDGET / 2**30)
    return len(refitted), {"first_layers": {"layers": len(before_switch), "samples": sum(samples[:first]),
                                            "samples_of": sum(samples)}}


def _refit_by_stopped_forwards(model, reference, batches, layers: dict, references: dict, fit) -> int:
    """Each layer's statistics from forwards of both models stopped at it (any model; about L/2 passes each)."""
    order, _ = forward_order(model, layers, batches[0][0][:1]) if layers else ([], set())
    refitted = 0
    for name in order:
        layer, reference_layer = layers[name], references[name]

        def pairs():
            for inputs, _ in batches:
                seen = _stop_at(model, layer, inputs, output=False)
                if seen is not None:  # a layer this batch never reaches adds nothing
                    yield seen, _stop_at(reference, reference_layer, inputs, output=True)

        refitted += fit(name, pairs())
    return refitted


def _same_layer(reference: nn.Module, module_name: str, layer: nn.Module, kept_rows: torch.Tensor | None) -> nn.Module:
    """The reference's layer of that name, checked to be the same kind and shape (with ``kept_rows``: of at
    least as many outputs, the input width free)."""
    try:
        found = reference.get_submodule(module_name)
    except AttributeError:
        found = None
    if kept_rows is not None:
        fits = type(found) is type(layer) and kept_rows.numel() == layer.weight.shape[0] and (
            kept_rows.numel() == 0 or int(kept_rows.max()) < found.weight.shape[0])
        if not fits:
            raise ConfigError(f"the reference model has no {type(layer).__name__} {module_name!r} with the "
                              f"{kept_rows.numel()} output channels this layer kept; pass the unpruned model "
                              "that was pruned")
        return found
    if type(found) is not type(layer) or found.weight.shape != layer.weight.shape:
        raise ConfigError(f"the reference model has no {type(layer).__name__} {module_name!r} of weight shape "
                          f"{tuple(layer.weight.shape)}; pass the unpruned model of the same architecture")
    return found


def _stop_at(model: nn.Module, layer: nn.Module, inputs: torch.Tensor, output: bool) -> torch.Tensor:
    """``layer``'s input (or output) in a forward of ``model`` on ``inputs``, the forward stopped there (None if
    the forward never runs ``layer``)."""
    found = []

    def capture(module, args, result=None):
        found.append(result if output else args[0])
        raise _Reached

    handle = layer.register_forward_hook(capture) if output else layer.register_forward_pre_hook(capture)
    try:
        model(inputs.to(layer.weight.device))
    except _Reached:
        pass
    finally:
        handle.remove()
    return found[0] if found else None


class _LayerStatistics:
    """Sums over a layer's input rows ``x`` (pruned model) and target outputs ``y`` (reference) for the refit."""

    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer
        self.gram = GramSums(layer)
        self.cross = self.input_sums = self.output_sums = None  # (out, fan_in), (out, fan_in), (out,)

    def add(self, inputs: torch.Tensor, outputs: torch.Tensor) -> None:
        layer = self.layer
        self.gram.add(inputs)
        if isinstance(layer, nn.Linear):
            rows, targets = inputs.reshape(-1, inputs.shape[-1]), outputs.reshape(-1, outputs.shape[-1])
            cross = targets.T @ rows
            input_sums = rows.sum(0).expand(targets.shape[1], -1) if layer.bias is not None else None
            output_sums = targets.sum(0)
        else:
            padded, _, stride, dilation = padded_2d(layer, inputs)
            targets = outputs.unsqueeze(-2) if isinstance(layer, nn.Conv1d) else outputs
            shape = tuple(layer.weight.shape)
            if isinstance(layer, nn.Conv1d):  # as the 2-D convolution of height 1 that padded_2d made of it
                shape = (shape[0], shape[1], 1, shape[2])

            def weight_gradient(gradient):
                return torch.nn.grad.conv2d_weight(padded, shape, gradient, stride=stride, dilation=dilation,
                                                   groups=layer.groups).reshape(shape[0], -1)

            cross = weight_gradient(targets)
            input_sums = weight_gradient(torch.ones_like(targets)) if layer.bias is not None else None
            output_sums = targets.sum((0, 2, 3))
        self.cross = _add(self.cross, cross)
        self.input_sums = _add(self.input_sums, input_sums)
        self.output_sums = _add(self.output_sums, output_sums)

    def solve(self, name: str, alive: torch.Tensor, damping: float, solver: str) -> None:
        """Refit the layer's kept weights (and bias) in place."""
        layer, weight = self.layer, unit_matrix(self.layer.weight.data)
        gram = self.gram.total()
        groups = 1 if isinstance(layer, nn.Linear) else layer.groups
        if gram is None:
            gram = torch.zeros(groups, weight.shape[1], weight.shape[1], dtype=torch.float64, device=weight.device)
        rows = torch.tensor([float(self.gram.rows)], dtype=torch.float64, device=gram.device)
        parts = [gram, self.cross.double(), self.output_sums.double(), rows]
        if self.input_sums is not None:
            parts.append(self.input_sums.double())
        gram, cross, output_sums, rows, *input_sums = all_reduce_tensors(parts)  # one collective under torchrun
        count = max(float(rows), 1.0)
        per_group = weight.shape[0] // groups
        gram, cross = gram / count, cross / count  # E[x x^T], E[y x^T]
        if input_sums:  # centred: the bias absorbs the means
            mean_x, mean_y = input_sums[0] / count, output_sums / count
            firsts = mean_x[::per_group]  # (groups, fan_in): every unit of a group sees the same inputs
            gram = _positive_semidefinite(gram - firsts[:, :, None] * firsts[:, None, :], damping)
            cross = cross - mean_y[:, None] * mean_x
        current = weight.double()
        # E[y x^T] - w E[x x^T] per unit, as Cov(x, y) - Cov(x, x) w once centred (the Gram is symmetric)
        correction = cross - torch.bmm(current.reshape(groups, per_group, -1), gram).reshape(current.shape)
        view = ReconstructionCurvature({name: gram}, damping=damping)
        kept = unit_matrix(alive).to(weight.device)
        least_squares_merge(weight, view, name, torch.zeros_like(kept), kept, solver=solver,
                            correction=correction * kept)
        if input_sums:
            layer.bias.data.copy_((mean_y - (mean_x * weight.double()).sum(1)).to(layer.bias.dtype))


def _positive_semidefinite(gram: torch.Tensor, damping: float) -> torch.Tensor:
    """A centred Gram made safe to factorise once damped: the float32 products it is summed from lose digits
    when the inputs' means dominate their spread (pooled features before a classifier), and the subtraction of
    the means can leave it with negative eigenvalues larger than the damping; those are set to zero."""
    gram = (gram + gram.transpose(-1, -2)) / 2
    scale = gram.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(torch.finfo(gram.dtype).tiny)
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    if not bool(torch.linalg.cholesky_ex(gram + (damping * scale)[:, None, None] * eye).info.any()):
        return gram
    values, vectors = torch.linalg.eigh(gram)
    return (vectors * values.clamp_min(0)[:, None, :]) @ vectors.transpose(-1, -2)


def _add(total: torch.Tensor | None, value: torch.Tensor | None) -> torch.Tensor | None:
    if value is None:
        return total
    value = value.to(torch.float64).contiguous()  # an expanded sum (every unit's input sums) becomes its own copy
    return value if total is None else total.add_(value)

