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

from camphive.pruning.core.settings import check_choice
from camphive.pruning.unstructured.iterative_merge import conjugate_gradient_merge

MERGES = ("curvature", "half", "none", "least_squares")
MERGE_SOLVERS = ("auto", "direct", "cg")
# Widest system ("auto") still solved directly: above it conjugate gradients cost less. Measured on this
# library's benchmarks: docs/method.md, section 7.
DIRECT_WIDTH = 128


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
                        chunk_elements: int = 2**22, solver: str = "auto", correction: torch.Tensor | None = None) -> None:
    """Fold every weight pruned now into all kept weights of its unit: ``dW_S = Hhat_SS^-1 Hhat_SP w_P``.

    ``correction`` (``(out_units, fan_in)``, optional) adds a linear term to each unit's quadratic model:
    ``dW_S = Hhat_SS^-1 (Hhat_SP w_P + e_S)``. With ``Hhat = E[x x^T]`` and ``e = E[x (y - x^T w)]`` the
    merge fits the kept weights to a target output ``y`` (e.g. the unpruned model's) instead of the unit's
    current output; units with nothing pruned now are then refitted too
    (:mod:`~camphive.pruning.unstructured.refit`).

    ``solver="direct"`` solves per unit in float64 on whichever side is smaller: the kept set S
    (``|S| x |S|`` systems), or, when the view shares an inverse across units (the reconstruction
    view), its complement Q = not S, by the same minimiser written with ``Hinv = Hhat^-1``:
    ``dW = -Hinv_{:,Q} (Hinv_QQ)^-1 t_Q`` with ``t = w`` on the weights pruned now and 0 on
    those already zero. Units are chunked by width (padding masked). ``solver="cg"``: conjugate
    gradients for every unit (:mod:`~camphive.pruning.unstructured.iterative_merge`, to a relative
    residual of 1e-3; preconditioned by ``(Hinv)_SS`` where the complement is the smaller side, by the
    diagonal elsewhere); ``"auto"``: direct where that side is at most ``DIRECT_WIDTH`` wide, conjugate
    gradients for wider units (the factorisations would cost more). Pruned entries are zeroed
    afterwards; weights neither kept nor pruned now are never changed.
    """
    check_choice("solver", solver, MERGE_SOLVERS)
    out_units, fan_in = matrix.shape
    pruned_now, kept = pruned_now.bool(), kept.bool()
    moved = pruned_now.any(1) if correction is None else pruned_now.any(1) | (correction != 0).any(1)
    units = (moved & kept.any(1)).nonzero(as_tuple=True)[0]
    kept_counts = kept[units].sum(1)
    if curvature.has_shared_inverse(name):
        dual = fan_in - kept_counts < kept_counts
    else:
        dual = torch.zeros_like(kept_counts, dtype=torch.bool)
    widths = torch.where(dual, fan_in - kept_counts, kept_counts)
    iterative = torch.full_like(dual, solver == "cg") if solver != "auto" else widths > DIRECT_WIDTH
    step = max(1, chunk_elements // fan_in)
    for use_dual in (False, True):
        # Conjugate gradients: units keeping most of their weights (dual) preconditioned by the shared inverse.
        chosen = units[iterative & (dual == use_dual)]
        for start in range(0, chosen.numel(), step):
            rows = chosen[start : start + step]
            conjugate_gradient_merge(matrix, curvature, name, rows, pruned_now[rows], kept[rows],
                                     preconditioner="inverse" if use_dual else "jacobi",
                                     correction=None if correction is None else correction[rows])
        direct = ~iterative & (dual == use_dual)
        _solve_directly(matrix, curvature, name, units[direct], widths[direct], pruned_now, kept, use_dual,
                        chunk_elements, correction)
    matrix[pruned_now] = 0


def _solve_directly(matrix, curvature, name, units, widths, pruned_now, kept, use_dual, chunk_elements,
                    correction=None) -> None:
    """The direct solves of ``units`` (their systems ``widths`` wide), in chunks of similar widths."""
    out_units, fan_in = matrix.shape
    widths, order = widths.sort()  # similar widths share a chunk: less padding
    units, widths = units[order], widths.tolist()
    solve = _solve_on_complement if use_dual else _solve_on_kept
    start = 0
    while start < len(widths):
        # Sorted by width, a chunk's memory is set by its last (widest) unit.
        step = _chunk_size(widths[min(start + 63, len(widths) - 1)], fan_in, chunk_elements)
        step = min(step, _chunk_size(widths[min(start + step, len(widths)) - 1], fan_in, chunk_elements))
        chunk = units[start : start + step]
        solve(matrix, curvature, name, out_units, chunk, pruned_now[chunk], kept[chunk],
              None if correction is None else correction[chunk].to(torch.float64))
        start += step


def _chunk_size(width: int, fan_in: int, chunk_elements: int) -> int:
    return max(1, chunk_elements // (width * width + fan_in))


def leading_columns(members: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Column indices with each row's members first (in column order), and which are real (not padding)."""
    width = int(members.sum(1).max())
    order = torch.sort((~members).to(torch.int8), dim=1, stable=True).indices[:, :width]
    valid = torch.arange(width, device=members.device)[None, :] < members.sum(1, keepdim=True)
    return order, valid


def _padded_solve(system: torch.Tensor, right: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    mask = valid[:, :, None] & valid[:, None, :]
    system = system.to(torch.float64) * mask + torch.diag_embed((~valid).to(torch.float64))
    return _solve_positive_definite(system, right * valid) * valid


def _solve_on_kept(matrix, curvature, name, out_units, rows, pruned_now, kept, correction=None) -> None:
    order, valid = leading_columns(kept)
    pruned_weights = matrix[rows].to(torch.float64) * pruned_now  # (n, d)
    right = curvature.times(name, out_units, rows, pruned_weights).to(torch.float64)  # Hhat_SP w_P (+ e)
    right = (right if correction is None else right + correction).gather(1, order)
    solution = _padded_solve(curvature.submatrices(name, out_units, rows, order), right, valid)
    update = torch.zeros(rows.numel(), matrix.shape[1], dtype=torch.float64, device=matrix.device)
    update.scatter_add_(1, order, solution)
    matrix[rows] += update.to(matrix.dtype)


def _solve_on_complement(matrix, curvature, name, out_units, rows, pruned_now, kept, correction=None) -> None:
    # min 1/2 d^T H d - e^T d with d_Q = -t_Q: d = u - Hinv_{:,Q} (Hinv_QQ)^-1 (t_Q + u_Q), u = Hinv e (0 without e)
    order, valid = leading_columns(~kept)
    targets = matrix[rows].to(torch.float64) * pruned_now  # t
    free = None if correction is None else curvature.inverse_times(name, out_units, rows, correction).to(torch.float64)
    targets = (targets if free is None else targets + free).gather(1, order)  # t_Q (+ u_Q)
    system = curvature.inverse_submatrices(name, out_units, rows, order)
    multipliers = torch.zeros(rows.numel(), matrix.shape[1], dtype=torch.float64, device=matrix.device)
    multipliers.scatter_add_(1, order, _padded_solve(system, targets, valid))
    update = -curvature.inverse_times(name, out_units, rows, multipliers).to(torch.float64)
    update = update if free is None else update + free
    matrix[rows] += (update * kept).to(matrix.dtype)


def _solve_positive_definite(system: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Batched SPD solve by Cholesky (half the work of LU); least squares where it breaks down."""
    factor, info = torch.linalg.cholesky_ex(system)
    solution = torch.cholesky_solve(right.unsqueeze(-1), factor).squeeze(-1)
    failed = info != 0
    if failed.any():
        solution[failed] = torch.linalg.lstsq(system[failed], right[failed].unsqueeze(-1)).solution.squeeze(-1)
    return solution
