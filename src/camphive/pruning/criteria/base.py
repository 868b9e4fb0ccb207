"""The criterion interface: one object scores weights, and channels, for both pruning modes.

A criterion has one job: given a :class:`~camphive.pruning.core.calibration.CalibrationInfo`
(which computes gradients, curvature and eigenpairs lazily, once per cycle, and knows the
model, the calibration batches and the loss), return importance scores; higher means more
important. The pruning driver does everything else, identically for every criterion, so
comparisons are fair by construction.

* ``scores(info)``: ``{parameter name: scores shaped like the weight}`` for every prunable
  weight in ``info.weights()`` (unstructured pruning, and the default for channels);
* ``channel_scores(groups, info)``: ``[(group.size,) scores per channel group]`` (structured
  pruning); by default the per-weight scores summed over each group's weights.

Write your own by subclassing :class:`Criterion` and passing an instance as ``criterion=``.
"""
from __future__ import annotations

import torch

Scores = dict[str, torch.Tensor]


class Criterion:
    """Base class of importance criteria. Override ``scores`` (weights), ``channel_scores``
    (channels) or both; ``name`` appears in reports."""

    name = "criterion"
    needs_activations = False  # structured: channel_scores reads the consumers' Grams (info.grams)

    def scores(self, info) -> Scores:
        raise NotImplementedError(f"criterion {self.name} scores channels only")

    def channel_scores(self, groups, info) -> list[torch.Tensor]:
        weight_scores = self.scores(info)
        return [group.sum_weight_scores(weight_scores) for group in groups]

    def scores_weights(self) -> bool:
        """Whether this criterion can rank single weights (unstructured pruning)."""
        return type(self).scores is not Criterion.scores

    def describe(self) -> dict:
        return {"criterion": self.name}
