"""Top eigenpairs of a symmetric operator from matrix-vector products only.

The solvers know nothing of models: they take any operator with ``dim``, ``matvec`` (and
``dtype``/``device`` when not float32 on the CPU), e.g. a
:class:`~camphive.curvature.hvp.HessianOperator` or a
:class:`~camphive.curvature.operators.DenseOperator`.

Eigenvalues are ordered by magnitude with their sign kept: a loss Hessian away from a
minimum has negative eigenvalues, and negative curvature is real information, not noise.

* ``"power"``: power iteration ``v <- Hv / ||Hv||`` with the Rayleigh quotient
  ``lambda = v.Hv``; stops when ``|lambda_t - lambda_{t-1}| <= tol |lambda_t|``. Further
  eigenpairs by deflation (the iteration is projected off the eigenvectors already found).
* ``"lanczos"`` (default, fewest products by measurement): the Krylov space grows by one
  product per step, with full reorthogonalization; the Ritz values of the tridiagonal
  matrix are the estimates. Stops when the residual bound ``|beta_m s_{m,i}| <= tol |theta_i|``
  holds for each of the top ``k`` (the residual ``||H y - theta y||`` bounds the eigenvalue
  error), or after ``max_iter`` products.
* ``"eigsh"``: scipy's ARPACK (implicitly restarted Lanczos), for comparison; it reports no
  per-iteration history and ``max_iter`` is its restart limit.

A run that stops before every eigenpair meets ``tol`` says so: ``converged`` holds False for
those and ``message`` explains; nothing is dropped silently. No eigenvalue is ever NaN:

* ``max_iter`` too small to deliver ``k`` pairs at all is refused up front with a
  :class:`ConfigError` (Lanczos builds one Ritz value per product, so it needs
  ``max_iter >= k``, see :func:`min_max_iter`), as scipy's ``eigsh`` refuses ``ncv <= k``:
  ``max_iter`` is a cost limit the caller chose, so it is never raised behind their back;
* when ARPACK stops early, only the pairs it converged are returned and ``missing`` counts
  the others (it gives no estimates for them);
* products that are NaN or inf raise :class:`NumericalError`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from camphive.curvature.flat import seeded_normal
from camphive.curvature.operators import DenseOperator, as_scipy_operator, operator_device, operator_dtype
from camphive.errors import ConfigError, NumericalError

EIGEN_METHODS = ("lanczos", "power", "eigsh")
DEFAULT_EIGEN_METHOD = "lanczos"
WHICH = ("magnitude", "largest", "smallest")


@dataclass
class EigenResult:
    """Eigenpairs and how they were found.

    ``eigenvalues``: ``(k,)``, finite; ``eigenvectors``: ``(dim, k)``, unit columns; ``history[i]``:
    the estimates of eigenvalue ``i`` after each product, and ``history_matvecs[i]`` the
    products used so far at each of those estimates; ``residual_norms[i]``: ``||H u - lambda u||``
    (an estimate for Lanczos, ``nan`` when unknown, ``None`` in :meth:`to_dict`); ``missing``:
    pairs asked for but not found (eigsh stopping early), so ``k`` above is one less for each.
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    history: list[list[float]]
    history_matvecs: list[list[int]]
    num_matvecs: int
    converged: list[bool]
    wall_time_s: float
    method: str
    which: str = "magnitude"
    tol: float = 1e-3
    residual_norms: list[float] = field(default_factory=list)
    message: str = ""
    missing: int = 0

    @property
    def all_converged(self) -> bool:
        return all(self.converged) and not self.missing

    def to_dict(self) -> dict:
        """JSON-ready summary (eigenvectors left out: they are ``dim x k`` numbers; unknown
        residual norms are ``None``, since JSON has no NaN)."""
        return {
            "method": self.method,
            "which": self.which,
            "tol": self.tol,
            "eigenvalues": [float(value) for value in self.eigenvalues],
            "converged": list(self.converged),
            "num_matvecs": self.num_matvecs,
            "wall_time_s": self.wall_time_s,
            "residual_norms": [_finite_or_none(value) for value in self.residual_norms],
            "history": [list(map(float, values)) for values in self.history],
            "history_matvecs": [list(map(int, counts)) for counts in self.history_matvecs],
            "eigenvectors_shape": list(self.eigenvectors.shape),
            "message": self.message,
            "missing": self.missing,
        }


