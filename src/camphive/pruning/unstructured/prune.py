"""Unstructured pruning: CAMP-HiVe and every weight criterion through the one cycle driver.

Each cycle (:func:`camphive.pruning.core.driver.run_cycles`) re-estimates curvature on the
current (partly pruned) model; this mode scores the weights still alive, selects the
lowest-scoring ones up to the cycle's target sparsity (which sets how many each output unit keeps),
re-chooses which ones by forward selection where a unit keeps few, in the last cycle
(``unit_selection="greedy"``),
pairs each pruned weight with a kept partner in its output unit and merges it (or folds it into all
kept weights by least squares), and fixes the masks. Criteria differ only in their scores, so
comparisons between them are fair by construction. The options are
:class:`~camphive.pruning.unstructured.settings.UnstructuredSettings`.
"""
from __future__ import annotations

import copy
import logging
import time
from collections.abc import Mapping

import torch
from torch import nn

from camphive.batches import take_batches
from camphive.errors import ConfigError
from camphive.layers import prunable_parameters
from camphive.pruning.core.checks import check_model_runs, summary_without_layers
from camphive.pruning.core.driver import CycleOutcome, PruningMode, check_finite, run_cycles
from camphive.pruning.core.result import PruneResult
from camphive.pruning.core.sharpness import top_loss_eigenvalues
from camphive.pruning.core.unit_curvature import unit_matrix
from camphive.pruning.criteria import LayerSolverCriterion
from camphive.pruning.settings import resolve_settings
from camphive.pruning.unstructured.greedy_selection import choose_within_units
from camphive.pruning.unstructured.layer_solvers import solve_layers
from camphive.pruning.unstructured.masks import apply_masks, check_masks, sparsity_of
from camphive.pruning.unstructured.merging import least_squares_merge, merge_into_partner, pair_merge
from camphive.pruning.unstructured.pairing import make_pairs
from camphive.pruning.unstructured.patterns import pattern_extra, pattern_layout, select_pattern
from camphive.pruning.unstructured.recovery import recover
from camphive.pruning.unstructured.refit import NOTHING_TO_REFIT, refit_layers
from camphive.pruning.unstructured.selection import check_target_reachable, cycle_targets, select_to_prune
from camphive.pruning.unstructured.settings import UnstructuredSettings

log = logging.getLogger("camphive.pruning")


