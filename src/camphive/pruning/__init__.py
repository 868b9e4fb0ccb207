"""Pruning: one entry point (:func:`prune`) for both modes.

* :mod:`camphive.pruning.core`: what both modes share (the cycle driver, calibration
  statistics, unit curvature, checks, BatchNorm re-estimation, settings base, result);
* :mod:`camphive.pruning.criteria`: importance criteria (objects that score weights and channels);
* :mod:`camphive.pruning.unstructured`: selection, merges and masks of single weights;
* :mod:`camphive.pruning.structured`: channel groups, budgets and channel merges.
"""
from camphive.pruning.api import prune
from camphive.pruning.core.result import PruneResult
from camphive.pruning.criteria import Criterion
from camphive.pruning.settings import check_prune_settings, settings_for
from camphive.pruning.structured.prune import prune_structured
from camphive.pruning.structured.settings import StructuredSettings
from camphive.pruning.unstructured.masks import apply_masks, mask_gradients, sparsity_of
from camphive.pruning.unstructured.prune import prune_unstructured
from camphive.pruning.unstructured.settings import UnstructuredSettings

__all__ = ["prune", "prune_unstructured", "prune_structured", "PruneResult", "Criterion", "UnstructuredSettings",
           "StructuredSettings", "settings_for", "check_prune_settings", "apply_masks", "mask_gradients", "sparsity_of"]
