"""Fold pruned weights into kept ones, inside one output unit.

With Hhat the unit's curvature, removing weight p (delta_p = -w_p) and letting kept weights
move by delta_S changes the second-order loss by 1/2 delta^T Hhat delta. Minimising it:

* over one partner s: delta_s = (Hhat_ps / Hhat_ss) w_p  (``merge="curvature"``, clipped).
  When several pruned weights of a unit merge at once, their pair updates interact; an exact
  line search on the unit's quadratic model then scales the unit's merge by alpha in [0, 1],
  so the merge can never do worse than plain pruning under that model (alpha = 1 for a single
  pair, the closed form);
* over every kept weight of the unit at once: delta_S = Hhat_SS^-1 Hhat_SP w_P
  (``merge="least_squares"``: Optimal Brain Surgeon with a fixed mask).

``merge="half"`` adds w_p / 2 to the partner and ``merge="none"`` only zeroes p (plain
pruning, the ablation). Layers are viewed as ``(out_units, fan_in)`` matrices, in place.
"""
from __future__ import annotations

import torch

from camphive.errors import ConfigError

MERGES = ("curvature", "half", "none", "least_squares")


@torch.no_grad()
def merge_into_partner(matrix: torch.Tensor, rows: torch.Tensor, pruned_cols: torch.Tensor,
                       partner_cols: torch.Tensor, coefficients: torch.Tensor | float) -> None:
    """``W[r, s] += c * W[r, p]`` for every pair, then ``W[r, p] = 0``, in place.

    Several pruned weights may share a partner; their contributions add up.
    """
    values = matrix[rows, pruned_cols] * coefficients
    matrix.index_put_((rows, partner_cols), values.to(matrix.dtype), accumulate=True)
    matrix[rows, pruned_cols] = 0


@torch.no_grad()
def curvature_coefficients(curvature, name: str, out_units: int, rows: torch.Tensor, pruned_cols: torch.Tensor,
                           partner_cols: torch.Tensor, clip: float = 2.0, chunk: int = 2**16) -> torch.Tensor:
    """``Hhat_ps / Hhat_ss`` for each pair (damped diagonal), clipped to ``[-clip, clip]``."""
    diagonal = curvature.diagonal(name, out_units)
    coefficients = torch.empty(rows.numel(), dtype=diagonal.dtype, device=diagonal.device)
    for start in range(0, rows.numel(), chunk):
        r, p, s = rows[start : start + chunk], pruned_cols[start : start + chunk], partner_cols[start : start + chunk]
        coupling = curvature.matrix_rows(name, out_units, r, p).gather(1, s[:, None]).squeeze(1)
        coefficients[start : start + chunk] = coupling / diagonal[r, s]
    return coefficients.clamp(-clip, clip)


@torch.no_grad()
def pair_merge(matrix: torch.Tensor, curvature, name: str, pruned_now: torch.Tensor, rows: torch.Tensor,
               pruned_cols: torch.Tensor, partner_cols: torch.Tensor, clip: float = 2.0) -> torch.Tensor:
    """The curvature pair merge of a layer, with the per-unit line search; returns alpha ``(out_units,)``."""
    out_units = matrix.shape[0]
    coefficients = curvature_coefficients(curvature, name, out_units, rows, pruned_cols, partner_cols, clip)
    removal = -(matrix * pruned_now).to(coefficients.dtype)  # delta of plain pruning
    update = torch.zeros_like(removal)
    update.index_put_((rows, partner_cols), coefficients * matrix[rows, pruned_cols].to(coefficients), accumulate=True)
    # f(alpha) = 1/2 (removal + alpha update)^T H (removal + alpha update) is minimised at
    # alpha* = -removal^T H update / update^T H update; clamp to [0, 1].
    curvature_along = curvature.bilinear(name, update, update)
    cross = curvature.bilinear(name, removal, update)
    alpha = torch.where(curvature_along > 0, -cross / curvature_along.clamp_min(torch.finfo(cross.dtype).tiny),
                        torch.zeros_like(cross)).clamp(0.0, 1.0)
    matrix += (alpha[:, None] * update).to(matrix.dtype)
    matrix[pruned_now] = 0
    return alpha


@torch.no_grad()
def least_squares_merge(matrix: torch.Tensor, curvature, name: str, pruned_now: torch.Tensor, kept: torch.Tensor,
                        chunk_elements: int = 2**24) -> None:
    """Fold every weight pruned now into all kept weights of its unit: ``dW_S = Hhat_SS^-1 Hhat_SP w_P``.

    Solved per unit on the kept set only (``|S| x |S|`` systems, padded per chunk), in
    float64, so high sparsity makes it cheap. The pruned entries are zeroed afterwards.
    """
    out_units, fan_in = matrix.shape
    pruned_now, kept = pruned_now.bool(), kept.bool()
    units = (pruned_now.any(1) & kept.any(1)).nonzero(as_tuple=True)[0]
    if units.numel():
        units = units[kept[units].sum(1).argsort()]  # similar sizes share a chunk: less padding
        start = 0
        while start < units.numel():
            # Units are sorted by kept count, so a chunk is sized by its last (widest) unit.
            guess = units[start : start + 64]
            width = max(1, int(kept[guess].sum(1).max()))
            step = max(1, chunk_elements // (width * fan_in))
            chunk = units[start : start + step]
            _solve_chunk(matrix, curvature, name, out_units, chunk, pruned_now[chunk], kept[chunk])
            start += step
    matrix[pruned_now] = 0


def _solve_chunk(matrix, curvature, name, out_units, rows, pruned_now, kept) -> None:
    device = matrix.device
    width = int(kept.sum(1).max())
    # Kept columns of each unit first (in column order); the padding beyond |S| is masked.
    order = torch.sort((~kept).to(torch.int8), dim=1, stable=True).indices[:, :width]
    valid = torch.arange(width, device=device)[None, :] < kept.sum(1, keepdim=True)
    gathered_rows = curvature.unit_rows(name, out_units, rows, order).to(torch.float64)  # (n, width, d)
    system = gathered_rows.gather(2, order[:, None, :].expand(-1, width, -1))  # (n, width, width)
    pruned_weights = matrix[rows].to(torch.float64) * pruned_now  # (n, d)
    right = torch.einsum("nkd,nd->nk", gathered_rows, pruned_weights)
    mask = valid[:, :, None] & valid[:, None, :]
    system = system * mask + torch.diag_embed((~valid).to(torch.float64))
    solution = _solve_positive_definite(system, right * valid) * valid  # (n, width)
    update = torch.zeros(rows.numel(), matrix.shape[1], dtype=torch.float64, device=device)
    update.scatter_add_(1, order, solution)
    matrix[rows] += update.to(matrix.dtype)


def _solve_positive_definite(system: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Batched SPD solve by Cholesky (half the work of LU); least squares where it breaks down."""
    factor, info = torch.linalg.cholesky_ex(system)
    solution = torch.cholesky_solve(right.unsqueeze(-1), factor).squeeze(-1)
    failed = info != 0
    if failed.any():
        solution[failed] = torch.linalg.lstsq(system[failed], right[failed].unsqueeze(-1)).solution.squeeze(-1)
    return solution


def check_merge(merge: str) -> None:
    if merge not in MERGES:
        raise ConfigError(f"unknown merge {merge!r}; use one of {', '.join(MERGES)}")