def _finite_or_none(value) -> float | None:
    value = float(value)
    return value if np.isfinite(value) else None


def min_max_iter(method: str, k: int) -> int:
    """The smallest ``max_iter`` with which ``method`` can return ``k`` eigenpairs at all.

    Lanczos gets one Ritz value per product, so ``k``; power iteration (``max_iter`` per pair)
    and eigsh (``max_iter`` restarts) need 1. Converged values need more: for Lanczos a few
    times ``k`` products on a Hessian's spectrum.
    """
    return k if method == "lanczos" else 1


def top_eigenpairs(
    operator,
    k: int = 1,
    method: str = DEFAULT_EIGEN_METHOD,
    tol: float = 1e-3,
    max_iter: int = 100,
    seed: int = 0,
    which: str = "magnitude",
) -> EigenResult:
    """The ``k`` eigenpairs of largest magnitude (sign kept) of a symmetric operator.

    ``which="largest"``/``"smallest"`` select algebraically instead (Lanczos and eigsh).
    ``max_iter``: products per eigenpair for power iteration, products in all for Lanczos
    (which must then be at least ``k``: a :class:`ConfigError` says so otherwise, see
    :func:`min_max_iter`), restarts for eigsh. A ``torch.Tensor`` matrix is accepted and
    wrapped in a ``DenseOperator``. Raises :class:`NumericalError` when the operator's
    products are not finite.
    """
    if torch.is_tensor(operator):
        operator = DenseOperator(operator)
    if method not in EIGEN_METHODS:
        raise ConfigError(f"unknown eigen-solver {method!r}; use one of {', '.join(EIGEN_METHODS)}")
    if which not in WHICH:
        raise ConfigError(f"which={which!r}; use one of {', '.join(WHICH)}")
    if not 1 <= k <= operator.dim:
        raise ConfigError(f"k={k} eigenpairs asked of an operator of dimension {operator.dim}; use 1 <= k <= dim")
    if tol <= 0 or max_iter < 1:
        raise ConfigError(f"tol={tol} and max_iter={max_iter}; both must be positive")
    if max_iter < min_max_iter(method, k):
        raise ConfigError(
            f"Lanczos finds at most one eigenpair per product, and k={k} were asked with max_iter={max_iter}; "
            f"pass max_iter >= {k} (converged values usually take several times k) or a smaller k"
        )
    start = time.perf_counter()
    if method == "power":
        if which != "magnitude":
            raise ConfigError("power iteration finds eigenvalues of largest magnitude; use which='magnitude' or method='lanczos'")
        result = _power(operator, k, tol, max_iter, seed)
    elif method == "lanczos":
        result = _lanczos(operator, k, tol, max_iter, seed, which)
    else:
        result = _eigsh(operator, k, tol, max_iter, seed, which)
    result.wall_time_s = time.perf_counter() - start
    result.tol = tol
    result.which = which
    return result


def _order(values: torch.Tensor | np.ndarray, which: str) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    key = {"magnitude": -np.abs(values), "largest": -values, "smallest": values}[which]
    return np.argsort(key, kind="stable")


