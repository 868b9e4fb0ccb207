"""Structured CAMP-HiVe: remove whole channels, folding them into kept ones first.

Each cycle:

1. trace the current model with Torch-Pruning's dependency graph and list its channel
   groups (:mod:`~camphive.pruning.structured.groups`): output channels with their BN
   channels, depthwise filters, residual partners and the input channels that read them;
   the classifier's outputs and ``ignored_layers``' outputs are never touched;
2. score every channel (:mod:`~camphive.pruning.structured.scores`): by default CAMP-HiVe's
   fold-aware Optimal Brain Surgeon cost under each consumer's reconstruction curvature,
   removed greedily (:mod:`~camphive.pruning.structured.saliency`); or the CAMP-HiVe per-weight
   scores summed over the group (``channel_score="summed"``); or a baseline (L1 magnitude,
   Taylor, random, OBD, Hutchinson, Torch-Pruning's group importances);
3. decide how many channels each group keeps (:mod:`~camphive.pruning.structured.budget`):
   this cycle's share of the final ``sparsity`` (fraction of channels) or
   ``target_macs_ratio``, uniform over groups or global by normalized score, optionally
   rounded to multiples of ``round_to``;
4. fold the lowest-scoring channels into kept ones through every layer that reads them
   (:mod:`~camphive.pruning.structured.merging`), remove them physically (so MACs, parameters
   and latency really drop, and the model exports and reloads as usual), and re-estimate
   BatchNorm statistics on the calibration images.

Defaults were chosen by measurement (benchmarks/structured.py, benchmarks/RESULTS.md).
Parameters, MACs (:func:`camphive.measure.count_macs`) and, unless
``measure_latency=False``, CPU latency at batch 1 and 64 (interleaved medians) are
measured before and after.
"""
from __future__ import annotations

import copy
import inspect
import time

import torch
from torch import nn

from camphive.batches import take_batches
from camphive.errors import ConfigError, NumericalError, one_line
from camphive.layers import layer_list, prunable_parameters
from camphive.measure import MacsReport, count_macs, count_parameters
from camphive.measure import measure_latency as time_models
from camphive.modules import as_input_tuple, eval_mode, inputs_on_model_device
from camphive.pruning.core.calibration import CalibrationInfo
from camphive.pruning.structured.budget import (
    MacsModel,
    check_targets,
    global_kept,
    global_kept_for_macs,
    lowest_channels,
    uniform_kept,
    uniform_kept_for_macs,
)
from camphive.pruning.structured.groups import (
    build_dependency_graph,
    channel_groups,
    remove_channels,
    resolve_ignored,
)
from camphive.pruning.structured.merging import (
    BETA_SOURCES,
    FLATTEN_FITS,
    STRUCTURED_MERGES,
    STRUCTURED_PAIRINGS,
    consumer_grams,
    merge_group,
    norms_after,
)
from camphive.pruning.structured.scores import ChannelScorer, canonical_criterion
from camphive.pruning.core.batchnorm import recalibrate_batchnorm
from camphive.pruning.core.result import PruneResult

# Defaults for CAMP-HiVe (baselines default to plain removal, merge="none").
DEFAULTS = {"channel_score": "greedy_obs", "merge": "least_squares", "pairing": "coupled", "beta_from": "activations",
            "flatten_fit": "shared", "intercept": False, "recalibrate_bn": True}


