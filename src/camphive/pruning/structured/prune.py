"""Structured CAMP-HiVe: remove whole channels, folding them into kept ones first.

Each cycle:

1. trace the current model with Torch-Pruning's dependency graph and list its channel
   groups (:mod:`~camphive.pruning.structured.groups`): output channels with their BN
   channels, depthwise filters, residual partners and the input channels that read them;
   the classifier's outputs and ``ignored_layers``' outputs are never touched;
2. score every channel (:meth:`camphive.pruning.criteria.Criterion.channel_scores`): by default CAMP-HiVe's
   fold-aware Optimal Brain Surgeon cost under each consumer's reconstruction curvature,
   removed greedily (:mod:`~camphive.pruning.structured.saliency`); or the CAMP-HiVe per-weight
   scores summed over the group (``channel_score="summed"``); or a baseline (L1 magnitude,
   Taylor, random, OBD, Hutchinson, Torch-Pruning's group importances);
3. decide how many channels each group keeps (:mod:`~camphive.pruning.structured.budget`):
   this cycle's share of the final ``sparsity`` (fraction of channels) or
   ``target_macs_ratio``, uniform over groups or global by normalized score, rounded to
   multiples of ``round_to`` (up or down by the layers' timed speed with a MACs target:
   :mod:`~camphive.pruning.structured.latency_allocation`);
4. fold the lowest-scoring channels into kept ones through every layer that reads them
   (:mod:`~camphive.pruning.structured.merging`), remove them physically (so MACs, parameters
   and latency really drop, and the model exports and reloads as usual), and re-estimate
   BatchNorm statistics on the calibration images.

Cycles run through the one driver (:mod:`camphive.pruning.core.driver`); the options are
:class:`~camphive.pruning.structured.settings.StructuredSettings`, whose defaults were chosen by
measurement (benchmarks/structured.py, benchmarks/RESULTS.md, docs/method.md).
Parameters, MACs (:func:`camphive.measure.count_macs`) and, unless
``measure_latency=False``, CPU latency at batch 1 and 64 (interleaved medians) are
measured before and after.
"""
from __future__ import annotations

import copy
import logging
import time

import torch
from torch import nn

from camphive.batches import take_batches
from camphive.errors import ConfigError, one_line
from camphive.layers import layer_list, prunable_parameters
from camphive.measure import count_macs
from camphive.measure.layer_timing import LayerTimer
from camphive.modules import as_input_tuple, eval_mode, inputs_on_model_device
from camphive.pruning.core.checks import check_model_runs
from camphive.pruning.core.driver import CycleOutcome, PruningMode, check_finite, run_cycles
from camphive.pruning.core.result import PruneResult
from camphive.pruning.settings import resolve_settings
from camphive.pruning.structured.budget import (
    MacsModel,
    global_kept,
    global_kept_for_macs,
    lowest_channels,
    rounding_choices,
    uniform_kept,
    uniform_kept_for_macs,
)
from camphive.pruning.structured.groups import build_dependency_graph, channel_groups, remove_channels, resolve_ignored
from camphive.pruning.structured.latency_allocation import latency_aware_kept
from camphive.pruning.structured.merging import consumer_grams, merge_group, norms_after
from camphive.pruning.structured.report import cost_summary, latency_before_after, layer_sparsity, out_channels
from camphive.pruning.structured.settings import StructuredSettings
from camphive.pruning.unstructured.refit import NOTHING_TO_REFIT, REFITTED_TYPES, refit_layers

log = logging.getLogger("camphive.pruning")


