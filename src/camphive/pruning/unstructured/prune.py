"""The one pruning pipeline: CAMP-HiVe and every baseline go through it.

Each cycle re-estimates curvature on the current (partly pruned) model, scores the weights
still alive, selects the lowest-scoring ones up to the cycle's target sparsity, pairs each of
them with a kept partner in its output unit, merges it (or folds it into all kept weights by
least squares), and fixes the masks. Criteria differ only in their scores, so comparisons
between them are fair by construction.
"""
from __future__ import annotations

import time
from collections.abc import Mapping

import torch
from torch import nn

from camphive.batches import take_batches
from camphive.errors import ConfigError
from camphive.layers import prunable_parameters
from camphive.pruning.core.batchnorm import recalibrate_batchnorm
from camphive.pruning.core.calibration import CalibrationInfo
from camphive.pruning.core.checks import check_finite, check_model_runs, summary_without_layers
from camphive.pruning.core.result import PruneResult
from camphive.pruning.core.sharpness import top_loss_eigenvalues
from camphive.pruning.criteria.base import make_criterion
from camphive.pruning.unstructured.masks import apply_masks, check_masks, sparsity_of
from camphive.pruning.unstructured.merging import MERGES, least_squares_merge, merge_into_partner, pair_merge
from camphive.pruning.unstructured.pairing import PAIRINGS, make_pairs
from camphive.pruning.unstructured.selection import check_sparsity, check_target_reachable, cycle_targets, select_to_prune
from camphive.pruning.core.unit_curvature import unit_matrix

# Chosen by measurement (benchmarks/unstructured.py, benchmarks/RESULTS.md).
DEFAULTS = {
    "score": "diagonal",
    "curvature": "reconstruction",
    "loss_weighting": "batchnorm",
    "pairing": "coupled",
    "merge": "least_squares",
    "cycles": 3,
    "recalibrate_bn": True,  # every criterion: BatchNorm statistics re-estimated after each cycle
}


