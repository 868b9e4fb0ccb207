"""Calibration information for one pruning cycle, computed lazily and once.

Criteria and merges ask for what they need (gradient, Fisher or Hutchinson diagonals, loss
eigenpairs, layer input covariances); each is computed on first request from the same
calibration batches, on the model as it is at the start of the cycle, and its cost (Hessian-
vector products, seconds) is recorded for the report.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Mapping

import torch
from torch import nn

from camphive.curvature.eigen import top_eigenpairs
from camphive.curvature.fisher import empirical_fisher_diagonal
from camphive.curvature.hutchinson import hutchinson_diagonal
from camphive.curvature.hvp import HessianOperator
from camphive.curvature.reconstruction import layer_input_covariances
from camphive.errors import NumericalError
from camphive.pruning.core.output_scale import batchnorm_output_scale, normalizing_batchnorms
from camphive.pruning.core.unit_curvature import LowRankLossCurvature, ReconstructionCurvature, unit_matrix

log = logging.getLogger("camphive.pruning")


class CalibrationInfo:
    """What a cycle knows about the model's curvature; every quantity keyed by parameter name."""

    def __init__(self, model: nn.Module, batches: list, params: Mapping[str, nn.Parameter], *, loss_fn=None,
                 cycle: int = 0, settings: Mapping | None = None):
        self.model, self.batches, self.params = model, batches, dict(params)
        self.layer_names = {name: name.rsplit(".", 1)[0] if "." in name else "" for name in self.params}
        self.loss_fn, self.cycle = loss_fn, cycle
        self.settings = {
            "top_k": 8, "eigen_method": "lanczos", "eigen_tol": 1e-3, "eigen_max_iter": 100, "scope": "global",
            "hutchinson_probes": 16, "damping": 0.01, "loss_diagonal": "fisher", "seed": 0, **(settings or {}),
        }
        self.grams: dict | None = None  # structured: the consumers' Grams of this cycle's channel groups
        self._cache: dict = {}
        self.num_hvps = 0
        self.seconds: dict[str, float] = {}
        self.warnings: list[str] = []

    def _timed(self, key: str, compute):
        if key not in self._cache:
            started = time.perf_counter()
            log.info("cycle %d: computing %s", self.cycle + 1, key)
            self._cache[key] = compute()
            self.seconds[key] = time.perf_counter() - started
            log.info("cycle %d: %s took %.1f s", self.cycle + 1, key, self.seconds[key])
        return self._cache[key]

    def weights(self) -> dict[str, nn.Parameter]:
        return self.params

    def _operator(self, block=None) -> HessianOperator:
        return HessianOperator(self.model, self.batches, loss_fn=self.loss_fn, params=list(self.params), block=block)

    def hessian(self) -> HessianOperator:
        return self._timed("hessian_operator", self._operator)

    def _split(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        result, offset = {}, 0
        for name, parameter in self.params.items():
            result[name] = flat[offset : offset + parameter.numel()].view_as(parameter)
            offset += parameter.numel()
        return result

    def gradient(self) -> dict[str, torch.Tensor]:
        return self._timed("gradient", lambda: self._split(self.hessian().gradient().detach()))

    def fisher_diagonal(self) -> dict[str, torch.Tensor]:
        return self._timed("fisher", lambda: empirical_fisher_diagonal(self.model, self.batches, self.params, self.loss_fn))

    def hutchinson_diagonal(self) -> dict[str, torch.Tensor]:
        def compute():
            operator = self.hessian()
            estimate = hutchinson_diagonal(operator, num_probes=self.settings["hutchinson_probes"],
                                           seed=self.settings["seed"] + self.cycle)
            self.num_hvps += estimate.num_matvecs
            return self._split(estimate.diagonal)

        return self._timed("hutchinson", compute)

    def eigenpairs(self):
        """Top-|lambda| eigenpairs of the loss Hessian: one result (global) or one per layer."""

        def solve(operator):
            result = top_eigenpairs(operator, k=min(self.settings["top_k"], operator.dim), method=self.settings["eigen_method"],
                                    tol=self.settings["eigen_tol"], max_iter=self.settings["eigen_max_iter"],
                                    seed=self.settings["seed"] + self.cycle)
            self.num_hvps += result.num_matvecs
            if not result.all_converged:
                self.warnings.append(f"cycle {self.cycle + 1}: loss-Hessian eigenpairs did not converge "
                                     f"({result.message or 'max_iter reached'}); scores use the last estimates")
            if not torch.isfinite(result.eigenvalues).all():
                raise NumericalError("loss Hessian eigenvalues are not finite; check the model's weights and data")
            return result

        def compute():
            operator = self.hessian()
            if self.settings["scope"] == "layer":
                return {name: solve(block) for name, block in operator.block_operators().items()}
            return solve(operator)

        return self._timed("eigenpairs", compute)

    def eigenvalue_report(self) -> dict:
        if "eigenpairs" not in self._cache:
            return {}
        result = self._cache["eigenpairs"]
        if isinstance(result, dict):
            return {name: r.eigenvalues.tolist() for name, r in result.items()}
        return {"global": result.eigenvalues.tolist()}

    def _eigenvectors_by_parameter(self):
        result = self.eigenpairs()
        if isinstance(result, dict):
            values = {name: r.eigenvalues for name, r in result.items()}
            vectors = {name: r.eigenvectors.T.reshape(-1, *self.params[name].shape) for name, r in result.items()}
            return values, vectors
        vectors = result.eigenvectors.T  # (k, dim)
        split = {}
        offset = 0
        for name, parameter in self.params.items():
            split[name] = vectors[:, offset : offset + parameter.numel()].reshape(-1, *parameter.shape)
            offset += parameter.numel()
        return {name: result.eigenvalues for name in self.params}, split

    def lowrank_diagonal(self) -> dict[str, torch.Tensor]:
        """``sum_k |lambda_k| u_{k,i}^2``: the loss Hessian's diagonal seen by its top eigenpairs."""

        def compute():
            values, vectors = self._eigenvectors_by_parameter()
            return {name: torch.einsum("k,k...->...", values[name].abs().to(vectors[name]), vectors[name] ** 2)
                    for name in self.params}

        return self._timed("lowrank_diagonal", compute)

    def dominant_hv_product(self) -> dict[str, torch.Tensor]:
        """``H v`` with v the dominant eigenvector, i.e. ``lambda_1 v`` (no extra product needed)."""
        values, vectors = self._eigenvectors_by_parameter()
        return {name: values[name][0].to(vectors[name]) * vectors[name][0] for name in self.params}

    def covariances(self) -> dict[str, torch.Tensor]:
        """``{param name: (groups, fan_in, fan_in)}`` layer input second moments ``G``."""

        def compute():
            layers = {self.layer_names[name]: name for name in self.params}
            found = layer_input_covariances(self.model, self.batches, layers=list(layers))
            return {layers[layer]: covariance.dense() for layer, covariance in found.items()}

        return self._timed("covariances", compute)

    def unit_curvature(self, kind: str):
        def compute():
            if kind == "reconstruction":
                return ReconstructionCurvature(self.covariances(), damping=self.settings["damping"])
            values, vectors = self._eigenvectors_by_parameter()
            residual = self.hutchinson_diagonal() if self.settings.get("lowrank_residual") else None
            return LowRankLossCurvature(values, vectors, residual, damping=self.settings["damping"])

        return self._timed(f"unit_curvature_{kind}", compute)

    def loss_diagonal(self) -> dict[str, torch.Tensor]:
        if self.settings["loss_diagonal"] == "hutchinson":
            return self.hutchinson_diagonal()
        return self.fisher_diagonal()

    def output_curvature(self, name: str, mode: str) -> torch.Tensor:
        """``(out_units,)``: loss curvature of each output unit, A_rr = sum_j diag(H)_rj / tr(G).

        Under the Kronecker-factored reading diag(H)_rj ~ A_rr G_jj, summing over the unit's
        inputs averages out the estimator's noise. ``mode="layer"`` uses the layer mean.
        """
        diagonal = unit_matrix(self.loss_diagonal()[name]).abs()
        covariance = self.covariances()[name]
        out_units = diagonal.shape[0]
        traces = covariance.diagonal(dim1=-2, dim2=-1).sum(-1)  # (groups,)
        groups = torch.arange(out_units, device=diagonal.device) // (out_units // traces.shape[0])
        per_unit = diagonal.sum(1) / traces[groups].clamp_min(torch.finfo(traces.dtype).tiny).to(diagonal)
        if mode == "layer":
            return per_unit.mean().expand(out_units)
        return per_unit.clamp_min(per_unit.mean() * 1e-3)

    def output_scale(self, name: str) -> torch.Tensor:
        """``(out_units,)``: the squared factor by which the BatchNorm reading this layer's output
        scales each unit (ones where no BatchNorm does); see :mod:`camphive.pruning.core.output_scale`."""
        norms = self._timed("batchnorms", lambda: normalizing_batchnorms(
            self.model, self.batches[0][0].to(next(iter(self.params.values())).device), self.layer_names))
        weight = self.params[name]
        if name not in norms:
            return torch.ones(weight.shape[0], device=weight.device)
        return batchnorm_output_scale(norms[name]).to(weight.device)

    def close(self) -> None:
        """Free the cached autograd graphs and matrices (the model is about to change)."""
        operator = self._cache.get("hessian_operator")
        if operator is not None:
            operator.clear_cache()
        self._cache.clear()

    def report(self) -> dict:
        return {"num_hvps": self.num_hvps, "seconds": dict(self.seconds), "eigenvalues": self.eigenvalue_report(),
                "warnings": list(self.warnings)}