def prune_structured(model: nn.Module, calib_data, sparsity: float | None = None, *,
                     settings: StructuredSettings | None = None, loss_fn=None,
                     example_inputs: torch.Tensor | None = None, start_cycle: int = 0, resume_state: dict | None = None,
                     on_cycle_end=None, reference: nn.Module | None = None, **options) -> PruneResult:
    """Remove channels from ``model`` in place; return a :class:`PruneResult` (``mode="structured"``).

    ``sparsity`` or ``target_macs_ratio`` and the other keyword ``options`` (or ``settings``): see
    :class:`StructuredSettings`. ``example_inputs`` (default: one calibration sample) are used for
    tracing and MACs. ``on_cycle_end(cycle, state, record)`` after every cycle; a run stopped after
    cycle k continues exactly with ``start_cycle=k, resume_state=<that state>`` on the model saved
    then (the state is a dict of plain numbers, to store beside the checkpoint).

    The result's ``masks`` is empty (channels are gone, nothing is masked); ``sparsity`` is
    the fraction of prunable channels removed; ``extra`` holds MACs and parameter ratios,
    whether a MACs target was reached, channel counts per group, the groups left whole and why
    (``skipped_groups``: grouped convolutions, GroupNorms that cannot stay balanced) and
    latency (``None`` when not measured; ``{"skipped": reason}`` for models whose inputs are
    not one floating-point tensor, or a resumed run). Groups read by a GroupNorm lose as many
    channels from each of its groups, and keep a multiple of its group count. ``reference``
    (with the refit, camp-hive's default): the unpruned model whose layer outputs the refit matches; default a copy of
    ``model`` as passed (pass the unpruned model when resuming).
    """
    settings = resolve_settings("structured", settings, options, sparsity)
    started = time.perf_counter()
    batches = take_batches(calib_data, settings.num_batches)
    check_model_runs(model, batches)
    example = as_input_tuple(example_inputs if example_inputs is not None else batches[0][0][:1])
    _check_example_runs(model, example)
    if not 0 <= start_cycle <= settings.cycles or (start_cycle > 0) != (resume_state is not None):
        raise ConfigError(f"start_cycle {start_cycle} needs the resume_state of cycle {start_cycle} (and must be "
                          f"within the {settings.cycles} cycles); pass both, or neither")
    if settings.refit and resume_state is not None and reference is None:
        raise ConfigError("a resumed run with the refit (on by default for camp-hive) needs the unpruned model as "
                          "reference= (the model passed has lost channels already); pass it, or pass refit=False")
    latency_skipped = _latency_skip_reason(example) if settings.measure_latency else None
    if resume_state is not None and settings.measure_latency:
        latency_skipped = "a resumed run does not hold the original model; time it with camphive.measure_latency"
    if latency_skipped is None and settings.measure_latency and settings.latency_channels_last and example[0].dim() != 4:
        raise ConfigError("latency_channels_last needs one image input (N, C, H, W); time without it")
    run = StructuredRun(model, settings, example, resume_state)
    original_model = copy.deepcopy(model) if settings.measure_latency and not latency_skipped else None
    if settings.refit and reference is None:
        reference = original_model if original_model is not None else copy.deepcopy(model)
    history = run_cycles(model, batches, run, loss_fn=loss_fn, start_cycle=start_cycle, on_cycle_end=on_cycle_end)
    removed_any = any(run.kept.get(key, size) != size for key, size in run.original_sizes.items())
    refit = (_refit(model, reference, batches, run) if removed_any else dict(NOTHING_TO_REFIT)) if settings.refit else {}
    after = cost_summary(model, run.macs_now)
    before = run.before
    final_sizes = {key: run.kept.get(key, size) for key, size in run.original_sizes.items()}
    total_channels = sum(run.original_sizes.values())
    latency = None
    if settings.measure_latency and latency_skipped:
        latency = {"skipped": latency_skipped}
    elif settings.measure_latency:
        log.info("timing the model before and after pruning at batch sizes %s (measure_latency=False skips it)",
                 ", ".join(str(size) for size in settings.latency_batch_sizes))
        latency = latency_before_after(original_model, model, example, settings.latency_batch_sizes,
                                       settings.latency_threads, settings.latency_seconds,
                                       settings.latency_channels_last, settings.latency_compiled)
    extra = {
        "macs_before": before["macs"], "macs_after": after["macs"],
        "macs_ratio": before["macs"] / max(after["macs"], 1),
        "macs_conv_linear_ratio": before["macs_conv_linear"] / max(after["macs_conv_linear"], 1),
        "params_before": before["parameters"], "params_after": after["parameters"],
        "params_ratio": before["parameters"] / max(after["parameters"], 1),
        "target_macs_ratio": settings.target_macs_ratio, "target_reached": bool(run.reached),
        "channels": {key: [size, final_sizes[key]] for key, size in run.original_sizes.items()},
        "skipped_groups": run.skipped, "latency": latency, "latency_allocation": run.allocation,
        **({"refit": refit} if refit else {}),
    }
    config = {**settings.to_dict(), **run.criterion.describe(), "num_batches": len(batches),
              "num_samples": sum(int(x.shape[0]) for x, _ in batches)}
    return PruneResult(mode="structured", masks={},
                       sparsity=1.0 - sum(final_sizes.values()) / total_channels if total_channels else 0.0,
                       layer_sparsity=layer_sparsity(run.out_channels_before, out_channels(model)), before=before,
                       after=after, eigenvalues=history.eigenvalues, num_hvps=history.num_hvps,
                       curvature_seconds=history.curvature_seconds, seconds=time.perf_counter() - started,
                       cycles=history.cycles, config=config, extra=extra)


