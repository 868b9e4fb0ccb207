"""Wanda (Sun, Liu, Bair and Kolter, 2023): pruning by weights and activations.

Weight ``W_rj`` (output unit r, input feature j) scores ``|W_rj| * ||X_j||_2``: its size times the
norm of input feature j over the calibration data (a linear layer's input features; a convolution's
im2col patch entries, per group for grouped convolutions). With ``G = E[x x^T]`` over the layer's
``n`` input rows, ``||X_j||_2 = sqrt(n G_jj)``; the scores here are ``|W_rj| sqrt(G_jj)``, the norm
divided by ``sqrt(n)`` (the root mean square of the feature). Within a layer that constant changes
nothing; across layers (``selection="global"``) it puts layers that see different numbers of rows
(output positions) on one per-position scale. The paper compares scores within each output unit
(``selection="unit"``, the default for this criterion) and prunes without updating the weights
(``merge="none"``, the default).
"""
from __future__ import annotations

import torch

from camphive.pruning.core.unit_curvature import unit_matrix
from camphive.pruning.criteria.base import Criterion, Scores


class Wanda(Criterion):
    """``|w_rj| * sqrt(G_jj)``: weight magnitude times the RMS of its input feature (see the module)."""

    name = "wanda"

    def scores(self, info) -> Scores:
        covariances = info.covariances()
        result = {}
        for name, weight in info.weights().items():
            matrix = unit_matrix(weight.detach())
            norms = feature_norms(covariances[name], matrix.shape[0]).to(matrix)
            result[name] = (matrix.abs() * norms).reshape(weight.shape)
        return result


def feature_norms(covariance: torch.Tensor, out_units: int) -> torch.Tensor:
    """``(out_units, fan_in)``: ``sqrt(G_jj)`` of the group each output unit reads.

    ``covariance``: ``(groups, fan_in, fan_in)``; output unit r belongs to group
    ``r // (out_units / groups)``.
    """
    norms = covariance.diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt()  # (groups, fan_in)
    return norms.repeat_interleave(out_units // norms.shape[0], dim=0)