def prune_structured(
    model: nn.Module,
    calib_data,
    sparsity: float | None = None,
    *,
    criterion: str = "camp-hive",
    target_macs_ratio: float | None = None,
    cycles: int = 1,
    merge: str | None = None,
    pairing: str | None = None,
    beta_from: str | None = None,
    flatten_fit: str | None = None,
    damping: float = 0.01,
    intercept: bool | None = None,
    recalibrate_bn: bool | None = None,
    global_pruning: bool = False,
    round_to: int | None = None,
    min_channels: int | float = 1,
    ignored_layers=None,
    example_inputs: torch.Tensor | None = None,
    loss_fn=None,
    num_batches: int | None = None,
    seed: int = 0,
    criterion_options: dict | None = None,
    channel_score: str | None = None,
    measure_latency: bool = True,
    latency_batch_sizes: tuple[int, ...] = (1, 64),
    latency_threads: int | None = None,
    latency_seconds: float = 1.0,
    latency_channels_last: bool = False,
    latency_compiled: bool = False,
) -> PruneResult:
    """Remove channels from ``model`` in place; return a :class:`PruneResult` (``mode="structured"``).

    Targets (exactly one): ``sparsity``, the fraction of each group's channels to remove
    (of all prunable channels with ``global_pruning``), or ``target_macs_ratio`` (2.0 =
    half the MACs of :func:`camphive.measure.count_macs`), each reached linearly over
    ``cycles``; ``round_to`` rounds kept channel counts to multiples (8 helps CPU kernels);
    every group keeps at least ``min_channels`` (a count, or a fraction if < 1).

    ``criterion``: "camp-hive", "magnitude" (L1), "random", "taylor", "obd", "hutchinson",
    "tp-magnitude", "tp-taylor", "tp-hessian". For CAMP-HiVe, ``channel_score`` is
    "greedy_obs" (default), "obs" or "summed" (its per-weight scores, configured by
    ``criterion_options`` such as ``{"score": "obs"}``, summed over the group).
    ``merge``: "least_squares" (CAMP-HiVe's default; ``intercept`` adds a constant to the
    fit), "pair" (``pairing`` "coupled"|"cyclic", ``beta_from`` "activations"|"weights") or
    "none" (the baselines' default); ``damping`` is relative to the mean Gram diagonal;
    ``flatten_fit`` ("shared"|"per_position") for linear layers after a flatten.
    ``recalibrate_bn`` re-estimates BatchNorm statistics after each cycle (default True).

    ``example_inputs`` (default: one calibration sample) are used for tracing and MACs.
    ``measure_latency`` times the model before and after on the CPU at
    ``latency_batch_sizes`` (``latency_threads``, about ``latency_seconds`` per size;
    ``latency_channels_last`` times both in the NHWC layout, usually the faster one on CPUs;
    ``latency_compiled`` times both compiled by ``torch.compile``, which fuses the small
    operators that weigh more in a pruned model; it adds tens of seconds of compiling).
    The result's ``masks`` is empty (channels are gone, nothing is masked); ``sparsity`` is
    the fraction of prunable channels removed; ``extra`` holds MACs and parameter ratios,
    whether a MACs target was reached, channel counts per group, the groups left whole and why
    (``skipped_groups``: grouped convolutions, GroupNorms that cannot stay balanced) and
    latency (``None`` when not measured; ``{"skipped": reason}`` for models whose inputs are
    not one floating-point tensor). Groups read by a GroupNorm lose as many channels from
    each of its groups, and keep a multiple of its group count.
    """
    started = time.perf_counter()
    check_targets(sparsity, target_macs_ratio)
    if int(cycles) < 1:
        raise ConfigError(f"cycles must be >= 1, got {cycles}")
    if round_to is not None and int(round_to) < 1:
        raise ConfigError(f"round_to must be a positive channel count such as 8, got {round_to}")
    if not min_channels > 0:
        raise ConfigError(f"min_channels must be > 0 (a count, or a fraction below 1), got {min_channels}")
    is_camp_hive = canonical_criterion(criterion) == "camp-hive"
    channel_score = channel_score or (DEFAULTS["channel_score"] if is_camp_hive else "summed")
    scorer = ChannelScorer(criterion, seed=seed, channel_score=channel_score, **(criterion_options or {}))
    merge = merge or (DEFAULTS["merge"] if scorer.name == "camp-hive" else "none")
    pairing, beta_from = pairing or DEFAULTS["pairing"], beta_from or DEFAULTS["beta_from"]
    flatten_fit = flatten_fit or DEFAULTS["flatten_fit"]
    intercept = DEFAULTS["intercept"] if intercept is None else bool(intercept)
    recalibrate_bn = DEFAULTS["recalibrate_bn"] if recalibrate_bn is None else bool(recalibrate_bn)
    for option, value, choices in (("merge", merge, STRUCTURED_MERGES), ("pairing", pairing, STRUCTURED_PAIRINGS),
                                   ("beta_from", beta_from, BETA_SOURCES), ("flatten_fit", flatten_fit, FLATTEN_FITS)):
        if value not in choices:
            raise ConfigError(f"unknown {option} {value!r} for structured pruning; use one of {', '.join(choices)}")
    batches = take_batches(calib_data, num_batches)
    example = as_input_tuple(example_inputs if example_inputs is not None else batches[0][0][:1])
    _check_example_runs(model, example)
    latency_skipped = _latency_skip_reason(example) if measure_latency else None
    if latency_skipped is None and measure_latency and latency_channels_last and example[0].dim() != 4:
        raise ConfigError("latency_channels_last needs one image input (N, C, H, W); time without it")
    ignored_layers = layer_list(ignored_layers)  # one name given on its own is one layer
    ignored = resolve_ignored(model, ignored_layers)
    original_model = copy.deepcopy(model) if measure_latency and not latency_skipped else None
    out_channels_before = _out_channels(model)
    one_sample = tuple(x[:1] for x in example)
    macs_now = count_macs(model, one_sample)
    before = _summary(model, macs_now)

    history, original_sizes, eigenvalues, num_hvps, curvature_seconds = [], {}, {}, 0, 0.0
    skipped: dict[str, str] = {}
    kept: dict[str, int] = {}
    reached = True
    for cycle in range(int(cycles)):
        cycle_start = time.perf_counter()
        graph = build_dependency_graph(model, example)
        skipped_now: dict[str, str] = {}
        groups = channel_groups(model, graph, ignored, skipped_now)
        if cycle == 0:
            skipped = skipped_now
        if not groups and cycle == 0:
            why = "; ".join(f"{name}: {reason}" for name, reason in skipped.items()) or (
                "every conv/linear output is ignored or is the model's output")
            raise ConfigError(f"the model has no prunable channel groups ({why}); nothing to prune")
        if cycle == 0:
            original_sizes = {group.key: group.size for group in groups}
        macs_model = MacsModel(model, groups, macs_now)
        info = CalibrationInfo(model, batches, prunable_parameters(model), loss_fn=loss_fn, cycle=cycle,
                               settings={"damping": damping, "seed": seed})
        grams = consumer_grams(model, batches, groups, flatten_fit) if _needs_activations(scorer, merge, pairing,
                                                                                          beta_from) else {}
        scores = scorer.scores(model, groups, info, batches, loss_fn, grams=grams, damping=damping)
        fraction_done = (cycle + 1) / int(cycles)
        if target_macs_ratio is not None:
            target_macs = before["macs"] * (1.0 - (1.0 - 1.0 / target_macs_ratio) * fraction_done)
            if global_pruning:
                kept = global_kept_for_macs(groups, original_sizes, scores, macs_model, target_macs, round_to,
                                            min_channels)
            else:
                kept, _ = uniform_kept_for_macs(groups, original_sizes, macs_model, target_macs, round_to, min_channels)
            reached = macs_model.predict(kept) <= target_macs * (1 + 1e-9)
        elif global_pruning:
            total = sum(original_sizes.values())
            removed_so_far = total - sum(group.size for group in groups)
            goal = int(round(sparsity * fraction_done * total))
            kept = global_kept(groups, original_sizes, scores, max(0, goal - removed_so_far), round_to, min_channels)
        else:
            kept = uniform_kept(groups, original_sizes, sparsity * fraction_done, round_to, min_channels)
        removals = {group.key: lowest_channels(score, group.size - kept[group.key], group.blocks)
                    for group, score in zip(groups, scores)}
        removes_any = any(r.numel() for r in removals.values())
        merged = _merge(model, groups, removals, scores, grams, merge, pairing, beta_from, flatten_fit, damping,
                        intercept) if removes_any else {"folded": 0, "unfolded": 0}
        for group in groups:
            remove_channels(graph, group, removals[group.key])
        _check_finite(model, f"cycle {cycle + 1}")
        if recalibrate_bn and removes_any:  # nothing removed: the model stays exactly as it was
            recalibrate_batchnorm(model, batches, reduce_over_processes=True)  # batches: this process's share
        macs_now = count_macs(model, one_sample)
        report = info.report()
        num_hvps += report["num_hvps"]
        curvature_seconds += sum(report["seconds"].values())
        eigenvalues = report["eigenvalues"] or eigenvalues
        history.append({"cycle": cycle + 1, "channels_removed": int(sum(r.numel() for r in removals.values())),
                        "macs_predicted": float(macs_model.predict(kept)),
                        "macs": int(macs_now.total),
                        "folded_consumers": merged["folded"], "unfolded_consumers": merged["unfolded"],
                        "seconds": time.perf_counter() - cycle_start, **report})

    after = _summary(model, macs_now)
    total_channels = sum(original_sizes.values())
    final_sizes = {key: kept.get(key, size) for key, size in original_sizes.items()}
    extra = {
        "macs_before": before["macs"], "macs_after": after["macs"],
        "macs_ratio": before["macs"] / max(after["macs"], 1),
        "macs_conv_linear_ratio": before["macs_conv_linear"] / max(after["macs_conv_linear"], 1),
        "params_before": before["parameters"], "params_after": after["parameters"],
        "params_ratio": before["parameters"] / max(after["parameters"], 1),
        "target_macs_ratio": target_macs_ratio, "target_reached": bool(reached),
        "channels": {key: [size, final_sizes[key]] for key, size in original_sizes.items()},
        "skipped_groups": skipped,
        "latency": ({"skipped": latency_skipped} if latency_skipped else
                    _latency(original_model, model, example, latency_batch_sizes, latency_threads, latency_seconds,
                             latency_channels_last, latency_compiled))
        if measure_latency else None,
    }
    config = {"mode": "structured", **scorer.describe(), "sparsity": sparsity, "target_macs_ratio": target_macs_ratio,
              "cycles": int(cycles), "merge": merge, "pairing": pairing, "beta_from": beta_from,
              "flatten_fit": flatten_fit, "damping": damping, "intercept": intercept, "recalibrate_bn": recalibrate_bn,
              "global_pruning": global_pruning, "round_to": round_to,
              "min_channels": min_channels,
              "ignored_layers": [x if isinstance(x, str) else type(x).__name__ for x in ignored_layers],
              "num_batches": len(batches), "num_samples": sum(int(x.shape[0]) for x, _ in batches), "seed": seed}
    return PruneResult(mode="structured", masks={},
                       sparsity=1.0 - sum(final_sizes.values()) / total_channels if total_channels else 0.0,
                       layer_sparsity=_layer_sparsity(out_channels_before, _out_channels(model)), before=before,
                       after=after, eigenvalues=eigenvalues, num_hvps=num_hvps, curvature_seconds=curvature_seconds,
                       seconds=time.perf_counter() - started, cycles=history, config=config, extra=extra)


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