def _power(operator, k: int, tol: float, max_iter: int, seed: int) -> EigenResult:
    dtype, device = operator_dtype(operator), operator_device(operator)
    found = torch.zeros(operator.dim, 0, dtype=dtype, device=device)
    values, history, counts, converged, residuals = [], [], [], [], []
    used = 0
    for index in range(k):
        vector = _project_out(seeded_normal(operator.dim, seed + index, dtype, device), found)
        vector = vector / vector.norm()
        estimates, at, previous, done, residual = [], [], None, False, float("nan")
        for _ in range(max_iter):
            product = _project_out(operator.matvec(vector), found)
            used += 1
            value = float(torch.dot(vector, product))
            norm = float(product.norm())
            _require_finite(value, norm, used)
            estimates.append(value)
            at.append(used)
            residual = float((product - value * vector).norm())
            if previous is not None and abs(value - previous) <= tol * abs(value):
                done = True
                break
            if norm == 0.0:  # v lies in the null space (after deflation): eigenvalue 0, exactly
                done = True
                break
            vector = _project_out(product / norm, found)
            vector = vector / vector.norm()
            previous = value
        values.append(estimates[-1])
        found = torch.cat([found, vector.unsqueeze(1)], dim=1)
        history.append(estimates)
        counts.append(at)
        converged.append(done)
        residuals.append(residual)
    order = _order(values, "magnitude")
    result = EigenResult(
        eigenvalues=torch.tensor(values, dtype=torch.float64)[order],
        eigenvectors=found[:, order],
        history=[history[i] for i in order],
        history_matvecs=[counts[i] for i in order],
        num_matvecs=used,
        converged=[converged[i] for i in order],
        wall_time_s=0.0,
        method="power",
        residual_norms=[residuals[i] for i in order],
    )
    if not result.all_converged:
        result.message = (
            f"power iteration did not converge for {k - sum(converged)} of {k} eigenpairs within "
            f"max_iter={max_iter} products each (tol={tol}); raise max_iter or use method='lanczos'"
        )
    return result


def _require_finite(*numbers_and_count) -> None:
    """A NaN/inf product shows in the scalars taken from it (its dot and norm): no extra sync."""
    *numbers, count = numbers_and_count
    if not all(np.isfinite(number) for number in numbers):
        raise NumericalError(
            f"matrix-vector product {count} of the eigen-solver is NaN or inf; for a loss Hessian, check the "
            "model's weights, the data and the loss for NaN/inf"
        )


