"""Pruning: one entry point (:func:`prune`) for both modes.

* :mod:`camphive.pruning.core`: what both modes share (calibration statistics, unit
  curvature, checks, BatchNorm re-estimation, the result record);
* :mod:`camphive.pruning.criteria`: importance criteria (objects that score weights);
* :mod:`camphive.pruning.unstructured`: selection, merges and masks of single weights;
* :mod:`camphive.pruning.structured`: channel groups, scores, budgets and channel merges.
"""
from camphive.pruning.core.result import PruneResult
from camphive.pruning.unstructured.masks import apply_masks, mask_gradients, sparsity_of
from camphive.pruning.unstructured.prune import prune

__all__ = ["prune", "PruneResult", "apply_masks", "mask_gradients", "sparsity_of"]
