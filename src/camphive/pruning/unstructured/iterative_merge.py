"""The least-squares merge of wide units, solved by conjugate gradients instead of one factorisation per unit.

The merge of a unit solves ``Hhat_SS dW_S = Hhat_SP w_P`` (S: the weights it keeps, P: those pruned now). A
direct solve factorises the ``|S| x |S|`` system of every unit apart, about ``|S|^3 / 3`` each (or the same on
the pruned side): at ImageNet scale (fan-in 4,608, a unit keeping 40 % of it) that is most of a prune. Conjugate
gradients need only products ``Hhat v``, and since the units of a layer share ``Hhat`` (the reconstruction view)
one matrix product serves every unit of a batch per iteration: ``2 fan_in^2`` per unit and iteration.

Each unit runs preconditioned conjugate gradients on its kept set, from ``dW_S = 0`` (plain pruning), until its
residual, in the preconditioned norm, is below ``tolerance`` times where it started (or ``max_iterations``).
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
                             preconditioner: str = "jacobi") -> torch.Tensor:
    """Add ``dW_S`` to ``matrix[rows]`` (kept entries only), in place; returns the iterations each unit took.

    ``matrix``: the layer ``(out_units, fan_in)``; ``pruned_now``, ``kept``: bool ``(len(rows), fan_in)``.
    Entries neither kept nor pruned now are never changed; the pruned ones are not zeroed here.
    ``preconditioner="inverse"`` needs a view with a shared inverse (``curvature.inverse_times``).
    """
    if preconditioner not in PRECONDITIONERS:
        raise ValueError(f"preconditioner must be one of {PRECONDITIONERS}, got {preconditioner!r}")
    out_units = matrix.shape[0]
    keep = kept.to(DTYPE)
    pruned_weights = matrix[rows].to(DTYPE) * pruned_now
    residual = curvature.times(name, out_units, rows, pruned_weights, dtype=DTYPE) * keep  # Hhat_SP w_P
    if preconditioner == "inverse":
        def precondition(vectors: torch.Tensor) -> torch.Tensor:
            return curvature.inverse_times(name, out_units, rows, vectors, dtype=DTYPE) * keep
    else:
        diagonal = keep / curvature.diagonal(name, out_units)[rows].to(DTYPE)

        def precondition(vectors: torch.Tensor) -> torch.Tensor:
            return vectors * diagonal

    update = torch.zeros_like(residual)
    preconditioned = precondition(residual)
    direction = preconditioned.clone()
    product = (residual * preconditioned).sum(1)
    stop = tolerance**2 * product
    iterations = torch.zeros(rows.numel(), dtype=torch.long, device=matrix.device)
    for _ in range(max_iterations):
        active = product > stop
        if not bool(active.any()):
            break
        iterations += active
        along = curvature.times(name, out_units, rows, direction, dtype=DTYPE) * keep
        curvature_along = (direction * along).sum(1)
        step = torch.where(active & (curvature_along > 0),
                           product / curvature_along.clamp_min(torch.finfo(DTYPE).tiny), 0.0)[:, None]
        update += step * direction
        residual -= step * along
        preconditioned = precondition(residual)
        new_product = (residual * preconditioned).sum(1)
        direction = preconditioned + (new_product / product.clamp_min(torch.finfo(DTYPE).tiny))[:, None] * direction
        product = torch.where(active, new_product, product)  # a converged unit keeps its stopping value
    matrix[rows] += update.to(matrix.dtype)
    return iterations
