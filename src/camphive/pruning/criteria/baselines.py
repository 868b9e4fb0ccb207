"""The classic per-weight baselines: magnitude, random, first-order Taylor, OBD and Hutchinson."""
from __future__ import annotations

import torch

from camphive.pruning.criteria.base import Criterion, Scores


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

    def scores(self, info) -> Scores:
        gradient = info.gradient()
        return {name: (weight.detach() * gradient[name]).abs() for name, weight in info.weights().items()}


class OptimalBrainDamage(Criterion):
    """1/2 w^2 F_ii with F the empirical Fisher (per-sample squared gradients): OBD's diagonal."""

    name = "obd"

    def scores(self, info) -> Scores:
        fisher = info.fisher_diagonal()
        return {name: 0.5 * weight.detach() ** 2 * fisher[name] for name, weight in info.weights().items()}


class HutchinsonDiagonal(Criterion):
    """1/2 w^2 |H_ii| with H_ii the Hutchinson estimate of the loss Hessian's diagonal.

    The absolute value is taken because a single-probe estimate of a small diagonal entry
    is often negative by noise; ranking by it would prune those first regardless of size.
    """

    name = "hutchinson"

    def scores(self, info) -> Scores:
        diagonal = info.hutchinson_diagonal()
        return {name: 0.5 * weight.detach() ** 2 * diagonal[name].abs() for name, weight in info.weights().items()}