class StructuredRun(PruningMode):
    """Whole channels: per cycle, trace the groups, score channels, budget, fold and remove them."""

    def __init__(self, model: nn.Module, settings: StructuredSettings, example: tuple, resume_state: dict | None):
        self.model, self.settings, self.example = model, settings, example
        self.criterion = settings.criterion_object()
        self.ignored = resolve_ignored(model, layer_list(settings.ignored_layers))
        self.one_sample = tuple(x[:1] for x in example)
        self.macs_now = count_macs(model, self.one_sample)
        state = resume_state or {}
        self.before = state.get("before") or cost_summary(model, self.macs_now)
        self.out_channels_before = state.get("out_channels_before") or out_channels(model)
        self.original_sizes: dict[str, int] = dict(state.get("original_sizes", {}))
        self.skipped: dict[str, str] = dict(state.get("skipped_groups", {}))
        self.kept: dict[str, int] = dict(state.get("kept", {}))
        # per conv/linear: the original output channels its outputs still are, in order (for the refit)
        self.rows: dict[str, torch.Tensor] = {name: torch.as_tensor(kept, dtype=torch.int64)
                                              for name, kept in state.get("rows", {}).items()} or _all_rows(model)
        self.reached = True
        self.timer: LayerTimer | None = None  # layer timings for latency-aware rounding, kept across cycles
        self.timings: dict = dict(state.get("layer_timings", {}))  # a resumed run reuses them: same choices
        self.allocation: dict | None = None  # what the latency-aware rounding did (None: not used)
        if resume_state is None:
            self._check_prunable()

    def _check_prunable(self) -> None:
        groups = channel_groups(self.model, build_dependency_graph(self.model, self.example), self.ignored, self.skipped)
        if not groups:
            why = "; ".join(f"{name}: {reason}" for name, reason in self.skipped.items()) or (
                "every conv/linear output is ignored or is the model's output")
            raise ConfigError(f"the model has no prunable channel groups ({why}); nothing to prune")
        self.original_sizes = {group.key: group.size for group in groups}

    def targets(self) -> list[float]:
        """The fraction of the way to the final target reached after each cycle (linear)."""
        return [(cycle + 1) / self.settings.cycles for cycle in range(self.settings.cycles)]

    def calibrated_parameters(self) -> dict[str, nn.Parameter]:
        return prunable_parameters(self.model)

    def run_cycle(self, cycle: int, fraction_done: float, info) -> CycleOutcome:
        settings, model = self.settings, self.model
        graph = build_dependency_graph(model, self.example)
        groups = channel_groups(model, graph, self.ignored, {})
        macs_model = MacsModel(model, groups, self.macs_now)
        info.grams = consumer_grams(model, info.batches, groups, settings.flatten_fit) if self._needs_grams() else {}
        scores = self.criterion.channel_scores(groups, info)
        self.kept = self._budget(groups, scores, macs_model, fraction_done)
        removals = {group.key: lowest_channels(score, group.size - self.kept[group.key], group.blocks)
                    for group, score in zip(groups, scores)}
        changed = any(r.numel() for r in removals.values())
        merged = _merge(model, groups, removals, scores, info.grams, settings) if changed else {"folded": 0,
                                                                                                "unfolded": 0}
        for group in groups:
            self._forget_rows(group, removals[group.key])
            remove_channels(graph, group, removals[group.key])
        return CycleOutcome(changed, {"channels_removed": int(sum(r.numel() for r in removals.values())),
                                      "macs_predicted": float(macs_model.predict(self.kept)),
                                      "folded_consumers": merged["folded"], "unfolded_consumers": merged["unfolded"]})

    def _needs_grams(self) -> bool:
        settings = self.settings
        merge_reads = settings.merge == "least_squares" or settings.merge == "pair" and (
            settings.pairing == "coupled" or settings.beta_from == "activations")
        return bool(self.criterion.needs_activations or merge_reads)

    def _budget(self, groups, scores, macs_model: MacsModel, fraction_done: float) -> dict[str, int]:
        settings, original = self.settings, self.original_sizes
        if settings.target_macs_ratio is not None:
            target_macs = self.before["macs"] * (1.0 - (1.0 - 1.0 / settings.target_macs_ratio) * fraction_done)
            if settings.global_pruning:
                kept = global_kept_for_macs(groups, original, scores, macs_model, target_macs, settings.rounding(),
                                            settings.min_channels)
            else:
                kept, fraction = uniform_kept_for_macs(groups, original, macs_model, target_macs,
                                                       settings.rounding(), settings.min_channels)
                if settings.latency_aware and settings.rounding().multiple > 1:
                    kept = self._fastest_rounding(groups, kept, fraction, macs_model, target_macs)
            self.reached = macs_model.predict(kept) <= target_macs * (1 + 1e-9)
            return kept
        if settings.global_pruning:
            total = sum(original.values())
            removed_so_far = total - sum(group.size for group in groups)
            goal = int(round(settings.sparsity * fraction_done * total))
            return global_kept(groups, original, scores, max(0, goal - removed_so_far), settings.rounding(),
                               settings.min_channels)
        return uniform_kept(groups, original, settings.sparsity * fraction_done, settings.rounding(),
                            settings.min_channels)

    def _fastest_rounding(self, groups, kept, fraction, macs_model: MacsModel, target_macs: float) -> dict[str, int]:
        """The uniform mix's groups rounded up or down by timed speed (latency_allocation)."""
        settings = self.settings
        reason = _latency_skip_reason(self.example)
        if reason:
            self.allocation = {"kept_uniform_because": reason}
            return kept
        if self.timer is None:
            self.timer = LayerTimer(self.model, self.example, batch_size=max(settings.latency_batch_sizes),
                                    threads=settings.latency_threads, seconds=settings.latency_seconds,
                                    channels_last=settings.latency_channels_last and self.example[0].dim() == 4,
                                    runtime=settings.latency_runtime)
            self.timer.load_timings(self.timings)
        choices = rounding_choices(groups, self.original_sizes, fraction, kept, settings.rounding(),
                                   settings.min_channels, reach=settings.latency_reach)
        allocation = latency_aware_kept(kept, choices, macs_model, target_macs, self.timer)
        self.timings = self.timer.timings()
        self.allocation = {**allocation.describe(), "runtime": self.timer.runtime}
        return allocation.kept

    def _forget_rows(self, group, removed: torch.Tensor) -> None:
        """Drop the output channels that ``removed`` (root indices) takes from the group's producers."""
        if not removed.numel():
            return
        for member in group.by_role("producer", "depthwise"):
            if member.name not in self.rows:
                continue
            gone = member.indices[torch.isin(member.root_indices, removed)]
            rows = self.rows[member.name]
            keep = torch.ones(rows.numel(), dtype=torch.bool)
            keep[gone] = False
            self.rows[member.name] = rows[keep]

    def after_cycle(self, outcome: CycleOutcome) -> dict:
        self.macs_now = count_macs(self.model, self.one_sample)
        return {"macs": int(self.macs_now.total)}

    def state(self) -> dict:
        return {"before": dict(self.before), "out_channels_before": dict(self.out_channels_before),
                "original_sizes": dict(self.original_sizes), "skipped_groups": dict(self.skipped),
                "kept": dict(self.kept), "layer_timings": self.timings,
                "rows": {name: rows.tolist() for name, rows in self.rows.items()}}