def prune_unstructured(model: nn.Module, calib_data, sparsity: float | None = None, *,
                       settings: UnstructuredSettings | None = None, masks: Mapping[str, torch.Tensor] | None = None, loss_fn=None, example_inputs=None,
                       start_cycle: int = 0, on_cycle_end=None, reference: nn.Module | None = None,
                       **options) -> PruneResult:
    """Prune single weights of ``model`` in place; return a :class:`PruneResult` (``mode="unstructured"``).

    ``sparsity`` and the other keyword ``options`` (e.g. ``criterion="magnitude"``), or ``settings``:
    see :class:`UnstructuredSettings`. ``calib_data``: calibration batches (a DataLoader, a Dataset
    or a list of ``(inputs, targets)``). ``masks``: weights already pruned (True = kept), kept
    pruned. ``on_cycle_end(cycle, masks, record)`` after every cycle; a run stopped after cycle k
    continues exactly with ``masks=<those masks>, start_cycle=k`` on the model saved then.
    ``reference`` (with the refit, camp-hive's default): the unpruned model whose layer outputs the refit matches; default a copy
    of ``model`` as passed (pass the unpruned model when resuming, so the refit matches it).
    """
    settings = resolve_settings("unstructured", settings, options, sparsity)
    batches = take_batches(calib_data, settings.num_batches)
    check_model_runs(model, batches)
    started = time.perf_counter()
    run = UnstructuredRun(model, settings, masks, start_cycle)
    device = next(iter(run.params.values())).device
    example = (example_inputs if example_inputs is not None else batches[0][0][:1]).to(device)
    before = summary_without_layers(model, example)
    check_finite(model, "loading (before pruning)")
    sharpness, hvps, seconds = {}, 0, 0.0
    if settings.spectrum_top_k:
        sharpness["before"], hvps, seconds = top_loss_eigenvalues(model, batches, run.params, loss_fn,
                                                                  settings.spectrum_top_k, settings.seed)
    if settings.refit and reference is None:
        reference = copy.deepcopy(model)
    history = run_cycles(model, batches, run, loss_fn=loss_fn, start_cycle=start_cycle, on_cycle_end=on_cycle_end)
    refit = {}
    if settings.refit and not any(bool((~mask).any()) for mask in run.alive.values()):
        refit = dict(NOTHING_TO_REFIT)  # the model is still the unpruned one
    elif settings.refit:
        log.info("refitting every layer to the unpruned model's outputs, layer after layer")
        refit = refit_layers(model, reference, batches, run.alive, settings.damping, settings.merge_solver or "auto")
        check_finite(model, "the refit")
    if settings.spectrum_top_k:
        sharpness["after"], more_hvps, more_seconds = top_loss_eigenvalues(model, batches, run.params, loss_fn,
                                                                           settings.spectrum_top_k, settings.seed)
        hvps, seconds = hvps + more_hvps, seconds + more_seconds
    global_sparsity, layer_sparsity = sparsity_of(run.alive)
    config = {**settings.to_dict(), **run.criterion.describe(), "num_batches": len(batches),
              "num_samples": sum(int(x.shape[0]) for x, _ in batches)}
    return PruneResult(mode="unstructured", masks=run.alive, sparsity=global_sparsity, layer_sparsity=layer_sparsity,
                       before=before, after=summary_without_layers(model, example), eigenvalues=history.eigenvalues,
                       num_hvps=history.num_hvps + hvps, curvature_seconds=history.curvature_seconds + seconds,
                       seconds=time.perf_counter() - started, cycles=history.cycles, config=config,
                       extra={"sharpness": sharpness, **pattern_extra(model, run.params, settings.pattern),
                              **({"refit": refit} if refit else {})})