def check_structured_options(options: dict) -> None:
    """Refuse keyword options :func:`prune_structured` does not take, with the ones it does."""
    known = set(inspect.signature(prune_structured).parameters) - {"model", "calib_data", "sparsity"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(f"unknown option(s) for structured pruning: {', '.join(unknown)}; structured options are "
                          f"{', '.join(sorted(known))}")


def _needs_activations(scorer: ChannelScorer, merge: str, pairing: str, beta_from: str) -> bool:
    merge_reads = merge == "least_squares" or merge == "pair" and (pairing == "coupled" or beta_from == "activations")
    return scorer.needs_activations or merge_reads


def _merge(model, groups, removals, scores, grams, merge, pairing, beta_from, flatten_fit, damping, intercept) -> dict:
    """Fold every group's removed channels into its kept ones; returns which consumers were folded."""
    result = {"folded": 0, "unfolded": []}
    active = [group for group in groups if removals[group.key].numel()]
    if merge == "none" or not active:
        return result
    if not grams:  # coefficients from weights only: zero Grams just name the foldable consumers
        grams = consumer_grams(model, [], active, flatten_fit)
    norms = norms_after(model) if merge == "pair" and beta_from == "weights" or intercept else {}
    by_key = {group.key: score for group, score in zip(groups, scores)}
    for group in active:
        report = merge_group(group, removals[group.key], by_key[group.key], grams, merge, pairing, beta_from, damping,
                             norms, intercept)
        result["folded"] += len(report["consumers"])
        result["unfolded"] += report["unfolded"]
    return result


def _out_channels(model: nn.Module) -> dict[str, int]:
    counts = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            counts[name] = module.out_features
        elif isinstance(module, nn.modules.conv._ConvNd):
            counts[name] = module.out_channels
    return counts


def _layer_sparsity(before: dict[str, int], after: dict[str, int]) -> dict[str, float]:
    return {name: 1.0 - after.get(name, count) / count for name, count in before.items() if count}


def _summary(model: nn.Module, macs: MacsReport) -> dict:
    """Parameters and per-sample MACs (total, and conv + linear as published counts are)."""
    return {"parameters": count_parameters(model), "macs": int(macs.total),
            "macs_conv_linear": int(macs.by_kind["conv"] + macs.by_kind["linear"]), "macs_by_kind": dict(macs.by_kind)}


def _latency(original: nn.Module, pruned: nn.Module, example, batch_sizes, threads, seconds, channels_last,
             compiled) -> dict:
    """Interleaved CPU medians of the model before and after, at each batch size."""
    before = original.cpu()
    after = pruned if all(p.device.type == "cpu" for p in pruned.parameters()) else copy.deepcopy(pruned).cpu()
    report = time_models({"before": before, "after": after}, tuple(example[0].shape[1:]), batch_sizes=batch_sizes,
                         threads=threads, target_seconds=seconds, channels_last=channels_last, compiled=compiled)
    result = {"threads": report.threads, "channels_last": report.channels_last, "compiled": report.compiled,
              "load_average": report.load_average}
    for batch_size in batch_sizes:
        old, new = report.get("before", int(batch_size)), report.get("after", int(batch_size))
        result[f"batch_{int(batch_size)}"] = {"before_ms": old.median_ms, "after_ms": new.median_ms,
                                              "speedup": new.speedup, "before_iqr_ms": old.iqr_ms,
                                              "after_iqr_ms": new.iqr_ms, "repeats": new.repeats}
    return result


def _check_finite(model: nn.Module, where: str) -> None:
    for name, parameter in model.named_parameters():
        if not torch.isfinite(parameter).all():
            raise NumericalError(f"parameter {name} holds NaN or inf after {where}; check the model (or raise damping)")