def _all_rows(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{name: arange(outputs)}`` for every conv (not transposed) and linear layer of ``model``."""
    return {name: torch.arange(module.weight.shape[0]) for name, module in model.named_modules()
            if isinstance(module, REFITTED_TYPES)}


def _refit(model: nn.Module, reference: nn.Module, batches, run: StructuredRun) -> dict:
    """Refit every conv and linear layer to the reference's outputs of the channels it kept (refit.py)."""
    log.info("refitting every layer to the unpruned model's outputs, layer after layer")
    alive = {f"{name}.weight": torch.ones_like(module.weight, dtype=torch.bool)
             for name, module in model.named_modules() if name in run.rows}
    refit = refit_layers(model, reference, batches, alive, run.settings.damping, rows=run.rows)
    check_finite(model, "the refit")
    return refit


def _check_example_runs(model: nn.Module, example: tuple) -> None:
    """Run the model once on the example inputs, so that inputs that do not fit fail here, in one line."""
    try:
        with eval_mode(model), torch.no_grad():
            model(*inputs_on_model_device(model, tuple(x[:1] for x in example)))
    except RuntimeError as error:
        shapes = ", ".join(str(tuple(x.shape)) for x in example)
        raise ConfigError(f"example_inputs of shape {shapes} do not fit the model ({one_line(str(error))[:160]}); "
                          "pass inputs shaped like a calibration batch") from error


def _latency_skip_reason(example: tuple) -> str | None:
    """Why the latency of this model cannot be timed on random inputs, or None."""
    if len(example) != 1:
        return f"the model takes {len(example)} inputs; latency is timed for one-input models"
    if not example[0].is_floating_point():
        return f"the model's inputs are {example[0].dtype} (not floating point); time it on your own inputs"
    return None


def _merge(model, groups, removals, scores, grams, settings: StructuredSettings) -> dict:
    """Fold every group's removed channels into its kept ones; returns which consumers were folded."""
    merge, pairing, beta_from, intercept = settings.merge, settings.pairing, settings.beta_from, settings.intercept
    result = {"folded": 0, "unfolded": []}
    active = [group for group in groups if removals[group.key].numel()]
    if merge == "none" or not active:
        return result
    if not grams:  # coefficients from weights only: zero Grams just name the foldable consumers
        grams = consumer_grams(model, [], active, settings.flatten_fit)
    norms = norms_after(model) if merge == "pair" and beta_from == "weights" or intercept else {}
    by_key = {group.key: score for group, score in zip(groups, scores)}
    for group in active:
        report = merge_group(group, removals[group.key], by_key[group.key], grams, merge, pairing, beta_from,
                             settings.damping, norms, intercept)
        result["folded"] += len(report["consumers"])
        result["unfolded"] += report["unfolded"]
    return result
