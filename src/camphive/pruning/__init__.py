"""Pruning: criteria, pairing, merging, masks and the pipeline that runs them."""
from camphive.pruning.masks import apply_masks, mask_gradients, sparsity_of
from camphive.pruning.pipeline import PruneResult, prune

__all__ = ["prune", "PruneResult", "apply_masks", "mask_gradients", "sparsity_of"]
