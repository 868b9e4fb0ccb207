"""Criteria that solve whole layers: SparseGPT and OBC (Optimal Brain Compression).

A :class:`LayerSolverCriterion` does not score weights for a selection; given a layer's weight
``W (out_units, fan_in)``, its ``G = E[x x^T]`` and how many entries the layer must lose, it picks
the entries itself and updates the kept ones to preserve the layer's outputs (its own merge).
Unstructured pruning (:mod:`camphive.pruning.unstructured.layer_solvers`) decides the count per
layer (uniform per layer, or from CAMP-HiVe's global selection), gathers each layer's ``G`` on the
inputs the already-solved layers before it produce (sequentially, as in SparseGPT), and calls
:meth:`LayerSolverCriterion.solve_layer` once per layer (per group of a grouped convolution).

Write your own by subclassing :class:`LayerSolverCriterion` and overriding ``solve_layer``.
"""
from __future__ import annotations

import torch

from camphive.errors import ConfigError
from camphive.pruning.criteria.base import Criterion


class LayerSolverCriterion(Criterion):
    """A criterion that prunes a layer by solving it (choice of entries and update of the rest).

    ``damping``: added to ``G``'s diagonal as this fraction of its mean before solving (set by the
    run from its ``damping`` option). ``sequential``: whether each layer's ``G`` is gathered on the
    outputs of the layers solved before it in the same cycle (True) or on the model as the cycle
    found it (False).
    """

    name = "layer-solver"
    sequential = True

    def __init__(self, damping: float = 0.01):
        self.damping = damping

    def solve_layer(self, weight_matrix: torch.Tensor, gram: torch.Tensor, count: int | None, alive: torch.Tensor,
                    pattern: tuple[int, int] | None = None, *,
                    layer: str = "layer") -> tuple[torch.Tensor, torch.Tensor]:
        """``(new_weight, kept)``, both ``(out_units, fan_in)``: the layer with exactly ``count`` entries pruned
        (those already pruned, ``alive`` False, included; or the N:M ``pattern`` instead of a count), pruned
        entries exactly zero. ``gram``: ``(fan_in, fan_in)`` undamped ``E[x x^T]``; ``layer`` names it in errors."""
        raise NotImplementedError

    def check_layer(self, layer: str, out_units: int, fan_in: int) -> None:
        """Refuse a layer this solver cannot take, before any layer is solved (one-line ConfigError)."""

    def scores_weights(self) -> bool:
        """Solvers prune single weights (unstructured pruning), though through ``solve_layer``, not ``scores``."""
        return True

    def scores(self, info):
        raise ConfigError(f"criterion {self.name} solves whole layers and has no per-weight scores; use it through "
                          "camphive.prune (unstructured)")

    def channel_scores(self, groups, info) -> list[torch.Tensor]:
        raise ConfigError(f"criterion {self.name} prunes single weights only; use mode='unstructured'")

    def describe(self) -> dict:
        return {"criterion": self.name, "damping": self.damping, "sequential": self.sequential}


class SparseGPT(LayerSolverCriterion):
    """SparseGPT (Frantar and Alistarh, 2023): one sweep of OBS over the columns, lazy blocks of
    ``block_size`` columns, mask chosen adaptively per block
    (:func:`camphive.pruning.unstructured.sparsegpt.sparsegpt_prune`)."""

    name = "sparsegpt"

    def __init__(self, damping: float = 0.01, block_size: int = 128):
        super().__init__(damping)
        self.block_size = block_size

    def solve_layer(self, weight_matrix, gram, count, alive, pattern=None, *, layer="layer"):
        from camphive.pruning.unstructured.sparsegpt import sparsegpt_prune

        return sparsegpt_prune(weight_matrix, gram, count, alive=alive, block_size=self.block_size,
                               damping=self.damping, pattern=pattern)

    def describe(self) -> dict:
        return {**super().describe(), "block_size": self.block_size}


class OptimalBrainCompression(LayerSolverCriterion):
    """OBC / ExactOBS (Frantar and Alistarh, 2022): greedy OBS per row with the exact inverse downdate and the
    layer's error database choosing each row's count (:func:`camphive.pruning.unstructured.obc.obc_prune`).
    Layers with a fan-in above ``max_fan_in`` are refused (cost ``fan_in^3`` per row)."""

    name = "obc"

    def __init__(self, damping: float = 0.01, max_fan_in: int = 4096):
        super().__init__(damping)
        self.max_fan_in = max_fan_in

    def check_layer(self, layer: str, out_units: int, fan_in: int) -> None:
        if fan_in > self.max_fan_in:
            raise ConfigError(f"{layer} of {out_units} x {fan_in} has fan-in {fan_in} above OBC's max_fan_in "
                              f"{self.max_fan_in} (cost fan_in^3 per row); use sparsegpt, or ignore that layer")

    def solve_layer(self, weight_matrix, gram, count, alive, pattern=None, *, layer="layer"):
        from camphive.pruning.unstructured.obc import obc_prune

        return obc_prune(weight_matrix, gram, count, alive=alive, damping=self.damping, pattern=pattern,
                         max_fan_in=self.max_fan_in, layer=layer)

    def describe(self) -> dict:
        return {**super().describe(), "max_fan_in": self.max_fan_in}