def prune(
    model: nn.Module,
    calib_data,
    sparsity: float | None = None,
    *,
    mode: str = "unstructured",
    criterion: str = "camp-hive",
    score: str | None = None,
    curvature: str | None = None,
    loss_weighting: str | None = None,
    scope: str = "global",
    selection: str = "global",
    cycles: int | None = None,
    schedule: str = "linear",
    top_k: int = 8,
    pairing: str | None = None,
    merge: str | None = None,
    first_order_weight: float = 0.0,
    recovery_steps: int = 0,
    recovery_lr: float = 1e-3,
    recalibrate_bn: bool | None = None,
    min_keep: float | int = 0.01,
    ignored_layers=None,
    loss_fn=None,
    num_batches: int | None = None,
    damping: float = 0.01,
    clip: float = 2.0,
    eigen_method: str = "lanczos",
    hutchinson_probes: int = 16,
    loss_diagonal: str = "fisher",
    masks: Mapping[str, torch.Tensor] | None = None,
    example_inputs: torch.Tensor | None = None,
    seed: int = 0,
    spectrum_top_k: int = 1,
    start_cycle: int = 0,
    on_cycle_end=None,
    **structured_options,
) -> PruneResult:
    """Prune ``model`` in place and return a :class:`PruneResult`.

    ``calib_data``: calibration batches (a DataLoader, a Dataset or a list of ``(inputs,
    targets)``); ``num_batches`` limits how many are read. ``sparsity``: fraction of the
    prunable weights (conv and linear weights) to remove, in [0, 1).

    CAMP-HiVe options (``criterion="camp-hive"``): ``score`` ("diagonal", "obs",
    "diag_lowrank", "hv_product"), ``curvature`` ("reconstruction": each layer's input second
    moment G; "loss": the loss Hessian's top-``top_k`` eigenpairs, global or per layer by
    ``scope``), ``loss_weighting``, ``pairing`` ("cyclic", "coupled"), ``merge``
    ("curvature", "half", "none", "least_squares"), ``cycles`` with a ``schedule``.
    Baselines (``"magnitude"``, ``"random"``, ``"taylor"``, ``"obd"``, ``"hutchinson"``) share
    everything but the scores; their ``merge`` defaults to "none" (plain pruning).
    ``selection="global"`` compares scores over all layers, ``"layer"`` prunes each layer to
    the target. Every layer keeps at least ``min_keep`` (a fraction, or a count if >= 1).
    ``recalibrate_bn`` (default True, every criterion) re-estimates BatchNorm statistics on
    the calibration batches after each cycle (averaged over processes under torchrun).

    ``mode="structured"`` removes whole channels (see :mod:`camphive.pruning.structured.prune`).

    ``spectrum_top_k``: the top loss-Hessian eigenvalues (by Lanczos, tolerance 1e-3) measured
    before and after pruning for the report (sharpness); 0 skips them.

    Interruptions: ``on_cycle_end(cycle, masks, record)`` is called after every completed
    cycle (cycle counted from 1); a run stopped after cycle k continues exactly with
    ``masks=<those masks>, start_cycle=k`` on the model saved at that point.
    """
    if cycles is not None and (isinstance(cycles, bool) or int(cycles) < 1):
        raise ConfigError(f"cycles must be >= 1 (or None for the default), got {cycles}")
    batches = take_batches(calib_data, num_batches)
    check_model_runs(model, batches)
    if mode == "structured":
        from camphive.pruning.structured.prune import check_structured_options, prune_structured

        check_structured_options(structured_options)

        if selection != "global" or min_keep != 0.01 or masks:
            raise ConfigError("selection, min_keep and masks apply to unstructured pruning; for structured pruning use "
                              "global_pruning, min_channels and ignored_layers")
        weight_options = {key: value for key, value in (("score", score), ("curvature", curvature),
                          ("loss_weighting", loss_weighting), ("first_order_weight", first_order_weight or None))
                          if value is not None}
        if weight_options:
            structured_options["criterion_options"] = {**weight_options, **structured_options.get("criterion_options", {})}
        return prune_structured(model, batches, sparsity, criterion=criterion, loss_fn=loss_fn, seed=seed,
                                ignored_layers=ignored_layers, example_inputs=example_inputs,
                                cycles=cycles or 1, merge=merge, pairing=pairing, damping=damping,
                                recalibrate_bn=recalibrate_bn, **structured_options)
    if mode != "unstructured":
        raise ConfigError(f"unknown mode {mode!r}; use unstructured or structured")
    if structured_options:
        raise ConfigError(f"unknown option(s) for unstructured pruning: {', '.join(sorted(structured_options))}")
    if sparsity is None:
        raise ConfigError("sparsity is required for unstructured pruning, e.g. sparsity=0.9")
    check_sparsity(sparsity)
    started = time.perf_counter()
    is_camp_hive = criterion.replace("_", "-").lower() in ("camp-hive", "camphive")
    merge = merge or (DEFAULTS["merge"] if is_camp_hive else "none")
    pairing = pairing or DEFAULTS["pairing"]
    cycles = cycles or (DEFAULTS["cycles"] if is_camp_hive else 1)
    recalibrate_bn = DEFAULTS["recalibrate_bn"] if recalibrate_bn is None else bool(recalibrate_bn)
    curvature = curvature or DEFAULTS["curvature"]
    _check_choice("merge", merge, MERGES)
    _check_choice("pairing", pairing, PAIRINGS)
    _check_choice("curvature", curvature, ("reconstruction", "loss"))
    _check_choice("scope", scope, ("global", "layer"))
    score = score or DEFAULTS["score"]
    if loss_weighting is None:  # the default weighting belongs to reconstruction scores only
        reads_reconstruction = curvature == "reconstruction" and score in ("diagonal", "obs")
        loss_weighting = DEFAULTS["loss_weighting"] if reads_reconstruction else "none"
    options = {"score": score, "curvature": curvature, "loss_weighting": loss_weighting,
               "first_order_weight": first_order_weight}
    scorer = make_criterion(criterion, seed=seed, **(options if is_camp_hive else {}))

    params = prunable_parameters(model, ignored_layers)
    if not params:
        raise ConfigError("the model has no prunable layers (conv or linear weights outside ignored_layers); nothing to prune")
    if not 0 <= start_cycle <= cycles:
        raise ConfigError(f"start_cycle {start_cycle} is outside the {cycles} cycles of this run")
    if masks:
        check_masks(model, masks)
    alive = {name: (masks[name].clone().bool() if masks and name in masks else torch.ones_like(p, dtype=torch.bool))
             for name, p in params.items()}
    check_target_reachable(alive, sparsity, selection, min_keep)  # before any cycle, not half-way through
    device = next(iter(params.values())).device
    example = (example_inputs if example_inputs is not None else batches[0][0][:1]).to(device)
    before = summary_without_layers(model, example)
    check_finite(params, "before pruning")
    settings = {"top_k": top_k, "scope": scope, "damping": damping, "eigen_method": eigen_method,
                "hutchinson_probes": hutchinson_probes, "loss_diagonal": loss_diagonal, "seed": seed}
    history, eigenvalues, num_hvps, curvature_seconds = [], {}, 0, 0.0
    sharpness = {}
    if spectrum_top_k:
        sharpness["before"], hvps, seconds = top_loss_eigenvalues(model, batches, params, loss_fn, spectrum_top_k, seed)
        num_hvps, curvature_seconds = num_hvps + hvps, curvature_seconds + seconds
    for cycle, target in enumerate(cycle_targets(sparsity, cycles, schedule)):
        if cycle < start_cycle:
            continue
        cycle_start = time.perf_counter()
        info = CalibrationInfo(model, batches, params, loss_fn=loss_fn, cycle=cycle, settings=settings)
        scores = scorer.scores(info)
        pruned_now = select_to_prune(scores, alive, target, selection, min_keep)
        prunes_any = any(bool(mask.any()) for mask in pruned_now.values())
        view = info.unit_curvature(curvature) if merge in ("curvature", "least_squares") or pairing == "coupled" and merge != "none" else None
        for name, parameter in params.items():
            if pruned_now[name].any():
                _merge_layer(unit_matrix(parameter.data), name, unit_matrix(pruned_now[name]),
                             unit_matrix(alive[name] & ~pruned_now[name]), unit_matrix(scores[name].detach()),
                             merge, pairing, view, clip)
            alive[name] &= ~pruned_now[name]
        apply_masks(model, alive)
        check_finite(params, f"cycle {cycle + 1} merge")
        if recovery_steps and prunes_any:  # a cycle that removes nothing leaves the model exactly as it was
            _recover(model, batches, alive, recovery_steps, recovery_lr, loss_fn)
        if recalibrate_bn and prunes_any:
            recalibrate_batchnorm(model, batches, reduce_over_processes=True)  # batches: this process's share
        report = info.report()
        info.close()
        num_hvps += report["num_hvps"]
        curvature_seconds += sum(report["seconds"].values())
        eigenvalues = report["eigenvalues"] or eigenvalues
        history.append({"cycle": cycle + 1, "target": target, "sparsity": sparsity_of(alive)[0],
                        "seconds": time.perf_counter() - cycle_start, **report})
        if on_cycle_end is not None:
            on_cycle_end(cycle + 1, {name: mask.clone() for name, mask in alive.items()}, history[-1])
    if spectrum_top_k:
        sharpness["after"], hvps, seconds = top_loss_eigenvalues(model, batches, params, loss_fn, spectrum_top_k, seed)
        num_hvps, curvature_seconds = num_hvps + hvps, curvature_seconds + seconds
    global_sparsity, layer_sparsity = sparsity_of(alive)
    config = {"mode": mode, "criterion": criterion, **scorer.describe(), "sparsity": sparsity, "scope": scope,
              "selection": selection, "cycles": cycles, "schedule": schedule, "top_k": top_k, "pairing": pairing,
              "merge": merge, "recovery_steps": recovery_steps, "recalibrate_bn": bool(recalibrate_bn), "min_keep": min_keep,
              "damping": damping, "clip": clip, "eigen_method": eigen_method, "hutchinson_probes": hutchinson_probes,
              "loss_diagonal": loss_diagonal, "num_batches": len(batches),
              "num_samples": sum(int(x.shape[0]) for x, _ in batches), "spectrum_top_k": spectrum_top_k, "seed": seed}
    return PruneResult(mode=mode, masks=alive, sparsity=global_sparsity, layer_sparsity=layer_sparsity,
                       before=before, after=summary_without_layers(model, example), eigenvalues=eigenvalues, num_hvps=num_hvps,
                       curvature_seconds=curvature_seconds, seconds=time.perf_counter() - started,
                       cycles=history, config=config, extra={"sharpness": sharpness})


@torch.no_grad()
def _merge_layer(matrix, name, pruned_now, kept, significance, merge, pairing, view, clip) -> None:
    """Merge the weights pruned now into kept partners of their unit, then zero them (in place)."""
    if merge == "none":
        matrix[pruned_now] = 0
    elif merge == "least_squares":
        least_squares_merge(matrix, view, name, pruned_now, kept)
    else:
        rows, pruned_cols, partners = make_pairs(pairing, pruned_now, kept, significance, view, name)
        if merge == "half":
            merge_into_partner(matrix, rows, pruned_cols, partners, 0.5)
            matrix[pruned_now] = 0
        else:
            pair_merge(matrix, view, name, pruned_now, rows, pruned_cols, partners, clip)


def _recover(model, batches, masks, steps, lr, loss_fn) -> None:
    """A few masked SGD steps on the calibration batches between cycles."""
    from camphive.training import train

    steps = min(steps, len(batches)) if steps else 0
    if steps:
        train(model, batches[:steps], epochs=1, lr=lr, masks=masks, loss_fn=loss_fn, schedule="constant",
              device=next(model.parameters()).device, weight_decay=0.0)


def _check_choice(option: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(f"unknown {option} {value!r}; use one of {', '.join(choices)}")