def _project_out(vector: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    if basis.shape[1] == 0:
        return vector
    return vector - basis @ (basis.T @ vector)


def _lanczos(operator, k: int, tol: float, max_iter: int, seed: int, which: str) -> EigenResult:
    from scipy.linalg import eigh_tridiagonal

    dtype, device = operator_dtype(operator), operator_device(operator)
    steps = min(max_iter, operator.dim)
    basis = torch.zeros(operator.dim, steps, dtype=dtype, device=device)
    vector = seeded_normal(operator.dim, seed, dtype, device)
    vector = vector / vector.norm()
    alphas: list[float] = []
    betas: list[float] = []  # betas[j] couples basis vectors j and j+1 (0 after a restart)
    history: list[list[float]] = [[] for _ in range(k)]
    counts: list[list[int]] = [[] for _ in range(k)]
    for step in range(steps):
        basis[:, step] = vector
        product = operator.matvec(vector)
        alpha = float(torch.dot(vector, product))
        product = product - alpha * vector
        if step > 0:
            product = product - betas[-1] * basis[:, step - 1]
        for _ in range(2):  # full reorthogonalization, twice: keeps the basis orthogonal in float32
            product = product - basis[:, : step + 1] @ (basis[:, : step + 1].T @ product)
        beta = float(product.norm())
        _require_finite(alpha, beta, step + 1)
        alphas.append(alpha)
        ritz_values, ritz_vectors = eigh_tridiagonal(np.array(alphas), np.array(betas))
        top = _order(ritz_values, which)[:k]
        residuals = np.abs(beta * ritz_vectors[-1, top])
        for rank, index in enumerate(top):
            history[rank].append(float(ritz_values[index]))
            counts[rank].append(step + 1)
        scale = max(float(np.max(np.abs(ritz_values))), np.finfo(np.float64).tiny)
        # relative to |theta|, with a floor so that exact zero eigenvalues can converge too
        met = residuals <= tol * np.maximum(np.abs(ritz_values[top]), 1e-12 * scale)
        if len(top) == k and np.all(met):
            break
        if step + 1 == steps:
            break
        if beta <= 1e-10 * scale:
            # The Krylov space is invariant: its Ritz pairs are exact. Go on from a fresh direction
            # orthogonal to it, so eigenvalues the start vector missed can still be found.
            betas.append(0.0)
            fresh = seeded_normal(operator.dim, seed + step + 1, dtype, device)
            for _ in range(2):
                fresh = fresh - basis[:, : step + 1] @ (basis[:, : step + 1].T @ fresh)
            vector = fresh / fresh.norm()
        else:
            betas.append(beta)
            vector = product / beta
    used = len(alphas)
    # top_eigenpairs asks for max_iter >= k (and k <= dim), so the space holds k Ritz pairs.
    assert len(top) == k, (len(top), k)
    vectors = basis[:, :used] @ torch.as_tensor(ritz_vectors[:, top], dtype=dtype, device=device)
    values = ritz_values[top].tolist()
    converged = [bool(flag) for flag in met]
    result = EigenResult(
        eigenvalues=torch.tensor(values, dtype=torch.float64),
        eigenvectors=vectors,
        history=history,
        history_matvecs=counts,
        num_matvecs=used,
        converged=converged,
        wall_time_s=0.0,
        method="lanczos",
        residual_norms=[float(value) for value in residuals],
    )
    if not result.all_converged:
        result.message = (
            f"Lanczos stopped after max_iter={max_iter} products with {k - sum(converged)} of {k} eigenpairs "
            f"not converged (Ritz residual above tol={tol} x |eigenvalue|); raise max_iter or tol"
        )
    return result


def _eigsh(operator, k: int, tol: float, max_iter: int, seed: int, which: str) -> EigenResult:
    from scipy.sparse.linalg import ArpackNoConvergence, eigsh

    if k >= operator.dim:
        raise ConfigError(f"eigsh needs k < dim, got k={k} for dim={operator.dim}; use method='lanczos'")
    dtype, device = operator_dtype(operator), operator_device(operator)
    counted = _Counting(operator)
    linear = as_scipy_operator(counted)
    start = seeded_normal(operator.dim, seed, torch.float64, torch.device("cpu")).numpy()
    arpack_which = {"magnitude": "LM", "largest": "LA", "smallest": "SA"}[which]
    message = ""
    try:
        values, vectors = eigsh(linear, k=k, which=arpack_which, tol=tol, maxiter=max_iter, v0=start)
    except ArpackNoConvergence as error:
        # ARPACK gives the converged pairs only, no estimates for the rest: return those, count the rest.
        values, vectors = error.eigenvalues, error.eigenvectors
        message = (
            f"eigsh did not converge within maxiter={max_iter} restarts: {len(values)} of {k} eigenpairs found "
            "(only those are returned); raise max_iter or use method='lanczos'"
        )
    found = len(values)
    order = _order(values, which)
    return EigenResult(
        eigenvalues=torch.tensor(values[order], dtype=torch.float64),
        eigenvectors=torch.as_tensor(vectors[:, order], dtype=dtype, device=device),
        history=[[] for _ in range(found)],
        history_matvecs=[[] for _ in range(found)],
        num_matvecs=counted.num_matvecs,
        converged=[True] * found,
        wall_time_s=0.0,
        method="eigsh",
        residual_norms=[float("nan")] * found,
        message=message,
        missing=k - found,
    )


class _Counting:
    """Counts the products ARPACK asks for (it calls one vector at a time)."""

    def __init__(self, operator) -> None:
        self.operator = operator
        self.dim = operator.dim
        self.dtype = operator_dtype(operator)
        self.device = operator_device(operator)
        self.num_matvecs = 0

    def matvec(self, vector: torch.Tensor) -> torch.Tensor:
        self.num_matvecs += 1
        product = self.operator.matvec(vector)
        _require_finite(float(product.norm()), self.num_matvecs)  # ARPACK would fail on it obscurely
        return product
