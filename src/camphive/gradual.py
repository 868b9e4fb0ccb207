"""Gradual pruning during fine-tuning, for every weight criterion (Zhu & Gupta 2017's schedule).

Sparsity rises on the cubic schedule over ``P`` pruning steps spread evenly over the first
80 % of the training steps (the first at step 0; the last 20 % let the model recover): after
pruning step ``k`` (``k = 1..P``) the target is

    s_k = s_i + (s_f - s_i) (1 - (1 - k / P)^3)

(``s_i``: the sparsity of the masks given, 0 without; ``s_k`` with ``k = P`` is exactly
``s_f``). Each pruning step is one cycle of :func:`camphive.prune` on the calibration batches,
on the model as training has left it, from the masks so far: the criterion scores the weights
still alive, the lowest are selected up to ``s_k`` (counted exactly, as in one-shot pruning),
CAMP-HiVe merges them into kept weights, BatchNorm statistics are re-estimated (as configured).
Between pruning steps training enforces the masks (gradients masked before, weights after every
optimizer step), so a pruned weight stays exactly zero. With ``criterion="magnitude"`` this is
gradual magnitude pruning, the usual baseline; with CAMP-HiVe the weights' significance is
re-measured on the network as it adapts.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping

import torch
from torch import nn

from camphive import distributed as dist_tools
from camphive.batches import as_batches, take_batches
from camphive.errors import ConfigError
from camphive.layers import prunable_parameters
from camphive.pruning import prune
from camphive.pruning.core.result import PruneResult
from camphive.pruning.settings import settings_for
from camphive.pruning.unstructured.masks import sparsity_of
from camphive.pruning.unstructured.selection import check_target_reachable, cycle_targets
from camphive.training import TrainResult, train

DEFAULT_PRUNING_STEPS = 10
RECOVERY_FRACTION = 0.2  # the last training steps prune nothing, so the model recovers from the last step


def gradual_targets(sparsity: float, pruning_steps: int, initial: float = 0.0) -> list[float]:
    """Target sparsity after each pruning step: the cubic schedule from ``initial`` to exactly ``sparsity``."""
    if initial > sparsity:
        raise ConfigError(f"the masks given are already {initial:.4f} sparse, above the target {sparsity}; "
                          "raise the sparsity or start from fewer pruned weights")
    targets = [initial + value for value in cycle_targets(sparsity - initial, pruning_steps, "cubic")]
    targets[-1] = sparsity
    return targets


def pruning_positions(total_steps: int, pruning_steps: int, recovery_fraction: float = RECOVERY_FRACTION) -> list[int]:
    """Training steps (from 0) at which to prune: evenly spaced over the first ``1 - recovery_fraction`` of them."""
    if pruning_steps < 1:
        raise ConfigError(f"pruning_steps must be >= 1, got {pruning_steps}")
    window = max(1, int(total_steps * (1.0 - recovery_fraction)))
    if pruning_steps > window:
        raise ConfigError(f"{pruning_steps} pruning steps do not fit the {window} training steps before recovery "
                          f"({total_steps} in all); lower pruning_steps or train longer")
    return [k * window // pruning_steps for k in range(pruning_steps)]


def prune_gradually(model: nn.Module, train_data, calib_data, sparsity: float, *, epochs: int,
                    pruning_steps: int = DEFAULT_PRUNING_STEPS, lr: float = 0.01,
                    masks: Mapping[str, torch.Tensor] | None = None, loss_fn=None, device="auto", seed: int = 0,
                    batch_size: int = 128, eval_data=None, train_options: dict | None = None,
                    on_pruning_step: Callable[[dict], None] | None = None,
                    **prune_options) -> tuple[PruneResult, TrainResult]:
    """Train ``model`` for ``epochs`` with masks while pruning it gradually to ``sparsity``; in place.

    ``train_data``: training batches (a DataLoader, a Dataset or a list of batches, of known
    length); ``calib_data``: the calibration batches every pruning step reads. ``pruning_steps``
    steps on the cubic schedule (module docstring). ``lr``, ``device``, ``seed``, ``batch_size``,
    ``eval_data`` and ``train_options`` (momentum, weight_decay, schedule, ...) go to
    :func:`camphive.train`; ``prune_options`` (criterion, merge, min_keep, ...) to each cycle of
    :func:`camphive.prune` (unstructured; ``cycles`` and ``schedule`` are this function's; ``refit`` is off
    unless passed: the training between steps recovers, and a refit per step would cost a forward pass more).
    ``on_pruning_step(record)`` after each pruning step.

    Returns ``(result, trained)``: a :class:`PruneResult` whose ``cycles`` are the pruning steps
    (training step, target, sparsity reached, seconds) and whose ``masks`` are the final ones,
    and the :class:`~camphive.training.TrainResult`.
    """
    for option in ("cycles", "schedule"):
        if option in prune_options:
            raise ConfigError(f"gradual pruning runs one cycle per pruning step on the cubic schedule; drop {option} "
                              "(set pruning_steps instead)")
    if prune_options.pop("mode", "unstructured") != "unstructured":
        raise ConfigError("gradual pruning masks single weights (unstructured); prune channels with camphive.prune "
                          "and then fine-tune")
    if dist_tools.resolve(None):
        raise ConfigError("gradual pruning runs in one process; run it without torchrun")
    settings = settings_for("unstructured", sparsity=sparsity, cycles=1, seed=seed,
                            **{"refit": False, **prune_options})
    if epochs < 1:
        raise ConfigError(f"gradual pruning prunes while training; pass epochs >= 1, got {epochs}")
    alive = {name: (masks[name].bool() if masks and name in masks else torch.ones_like(p, dtype=torch.bool))
             for name, p in prunable_parameters(model, settings.ignored_layers).items()}
    check_target_reachable(alive, sparsity, settings.selection, settings.min_keep)
    targets = gradual_targets(sparsity, pruning_steps, sparsity_of(alive)[0])
    positions = pruning_positions(epochs * _steps_per_epoch(train_data, batch_size, seed), pruning_steps)
    calib = take_batches(calib_data, settings.num_batches)
    pruner = _Pruner(model, calib, dict(zip(positions, targets)), settings, masks, loss_fn, on_pruning_step)
    trained = train(model, train_data, epochs, lr=lr, masks=masks, loss_fn=loss_fn, device=device, seed=seed,
                    batch_size=batch_size, eval_data=eval_data, on_step=pruner, **(train_options or {}))
    return pruner.result(pruning_steps, positions, epochs), trained


def _steps_per_epoch(train_data, batch_size: int, seed: int) -> int:
    try:
        return len(as_batches(train_data, batch_size=batch_size, shuffle=True, seed=seed))  # type: ignore[arg-type]
    except TypeError:
        raise ConfigError("gradual pruning needs training data of known length (a DataLoader, a Dataset or a list "
                          "of batches) to place its pruning steps") from None


class _Pruner:
    """The ``on_step`` hook of :func:`camphive.train`: one pruning cycle at each scheduled step."""

    def __init__(self, model, calib, schedule: dict[int, float], settings, masks, loss_fn, on_pruning_step):
        self.model, self.calib, self.schedule, self.loss_fn, self.settings = model, calib, schedule, loss_fn, settings
        self.masks = {name: mask.clone() for name, mask in masks.items()} if masks else None
        self.on_pruning_step = on_pruning_step
        self.results: list[PruneResult] = []
        self.records: list[dict] = []

    def __call__(self, step: int, total_steps: int):
        if step not in self.schedule:
            return None
        target = self.schedule[step]
        was_training = self.model.training
        started = time.perf_counter()
        result = prune(self.model, self.calib, settings=dataclasses.replace(self.settings, sparsity=target),
                       masks=self.masks, loss_fn=self.loss_fn)
        self.model.train(was_training)
        self.masks = result.masks
        pruned = sum(int((~mask).sum()) for mask in result.masks.values())
        total = sum(mask.numel() for mask in result.masks.values())
        record = {"cycle": len(self.records) + 1, "step": step, "total_steps": total_steps, "target": target,
                  "sparsity": result.sparsity, "pruned_weights": pruned, "weights": total,
                  "seconds": time.perf_counter() - started}
        self.results.append(result)
        self.records.append(record)
        if self.on_pruning_step is not None:
            self.on_pruning_step(record)
        return self.masks

    def result(self, pruning_steps: int, positions: list[int], epochs: int) -> PruneResult:
        """The whole run as one :class:`PruneResult`: its cycles are the pruning steps."""
        if not self.results:
            raise ConfigError("training ended before the first pruning step; check the training data")
        first, last = self.results[0], self.results[-1]
        config = {**last.config, "cycles": len(self.records),
                  "gradual": {"pruning_steps": pruning_steps, "schedule": "cubic", "epochs": epochs,
                              "training_steps": positions, "recovery_fraction": RECOVERY_FRACTION}}
        global_sparsity, layer_sparsity = sparsity_of(last.masks)
        return PruneResult(mode="unstructured", masks=last.masks, sparsity=global_sparsity,
                           layer_sparsity=layer_sparsity, before=first.before, after=last.after,
                           eigenvalues=last.eigenvalues, num_hvps=sum(r.num_hvps for r in self.results),
                           curvature_seconds=sum(r.curvature_seconds for r in self.results),
                           seconds=sum(record["seconds"] for record in self.records), cycles=self.records,
                           config=config, extra={"schedule": "gradual"})
