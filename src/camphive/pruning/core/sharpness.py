"""The sharpness report: the top loss-Hessian eigenvalues of the prunable weights."""
from __future__ import annotations

import time
import warnings

import torch

from camphive.errors import NumericalError


def top_loss_eigenvalues(model, batches, params, loss_fn, k: int, seed: int) -> tuple[list[float], int, float]:
    """Top-``k`` loss-Hessian eigenvalues (by magnitude) of the prunable weights: (values, HVPs, seconds)."""
    from camphive.curvature import HessianOperator, top_eigenpairs

    started = time.perf_counter()
    with HessianOperator(model, batches, loss_fn=loss_fn, params=list(params)) as operator:
        # One extra pair: Lanczos converges both ends of the spectrum, so the largest
        # magnitude is not missed when a negative and a positive eigenvalue nearly tie.
        result = top_eigenpairs(operator, k=min(k + 1, operator.dim), method="lanczos", tol=1e-3, seed=seed)
    if not result.all_converged:
        warnings.warn(f"top loss-Hessian eigenvalues did not converge ({result.message}); the report shows estimates",
                      stacklevel=3)
    if not torch.isfinite(result.eigenvalues).all():
        raise NumericalError("loss Hessian eigenvalues are not finite; check the model's weights and data for NaN/inf")
    return result.eigenvalues[:k].tolist(), result.num_matvecs, time.perf_counter() - started
