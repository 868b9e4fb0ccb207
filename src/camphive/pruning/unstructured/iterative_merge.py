"""The least-squares merge of wide units, solved by conjugate gradients instead of one factorisation per unit.

The merge of a unit solves ``Hhat_SS dW_S = Hhat_SP w_P`` (S: the weights it keeps, P: those pruned now). A
direct solve factorises the ``|S| x |S|`` system of every unit apart, about ``|S|^3 / 3`` each (or the same on
the pruned side): at ImageNet scale (fan-in 4,608, a unit keeping 40 % of it) that is most of a prune. Conjugate
gradients need only products ``Hhat v``, and since the units of a layer share ``Hhat`` (the reconstruction view)
one matrix product serves every unit of a batch per iteration: ``2 fan_in^2`` per unit and iteration.

Each unit runs preconditioned conjugate gradients on its kept set, from ``dW_S = 0`` (plain pruning), until its
residual, in the preconditioned norm, is below ``tolerance`` times where it started (or ``max_iterations``);
each iteration multiplies only the units still running (iteration counts differ by 2-4x across a layer).
Preconditioners: ``"jacobi"`` (``diag(Hhat)^-1``), or ``"inverse"``: ``(Hhat^-1)_SS``, one more product per
iteration with the layer's shared inverse, for units that keep most of their weights. ``Hhat_SS^-1`` differs
from it by a term of rank ``|not S|`` (the Schur complement identity), so the preconditioned system has at most
that many eigenvalues away from 1: on a 512 x 4,608 layer keeping 70 %, 36 iterations instead of 196.

Every iteration lowers the unit's quadratic model, so the result is never worse than plain pruning and
approaches the direct solution; a unit stops on its own once converged (its step is then 0). Work is in
float32, enough for a tolerance of ``1e-3``; the direct solver stays float64.
"""
from __future__ import annotations

import torch

TOLERANCE = 1e-3  # residual reduction (preconditioned norm) at which a unit's merge counts as solved
MAX_ITERATIONS = 200
DTYPE = torch.float32
PRECONDITIONERS = ("jacobi", "inverse")


@torch.no_grad()
def conjugate_gradient_merge(matrix: torch.Tensor, curvature, name: str, rows: torch.Tensor, pruned_now: torch.Tensor,
                             kept: torch.Tensor, tolerance: float = TOLERANCE, max_iterations: int = MAX_ITERATIONS,
                             preconditioner: str = "jacobi", correction: torch.Tensor | None = None) -> torch.Tensor:
    """Add ``dW_S`` to ``matrix[rows]`` (kept entries only), in place; returns the iterations each unit took.

    ``matrix``: the layer ``(out_units, fan_in)``; ``pruned_now``, ``kept``: bool ``(len(rows), fan_in)``.
    Entries neither kept nor pruned now are never changed; the pruned ones are not zeroed here.
    ``preconditioner="inverse"`` needs a view with a shared inverse (``curvature.inverse_times``).
    ``correction`` (``(len(rows), fan_in)``): the linear term ``e`` of ``least_squares_merge``, added to the
    right-hand side (``Hhat_SS dW_S = Hhat_SP w_P + e_S``).
    """
    if preconditioner not in PRECONDITIONERS:
        raise ValueError(f"preconditioner must be one of {PRECONDITIONERS}, got {preconditioner!r}")
    out_units = matrix.shape[0]
    keep = kept.to(DTYPE)
    pruned_weights = matrix[rows].to(DTYPE) * pruned_now
    residual = curvature.times(name, out_units, rows, pruned_weights, dtype=DTYPE)  # Hhat_SP w_P (+ e)
    residual = (residual if correction is None else residual + correction.to(DTYPE)) * keep
    if preconditioner == "inverse":
        def precondition(vectors: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
            return curvature.inverse_times(name, out_units, rows[units], vectors, dtype=DTYPE) * keep[units]
    else:
        diagonal = keep / curvature.diagonal(name, out_units)[rows].to(DTYPE)

        def precondition(vectors: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
            return vectors * diagonal[units]

    every = torch.arange(rows.numel(), device=matrix.device)
    update = torch.zeros_like(residual)
    preconditioned = precondition(residual, every)
    direction = preconditioned.clone()
    product = (residual * preconditioned).sum(1)
    stop = tolerance**2 * product
    iterations = torch.zeros(rows.numel(), dtype=torch.long, device=matrix.device)
    for _ in range(max_iterations):
        units = (product > stop).nonzero().squeeze(1)  # the unconverged units: only they cost a product
        if units.numel() == 0:
            break
        iterations[units] += 1
        unit_direction = direction[units]
        along = curvature.times(name, out_units, rows[units], unit_direction, dtype=DTYPE) * keep[units]
        curvature_along = (unit_direction * along).sum(1)
        old_product = product[units]
        step = torch.where(curvature_along > 0, old_product / curvature_along.clamp_min(torch.finfo(DTYPE).tiny),
                           0.0)[:, None]
        update[units] += step * unit_direction
        unit_residual = residual[units] - step * along
        residual[units] = unit_residual
        unit_preconditioned = precondition(unit_residual, units)
        new_product = (unit_residual * unit_preconditioned).sum(1)
        ratio = new_product / old_product.clamp_min(torch.finfo(DTYPE).tiny)
        direction[units] = unit_preconditioned + ratio[:, None] * unit_direction
        product[units] = new_product
    matrix[rows] += update.to(matrix.dtype)
    return iterations
