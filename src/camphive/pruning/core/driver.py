"""The one cycle driver: every pruning run, of either mode and any criterion, goes through it.

Each cycle: calibrate (a fresh :class:`~camphive.pruning.core.calibration.CalibrationInfo` on
the model as it is now), let the mode score, select, merge and remove or mask
(:meth:`PruningMode.run_cycle`), check that every parameter is finite, re-estimate BatchNorm
statistics, record what the cycle did and cost, and call ``on_cycle_end``. The modes
(:mod:`camphive.pruning.unstructured.prune`, :mod:`camphive.pruning.structured.prune`) supply
only what differs: what a target is, how units are selected, merged and removed.

Interruptions: ``on_cycle_end(cycle, state, record)`` is called after every completed cycle
(counted from 1) with the mode's state (unstructured: the masks; structured: the kept channel
counts); a run stopped after cycle k continues exactly with ``start_cycle=k`` on the model
saved at that point (and, unstructured, ``masks=<those masks>``).

Progress: every cycle logs its start, the end of its scoring, selection and merge, and its end,
with seconds, on the ``camphive.pruning`` logger at INFO (silent unless the caller configures
logging, e.g. ``logging.basicConfig(level=logging.INFO)``); calibration statistics log their
seconds there too (:class:`~camphive.pruning.core.calibration.CalibrationInfo`).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from camphive.errors import NumericalError
from camphive.pruning.core.batchnorm import recalibrate_batchnorm
from camphive.pruning.core.calibration import CalibrationInfo

log = logging.getLogger("camphive.pruning")


@dataclass
class CycleOutcome:
    """What one cycle changed: ``changed`` (anything removed), ``record`` (mode-specific counts)."""

    changed: bool
    record: dict = field(default_factory=dict)


class PruningMode:
    """What a mode supplies to the driver. ``settings`` are its checked settings."""

    settings = None

    def targets(self) -> list:
        """One target per cycle (a sparsity, or a fraction of the way to a MACs target)."""
        raise NotImplementedError

    def calibrated_parameters(self) -> dict[str, nn.Parameter]:
        """The weights the cycle's calibration statistics are gathered for."""
        raise NotImplementedError

    def run_cycle(self, cycle: int, target, info: CalibrationInfo) -> CycleOutcome:
        """Score, select, merge and remove (or mask), in place."""
        raise NotImplementedError

    def after_cycle(self, outcome: CycleOutcome) -> dict:
        """Bookkeeping once BatchNorm is re-estimated (e.g. MACs now); merged into the record."""
        return {}

    def state(self):
        """What ``on_cycle_end`` receives to resume from."""
        return None


@dataclass
class CycleHistory:
    """Every completed cycle's record, and the curvature costs summed over them."""

    cycles: list[dict] = field(default_factory=list)
    eigenvalues: dict = field(default_factory=dict)
    num_hvps: int = 0
    curvature_seconds: float = 0.0


def run_cycles(model: nn.Module, batches: list, mode: PruningMode, *, loss_fn=None, start_cycle: int = 0,
               on_cycle_end=None) -> CycleHistory:
    """Run ``mode``'s cycles from ``start_cycle`` on; return their history."""
    settings = mode.settings
    history = CycleHistory()
    calibration = {"damping": settings.damping, "seed": settings.seed,
                   **{key: getattr(settings, key) for key in ("top_k", "scope", "eigen_method", "hutchinson_probes",
                                                              "loss_diagonal") if hasattr(settings, key)}}
    targets = mode.targets()
    for cycle, target in enumerate(targets):
        if cycle < start_cycle:
            continue
        started = time.perf_counter()
        where = f"cycle {cycle + 1}/{len(targets)}"
        log.info("%s: target %s", where, target)
        info = CalibrationInfo(model, batches, mode.calibrated_parameters(), loss_fn=loss_fn, cycle=cycle,
                               settings=calibration)
        try:
            outcome = mode.run_cycle(cycle, target, info)
            log.info("%s: scored, selected and merged after %.1f s", where, time.perf_counter() - started)
            check_finite(model, f"cycle {cycle + 1}")
            if settings.recalibrate_bn and outcome.changed:  # nothing removed: the model stays exactly as it was
                log.info("%s: re-estimating BatchNorm statistics", where)
                recalibrate_batchnorm(model, batches, reduce_over_processes=True)  # batches: this process's share
            outcome.record.update(mode.after_cycle(outcome))
            report = info.report()
        finally:
            info.close()
        history.num_hvps += report["num_hvps"]
        history.curvature_seconds += sum(report["seconds"].values())  # before the record takes them
        history.eigenvalues = report["eigenvalues"] or history.eigenvalues
        stage_seconds = report.pop("seconds")  # per calibration statistic; "seconds" is the cycle's wall time
        history.cycles.append({"cycle": cycle + 1, **outcome.record, **report, "stage_seconds": stage_seconds,
                               "seconds": time.perf_counter() - started})
        log.info("%s: done in %.1f s", where, time.perf_counter() - started)
        if on_cycle_end is not None:
            on_cycle_end(cycle + 1, mode.state(), history.cycles[-1])
    return history


def check_finite(model: nn.Module, where: str) -> None:
    """Every parameter finite after ``where``, or one line naming the first that is not."""
    for name, parameter in model.named_parameters():
        if not torch.isfinite(parameter).all():
            raise NumericalError(f"parameter {name} holds NaN or inf after {where}; check the model "
                                 "(or raise damping, lower clip)")