class UnstructuredRun(PruningMode):
    """Masks of single weights: per cycle, score, select, merge into kept weights, mask."""

    def __init__(self, model: nn.Module, settings: UnstructuredSettings, masks, start_cycle: int):
        self.model, self.settings = model, settings
        self.criterion = settings.criterion_object()
        self.params = prunable_parameters(model, settings.ignored_layers)
        if not self.params:
            raise ConfigError("the model has no prunable layers (conv or linear weights outside ignored_layers); "
                              "nothing to prune")
        if not 0 <= start_cycle <= settings.cycles:
            raise ConfigError(f"start_cycle {start_cycle} is outside the {settings.cycles} cycles of this run")
        if masks:
            check_masks(model, masks)
        self.alive = {name: (masks[name].clone().bool() if masks and name in masks else torch.ones_like(p, dtype=torch.bool))
                      for name, p in self.params.items()}
        # N:M: the groups of every patterned layer, fixed for the run
        self.layout = pattern_layout(model, self.params, settings.pattern) if settings.pattern is not None else None
        # before any cycle, not half-way through
        check_target_reachable(self.alive, settings.sparsity, settings.selection, settings.min_keep)

    def targets(self) -> list[float]:
        return cycle_targets(self.settings.sparsity, self.settings.cycles, self.settings.schedule)

    def calibrated_parameters(self) -> dict[str, nn.Parameter]:
        return self.params

    def run_cycle(self, cycle: int, target: float, info) -> CycleOutcome:
        settings = self.settings
        solved = {}
        if isinstance(self.criterion, LayerSolverCriterion):  # SparseGPT, OBC: each layer chosen and updated at once
            pruned_now, solved = solve_layers(self, target, info)
        else:
            scores = self.criterion.scores(info)
            pruned_now = self.select(scores, target)
            # Forward selection in the last cycle only: the earlier cycles' choices are provisional, and there
            # units keep many weights, where it costs the most (docs/method.md, section 4).
            if settings.unit_selection == "greedy" and cycle == settings.cycles - 1:
                log.info("cycle %d: forward selection within units", cycle + 1)
                pruned_now = self.choose_within_units(pruned_now, info)
        changed = any(bool(mask.any()) for mask in pruned_now.values())
        if changed and not solved:
            log.info("cycle %d: merging the pruned weights (%s)", cycle + 1, settings.merge)
            self.merge(pruned_now, scores, info)
        for name in self.params:
            self.alive[name] &= ~pruned_now[name]
        apply_masks(self.model, self.alive)
        if settings.recovery_steps and changed:  # a cycle that removes nothing leaves the model exactly as it was
            recover(self.model, info.batches, self.alive, settings.recovery_steps, settings.recovery_lr, info.loss_fn)
        return CycleOutcome(changed, {"target": target, "sparsity": sparsity_of(self.alive)[0], **solved})

    def select(self, scores: dict[str, torch.Tensor], target: float) -> dict[str, torch.Tensor]:
        """``{name: bool}``: the alive weights to prune in this cycle, lowest scores first."""
        settings = self.settings
        if self.layout is not None:  # N:M: per group of each unit, the cycle's share of N (no floors)
            return select_pattern(scores, self.alive, self.layout, target / settings.sparsity)
        return select_to_prune(scores, self.alive, target, settings.selection, settings.min_keep)

    def choose_within_units(self, pruned_now: dict[str, torch.Tensor], info) -> dict[str, torch.Tensor]:
        """The same count per unit, but which weights each unit keeps chosen jointly by forward selection on
        its curvature where it keeps few (:mod:`~camphive.pruning.unstructured.greedy_selection`)."""
        view = info.unit_curvature(self.settings.curvature)
        chosen = {}
        for name, parameter in self.params.items():
            now = pruned_now[name]
            if not bool(now.any()):
                chosen[name] = now
                continue
            groups = self.layout.columns[name] if self.layout is not None else None  # N:M: the same count per group
            matrix = choose_within_units(unit_matrix(parameter.data), view, name, unit_matrix(self.alive[name]),
                                         unit_matrix(now), groups)
            chosen[name] = matrix.reshape(now.shape)
        return chosen

    def merge(self, pruned_now: dict[str, torch.Tensor], scores: dict[str, torch.Tensor], info) -> None:
        """Fold the weights pruned now into the kept weights of their output units, then zero them."""
        settings = self.settings
        merge, pairing = settings.merge, settings.pairing
        reads_curvature = merge in ("curvature", "least_squares") or pairing == "coupled" and merge != "none"
        view = info.unit_curvature(settings.curvature) if reads_curvature else None
        for name, parameter in self.params.items():
            if pruned_now[name].any():
                merge_layer(unit_matrix(parameter.data), name, unit_matrix(pruned_now[name]),
                            unit_matrix(self.alive[name] & ~pruned_now[name]), unit_matrix(scores[name].detach()),
                            merge, pairing, view, settings.clip, settings.merge_solver)

    def state(self) -> dict[str, torch.Tensor]:
        return {name: mask.clone() for name, mask in self.alive.items()}


@torch.no_grad()
def merge_layer(matrix, name, pruned_now, kept, significance, merge, pairing, view, clip, solver="auto") -> None:
    """Merge the weights pruned now into kept partners of their unit, then zero them (in place).

    ``matrix``: the weight as ``(out_units, fan_in)``; ``pruned_now``/``kept``: bool, same shape.
    """
    if merge == "none":
        matrix[pruned_now] = 0
    elif merge == "least_squares":
        least_squares_merge(matrix, view, name, pruned_now, kept, solver=solver)
    else:
        rows, pruned_cols, partners = make_pairs(pairing, pruned_now, kept, significance, view, name)
        if merge == "half":
            merge_into_partner(matrix, rows, pruned_cols, partners, 0.5)
            matrix[pruned_now] = 0
        else:
            pair_merge(matrix, view, name, pruned_now, rows, pruned_cols, partners, clip)
