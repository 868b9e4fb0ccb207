"""Importance criteria: each turns calibration information into per-weight scores.

A criterion has one job: given a :class:`~camphive.pruning.core.calibration.CalibrationInfo`
(which computes gradients, curvature and eigenpairs lazily, once per cycle), return
``{parameter name: scores shaped like the weight}``; higher means more important. The
pruning pipeline does everything else, identically for every criterion, so comparisons
are fair by construction.
"""
from __future__ import annotations

import torch

from camphive.errors import ConfigError
from camphive.pruning.core.unit_curvature import unit_matrix

Scores = dict[str, torch.Tensor]


class Criterion:
    name = "criterion"
    needs: frozenset[str] = frozenset()

    def scores(self, info) -> Scores:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"criterion": self.name}


class Magnitude(Criterion):
    """|w|: the classic baseline."""

    name = "magnitude"

    def scores(self, info) -> Scores:
        return {name: weight.detach().abs() for name, weight in info.weights().items()}


class RandomScores(Criterion):
    """Uniform random scores (seeded per cycle): the floor every criterion must beat."""

    name = "random"

    def __init__(self, seed: int = 0):
        self.seed = seed

    def scores(self, info) -> Scores:
        generator = torch.Generator().manual_seed(self.seed * 7919 + info.cycle)
        return {name: torch.rand(weight.shape, generator=generator).to(weight.device)
                for name, weight in info.weights().items()}


class Taylor(Criterion):
    """|g * w|: first-order Taylor estimate of the loss change (Molchanov et al.)."""

    name = "taylor"
    needs = frozenset({"gradient"})

    def scores(self, info) -> Scores:
        gradient = info.gradient()
        return {name: (weight.detach() * gradient[name]).abs() for name, weight in info.weights().items()}


class OptimalBrainDamage(Criterion):
    """1/2 w^2 F_ii with F the empirical Fisher (per-sample squared gradients): OBD's diagonal."""

    name = "obd"
    needs = frozenset({"fisher"})

    def scores(self, info) -> Scores:
        fisher = info.fisher_diagonal()
        return {name: 0.5 * weight.detach() ** 2 * fisher[name] for name, weight in info.weights().items()}


class HutchinsonDiagonal(Criterion):
    """1/2 w^2 |H_ii| with H_ii the Hutchinson estimate of the loss Hessian's diagonal.

    The absolute value is taken because a single-probe estimate of a small diagonal entry
    is often negative by noise; ranking by it would prune those first regardless of size.
    """

    name = "hutchinson"
    needs = frozenset({"hutchinson"})

    def scores(self, info) -> Scores:
        diagonal = info.hutchinson_diagonal()
        return {name: 0.5 * weight.detach() ** 2 * diagonal[name].abs() for name, weight in info.weights().items()}


CAMP_HIVE_SCORES = ("diagonal", "obs", "diag_lowrank", "hv_product")
LOSS_WEIGHTINGS = ("none", "unit", "layer", "batchnorm")


