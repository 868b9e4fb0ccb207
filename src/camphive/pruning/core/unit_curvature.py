"""Curvature seen by one output unit (a row of a linear layer, a filter of a conv).

Pairing and merging never leave an output unit, so they only need, for each unit r of a
layer, its fan-in x fan-in curvature matrix ``Hhat_r``. Two views provide it:

* :class:`ReconstructionCurvature`: ``Hhat_r = G`` (the layer's input second moment
  ``E[x x^T]``, per group for grouped convs), the exact Hessian of the layer's
  output-reconstruction loss, shared by every unit of a group.
* :class:`LowRankLossCurvature`: the unit's block of the loss Hessian approximated by its
  top eigenpairs, ``sum_k lambda_k u_k u_k^T`` restricted to the unit, plus an optional
  diagonal (e.g. a Hutchinson estimate of what the eigenpairs miss).

Both add damping to the diagonal (a fraction of its mean, per layer) before anything
divides by it. Weights are viewed as matrices ``W.reshape(out_units, fan_in)``.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch


def unit_matrix(weight: torch.Tensor) -> torch.Tensor:
    """View a conv/linear weight as ``(out_units, fan_in)`` (shares storage)."""
    return weight.reshape(weight.shape[0], -1)


class UnitCurvature:
    """What pairing and merging need; subclasses provide ``diagonal`` and ``unit_rows``."""

    def matrix_rows(self, name: str, out_units: int, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """``(n, fan_in)``: row ``cols[i]`` of unit ``rows[i]``'s matrix."""
        return self.unit_rows(name, out_units, rows, cols[:, None])[:, 0]

    def submatrices(self, name: str, out_units: int, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """``(n, m, m)``: unit ``rows[i]``'s matrix restricted to the distinct indices ``cols[i, :]``."""
        gathered = self.unit_rows(name, out_units, rows, cols)
        return gathered.gather(2, cols[:, None, :].expand(-1, cols.shape[1], -1))

    def times(self, name: str, out_units: int, rows: torch.Tensor, vectors: torch.Tensor,
              dtype: torch.dtype | None = None) -> torch.Tensor:
        """``(n, fan_in)``: ``Hhat_r v`` for unit ``rows[i]`` and vector ``vectors[i]``, in ``dtype`` if given."""
        everything = torch.arange(vectors.shape[1], device=vectors.device).expand(rows.numel(), -1)
        gathered = self.unit_rows(name, out_units, rows, everything)
        product = torch.einsum("nij,nj->ni", gathered, vectors.to(gathered.dtype))
        return product if dtype is None else product.to(dtype)

    def has_shared_inverse(self, name: str) -> bool:
        """Whether ``inverse_submatrices``/``inverse_times`` are cheap (one inverse shared by many units)."""
        return False

    def bilinear(self, name: str, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        """``(out_units,)``: ``left_r^T Hhat_r right_r`` for every unit (inputs ``(out_units, fan_in)``)."""
        raise NotImplementedError


class ReconstructionCurvature(UnitCurvature):
    """Per-layer input second moments ``G`` of shape ``(groups, fan_in, fan_in)``."""

    kind = "reconstruction"

    def __init__(self, covariances: Mapping[str, torch.Tensor], damping: float = 0.01):
        self.damping = damping
        self._last: dict[str, tuple] = {}  # per kind: ((layer, dtype), tensor) for the last layer asked
        self._matrices: dict[str, torch.Tensor] = {}
        for name, matrix in covariances.items():
            matrix = matrix if matrix.ndim == 3 else matrix.unsqueeze(0)
            diagonal = matrix.diagonal(dim1=-2, dim2=-1)
            mean = diagonal.mean()
            # A layer whose inputs are all zero (every ReLU before it dead) has G = 0: damp it by 1, not by a
            # relative zero, whose inverse overflows to inf and turns the merge into NaN.
            shift = damping * (mean if mean > torch.finfo(matrix.dtype).eps else torch.ones_like(mean))
            self._matrices[name] = matrix + shift * torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device)

    def names(self) -> list[str]:
        return list(self._matrices)

    def _groups_of(self, name: str, rows: torch.Tensor, out_units: int) -> torch.Tensor:
        groups = self._matrices[name].shape[0]
        return torch.div(rows, out_units // groups, rounding_mode="floor")

    def diagonal(self, name: str, out_units: int) -> torch.Tensor:
        """``(out_units, fan_in)``: ``Hhat_r[j, j]`` for every unit r and input j."""
        matrices = self._matrices[name]
        rows = torch.arange(out_units, device=matrices.device)
        return matrices.diagonal(dim1=-2, dim2=-1)[self._groups_of(name, rows, out_units)]

    def unit_rows(self, name: str, out_units: int, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """``(n, m, fan_in)``: rows ``cols[i, :]`` of unit ``rows[i]``'s matrix."""
        matrices = self._matrices[name]
        if matrices.shape[0] == 1:
            return matrices[0][cols]
        return matrices[self._groups_of(name, rows, out_units)[:, None], cols]

    def submatrices(self, name: str, out_units: int, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        return self._gather(self._matrices[name], self._groups_of(name, rows, out_units), cols)

    @staticmethod
    def _gather(matrices: torch.Tensor, groups: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """``(n, m, m)``: ``matrices[groups[i]]`` at rows and columns ``cols[i, :]``. One shared matrix
        (an ungrouped layer) is indexed without the group index: the same entries, ~1.5x faster."""
        if matrices.shape[0] == 1:
            return matrices[0][cols[:, :, None], cols[:, None, :]]
        return matrices[groups[:, None, None], cols[:, :, None], cols[:, None, :]]

    def times(self, name: str, out_units: int, rows: torch.Tensor, vectors: torch.Tensor,
              dtype: torch.dtype | None = None) -> torch.Tensor:
        """As :meth:`UnitCurvature.times`; ``dtype`` (e.g. float32 for iterative solvers) is also the precision of
        the product, on a copy of the matrices kept for the last layer asked."""
        return self._apply(self._converted("matrices", name, self._matrices[name], dtype),
                           self._groups_of(name, rows, out_units), vectors)

    def _kept_for_last_layer(self, kind: str, name: str, dtype: torch.dtype, make) -> torch.Tensor:
        """``make()``, kept until another layer or dtype is asked for this ``kind`` (layers are solved one at a
        time, so one layer's derived matrices are all that is held)."""
        if self._last.get(kind, (None,))[0] != (name, dtype):
            self._last[kind] = ((name, dtype), make())
        return self._last[kind][1]

    def _converted(self, kind: str, name: str, matrices: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
        if dtype is None or dtype == matrices.dtype:
            return matrices
        return self._kept_for_last_layer(f"{kind} copy", name, dtype, lambda: matrices.to(dtype))

    @staticmethod
    def _apply(matrices: torch.Tensor, groups: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
        vectors = vectors.to(matrices.dtype)
        if matrices.shape[0] == 1:
            return vectors @ matrices[0]  # symmetric
        return torch.einsum("nj,nij->ni", vectors, matrices[groups])

    def has_shared_inverse(self, name: str) -> bool:
        return True

    def _inverse(self, name: str) -> torch.Tensor:
        """``Hhat^-1`` per group in float64, kept for the last layer asked (one layer at a time)."""
        def invert() -> torch.Tensor:
            return torch.cholesky_inverse(torch.linalg.cholesky(self._matrices[name].double()))
        return self._kept_for_last_layer("inverse", name, torch.float64, invert)

    def inverse_submatrices(self, name: str, out_units: int, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """``(n, m, m)``: ``Hhat^-1`` of unit ``rows[i]`` restricted to the distinct indices ``cols[i, :]``."""
        return self._gather(self._inverse(name), self._groups_of(name, rows, out_units), cols)

    def inverse_times(self, name: str, out_units: int, rows: torch.Tensor, vectors: torch.Tensor,
                      dtype: torch.dtype | None = None) -> torch.Tensor:
        """``(n, fan_in)``: ``Hhat_r^-1 v`` for unit ``rows[i]`` and vector ``vectors[i]`` (``dtype`` as in ``times``)."""
        return self._apply(self._converted("inverse", name, self._inverse(name), dtype),
                           self._groups_of(name, rows, out_units), vectors)

    def unit_matrices(self, name: str, out_units: int, rows: torch.Tensor) -> torch.Tensor:
        """``(n, fan_in, fan_in)``: the full matrix of each unit in ``rows`` (an expanded view when shared)."""
        matrices = self._matrices[name]
        if matrices.shape[0] == 1:
            return matrices.expand(len(rows), -1, -1)
        return matrices[self._groups_of(name, rows, out_units)]

    def bilinear(self, name: str, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        matrices = self._matrices[name]
        groups, fan_in = matrices.shape[0], matrices.shape[-1]
        left = left.to(matrices.dtype).reshape(groups, -1, fan_in)
        right = right.to(matrices.dtype).reshape(groups, -1, fan_in)
        return ((left @ matrices) * right).sum(-1).reshape(-1)

    def inverse_diagonal(self, name: str, out_units: int) -> torch.Tensor:
        """``(out_units, fan_in)``: ``[Hhat_r^-1]_jj`` (for OBS saliencies)."""
        inverse = self._inverse(name)
        rows = torch.arange(out_units, device=inverse.device)
        return inverse.diagonal(dim1=-2, dim2=-1)[self._groups_of(name, rows, out_units)].to(self._matrices[name].dtype)


class LowRankLossCurvature(UnitCurvature):
    """Units' blocks of ``sum_k lambda_k u_k u_k^T + diag(d)`` from loss-Hessian eigenpairs.

    ``eigenvectors``: ``{param name: (k, *weight.shape)}``, ``eigenvalues``: ``(k,)`` (or a
    dict of per-layer ``(k,)`` for block-diagonal scope); ``diagonal``: optional
    ``{param name: weight-shaped}`` residual diagonal.
    """

    kind = "loss"

    def __init__(self, eigenvalues, eigenvectors: Mapping[str, torch.Tensor],
                 diagonal: Mapping[str, torch.Tensor] | None = None, damping: float = 0.01):
        self.damping = damping
        # |lambda|: a merge divides by the curvature, which must be positive; negative
        # curvature still counts by its size, as in the spectrum report.
        self._values = {name: (eigenvalues[name] if isinstance(eigenvalues, Mapping) else eigenvalues).abs()
                        for name in eigenvectors}
        self._vectors = {name: vectors.reshape(vectors.shape[0], vectors.shape[1], -1)
                         for name, vectors in eigenvectors.items()}
        self._diagonal = {}
        # What the low-rank part misses on the diagonal (the residual diagonal and the damping),
        # added to every product: (out_units, fan_in).
        self._diagonal_rest = {}
        for name, vectors in self._vectors.items():
            values = self._values[name].to(vectors)
            low_rank_diag = torch.einsum("k,krj->rj", values, vectors**2)
            diag = low_rank_diag
            if diagonal is not None and name in diagonal:
                diag = diag + unit_matrix(diagonal[name]).to(diag).clamp_min(0)
            shift = damping * diag.abs().mean().clamp_min(torch.finfo(diag.dtype).tiny)
            self._diagonal[name] = (diag, shift)
            self._diagonal_rest[name] = diag - low_rank_diag + shift

    def names(self) -> list[str]:
        return list(self._vectors)

    def diagonal(self, name: str, out_units: int) -> torch.Tensor:
        diag, shift = self._diagonal[name]
        return diag + shift

    def bilinear(self, name: str, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        vectors = self._vectors[name]
        values = self._values[name].to(vectors)
        left, right = left.to(vectors), right.to(vectors)
        low_rank = torch.einsum("k,kr,kr->r", values, (vectors * left).sum(-1), (vectors * right).sum(-1))
        return low_rank + (self._diagonal_rest[name] * left * right).sum(-1)

    def unit_rows(self, name: str, out_units: int, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        vectors = self._vectors[name][:, rows, :]  # (k, n, d)
        values = self._values[name].to(vectors)
        picked = vectors.gather(2, cols[None].expand(vectors.shape[0], -1, -1))  # (k, n, m)
        result = torch.einsum("k,knm,knj->nmj", values, picked, vectors)
        diag, shift = self._diagonal[name]
        correction = diag[rows].gather(1, cols) - torch.einsum("k,knm->nm", values, picked**2) + shift
        result.scatter_add_(2, cols[:, :, None], correction[:, :, None])
        return result

    def submatrices(self, name: str, out_units: int, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        vectors = self._vectors[name][:, rows, :]  # (k, n, d)
        values = self._values[name].to(vectors)
        picked = vectors.gather(2, cols[None].expand(vectors.shape[0], -1, -1))  # (k, n, m)
        result = torch.einsum("k,kni,knj->nij", values, picked, picked)
        diag, shift = self._diagonal[name]
        correction = diag[rows].gather(1, cols) - torch.einsum("k,knm->nm", values, picked**2) + shift
        result.diagonal(dim1=-2, dim2=-1).add_(correction)
        return result

    def times(self, name: str, out_units: int, rows: torch.Tensor, vectors: torch.Tensor,
              dtype: torch.dtype | None = None) -> torch.Tensor:
        unit_vectors = self._vectors[name][:, rows, :]  # (k, n, d)
        values = self._values[name].to(unit_vectors)
        vectors = vectors.to(unit_vectors)
        projections = (unit_vectors * vectors).sum(-1)  # (k, n)
        low_rank = torch.einsum("k,kn,knd->nd", values, projections, unit_vectors)
        product = low_rank + self._diagonal_rest[name][rows] * vectors
        return product if dtype is None else product.to(dtype)

    def unit_matrices(self, name: str, out_units: int, rows: torch.Tensor) -> torch.Tensor:
        vectors = self._vectors[name][:, rows, :]  # (k, n, d)
        values = self._values[name].to(vectors)
        matrices = torch.einsum("k,kni,knj->nij", values, vectors, vectors)
        diag, shift = self._diagonal[name]
        low_rank_diag = matrices.diagonal(dim1=-2, dim2=-1).clone()
        matrices.diagonal(dim1=-2, dim2=-1).add_(diag[rows] - low_rank_diag + shift)
        return matrices

    def inverse_diagonal(self, name: str, out_units: int) -> torch.Tensor:
        rows = torch.arange(out_units, device=self._diagonal[name][0].device)
        inverses = []
        for chunk in rows.split(max(1, 2**24 // max(1, self._diagonal[name][0].shape[1] ** 2))):
            inverses.append(torch.linalg.inv(self.unit_matrices(name, out_units, chunk).double()).diagonal(dim1=-2, dim2=-1))
        return torch.cat(inverses).to(self._diagonal[name][0].dtype)