class CampHive(Criterion):
    """CAMP-HiVe's curvature scores (METHOD.md §2).

    ``score``:
      * ``"diagonal"``: 1/2 w_i^2 Hhat_ii with Hhat the chosen curvature (reconstruction G_jj or
        the loss Hessian's low-rank + Hutchinson diagonal);
      * ``"obs"``: the Optimal Brain Surgeon saliency w_i^2 / (2 [Hhat^-1]_ii) within the unit;
      * ``"diag_lowrank"``: 1/2 w_i^2 sum_k |lambda_k| u_{k,i}^2 from the loss Hessian's top eigenpairs;
      * ``"hv_product"``: |w_i (H v)_i| with v the dominant eigenvector (the authors' reading).
    ``loss_weighting`` (reconstruction curvature only) multiplies unit r's scores by the loss
    curvature of its output, A_rr = sum_j diag(H)_rj / tr(G) (the Kronecker-factored reading
    diag(H) ~ A_rr G_jj), estimated per unit (``"unit"``) or per layer (``"layer"``), so that
    reconstruction errors of different layers are weighed by what they cost the loss;
    ``"batchnorm"`` multiplies them instead by (gamma_r / sigma_r)^2 of the BatchNorm that reads
    the unit's output (see :mod:`camphive.pruning.core.output_scale`), 1 where none does.
    ``first_order_weight`` adds that multiple of |g_i w_i|.
    """

    name = "camp-hive"

    def __init__(self, score: str = "diagonal", curvature: str = "reconstruction", loss_weighting: str = "none",
                 first_order_weight: float = 0.0):
        if score not in CAMP_HIVE_SCORES:
            raise ConfigError(f"unknown score {score!r}; use one of {', '.join(CAMP_HIVE_SCORES)}")
        if loss_weighting not in LOSS_WEIGHTINGS:
            raise ConfigError(f"unknown loss_weighting {loss_weighting!r}; use one of {', '.join(LOSS_WEIGHTINGS)}")
        if score in ("diag_lowrank", "hv_product"):
            curvature = "loss"
        if loss_weighting != "none" and curvature != "reconstruction":
            raise ConfigError("loss_weighting applies to curvature='reconstruction' only; set loss_weighting='none'")
        self.score, self.curvature = score, curvature
        self.loss_weighting, self.first_order_weight = loss_weighting, first_order_weight
        needs = {"gradient"} if first_order_weight else set()
        if score == "diag_lowrank":
            needs.add("eigenpairs")
        elif score == "hv_product":
            needs.add("eigenpairs")
        else:
            needs.add(curvature)
        if loss_weighting in ("unit", "layer"):
            needs.add("loss_diagonal")
        self.needs = frozenset(needs)

    def describe(self) -> dict:
        return {"criterion": self.name, "score": self.score, "curvature": self.curvature,
                "loss_weighting": self.loss_weighting, "first_order_weight": self.first_order_weight}

    def scores(self, info) -> Scores:
        weights = info.weights()
        if self.score == "hv_product":
            products = info.dominant_hv_product()
            result = {name: (weight.detach() * products[name]).abs() for name, weight in weights.items()}
        elif self.score == "diag_lowrank":
            diagonal = info.lowrank_diagonal()
            result = {name: 0.5 * weight.detach() ** 2 * diagonal[name] for name, weight in weights.items()}
        else:
            view = info.unit_curvature(self.curvature)
            result = {}
            for name, weight in weights.items():
                matrix = unit_matrix(weight.detach())
                if self.score == "obs":
                    inverse = view.inverse_diagonal(name, matrix.shape[0]).to(matrix)
                    score = matrix**2 / (2.0 * inverse)
                else:
                    score = 0.5 * matrix**2 * view.diagonal(name, matrix.shape[0]).to(matrix)
                if self.loss_weighting == "batchnorm":
                    score = score * info.output_scale(name).to(matrix)[:, None]
                elif self.loss_weighting != "none":
                    score = score * info.output_curvature(name, self.loss_weighting).to(matrix)[:, None]
                result[name] = score.reshape(weight.shape)
        if self.first_order_weight:
            gradient = info.gradient()
            for name, weight in weights.items():
                result[name] = result[name] + self.first_order_weight * (weight.detach() * gradient[name]).abs()
        return result


CRITERIA = ("camp-hive", "magnitude", "random", "taylor", "obd", "hutchinson")


def make_criterion(name: str, seed: int = 0, **options) -> Criterion:
    """Build a criterion by name; ``options`` go to CAMP-HiVe (score, curvature, ...)."""
    key = str(name).strip().lower().replace("_", "-")
    if key in ("camp-hive", "camphive"):
        return CampHive(**options)
    simple = {"magnitude": Magnitude, "l1": Magnitude, "taylor": Taylor, "obd": OptimalBrainDamage,
              "fisher": OptimalBrainDamage, "hutchinson": HutchinsonDiagonal}
    if key == "random":
        return RandomScores(seed)
    if key in simple:
        return simple[key]()
    raise ConfigError(f"unknown criterion {name!r}; use one of {', '.join(CRITERIA)}")
