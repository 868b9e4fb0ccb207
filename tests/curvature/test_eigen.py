"""Eigen-solvers against torch.linalg.eigh on dense matrices and a tiny network's Hessian."""
from __future__ import annotations

import json

import pytest
import torch

from camphive.curvature.eigen import EigenResult, top_eigenpairs
from camphive.curvature.hvp import HessianOperator
from camphive.curvature.operators import DenseOperator
from camphive.errors import ConfigError, NumericalError

from .cases import dense_hessian, image_batches, make_cnn, weight_names


def matrix_with_spectrum(values, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(len(values), len(values), generator=generator, dtype=torch.float64))
    return basis @ torch.diag(torch.tensor(values, dtype=torch.float64)) @ basis.T


def reference(matrix: torch.Tensor, k: int):
    values, vectors = torch.linalg.eigh(matrix)
    order = torch.argsort(values.abs(), descending=True)[:k]
    return values[order], vectors[:, order]


def assert_matches(result: EigenResult, matrix: torch.Tensor, k: int, value_tol: float, vector_tol: float) -> None:
    values, vectors = reference(matrix, k)
    assert torch.allclose(result.eigenvalues, values, rtol=value_tol, atol=0)
    overlaps = (result.eigenvectors.T @ vectors).diagonal().abs()  # eigenvectors are defined up to sign
    assert torch.all(overlaps >= 1 - vector_tol), overlaps


# Negative curvature on purpose: the second eigenvalue by magnitude is negative.
SPECTRUM = [10.0, -7.0, 4.0, 2.0, 1.0, 0.5, -0.3, 0.2, 0.1, 0.05, 0.02, 0.01]


@pytest.mark.parametrize("method", ["lanczos", "power", "eigsh"])
def test_top3_with_negative_curvature_match_eigh(method):
    matrix = matrix_with_spectrum(SPECTRUM)
    result = top_eigenpairs(DenseOperator(matrix), k=3, method=method, tol=1e-12, max_iter=500)
    assert result.all_converged and result.message == ""
    assert result.eigenvalues.tolist() == pytest.approx([10.0, -7.0, 4.0], rel=1e-8)
    assert_matches(result, matrix, 3, value_tol=1e-8, vector_tol=1e-6)
    assert result.num_matvecs > 0 and result.wall_time_s > 0


# Its spectrum starts 1.077, 0.512, -0.4130, 0.4125: power iteration cannot split the +-0.413 pair.
@pytest.mark.parametrize("method,k", [("lanczos", 3), ("power", 2)])
def test_hessian_of_a_network_matches_eigh(method, k):
    model = make_cnn()
    batches = image_batches()
    hessian = dense_hessian(model, batches, weight_names(model))
    operator = HessianOperator(model, batches)
    result = top_eigenpairs(operator, k=k, method=method, tol=1e-10, max_iter=400)
    assert result.all_converged
    assert_matches(result, hessian, k, value_tol=1e-6, vector_tol=1e-4)
    assert result.num_matvecs == operator.num_matvecs


def test_lanczos_needs_few_products_and_records_its_history():
    matrix = matrix_with_spectrum(SPECTRUM + [0.001 * i for i in range(60)], seed=2)
    result = top_eigenpairs(DenseOperator(matrix), k=3, method="lanczos", tol=1e-6, max_iter=72)
    assert result.all_converged and result.num_matvecs < 40
    assert len(result.history[0]) == result.num_matvecs
    assert result.history_matvecs[0] == list(range(1, result.num_matvecs + 1))
    assert result.history[1][-1] == pytest.approx(-7.0, rel=1e-6)
    assert all(res <= 1e-6 * abs(value) for res, value in zip(result.residual_norms, result.eigenvalues.tolist()))


def test_power_history_counts_every_product():
    result = top_eigenpairs(DenseOperator(matrix_with_spectrum(SPECTRUM)), k=2, method="power", tol=1e-6, max_iter=300)
    assert sum(len(values) for values in result.history) == result.num_matvecs
    assert max(max(counts) for counts in result.history_matvecs) == result.num_matvecs


@pytest.mark.parametrize("method", ["lanczos", "power", "eigsh"])
def test_non_convergence_is_reported(method):
    matrix = matrix_with_spectrum(torch.linspace(1.0, 0.9, 300).tolist(), seed=3)  # no gap to speak of
    result = top_eigenpairs(DenseOperator(matrix), k=2, method=method, tol=1e-12, max_iter=2)
    assert not result.all_converged
    assert "max_iter" in result.message or "maxiter" in result.message
    summary = json.loads(json.dumps(result.to_dict(), allow_nan=False))  # strict JSON: no NaN anywhere
    assert summary["converged"].count(False) + summary["missing"] >= 1
    found = len(result.eigenvalues)
    assert found + result.missing == 2 and result.eigenvectors.shape == (300, found)
    assert torch.isfinite(result.eigenvalues).all()
    if method != "eigsh":  # Lanczos and power iteration keep their estimates; ARPACK gives none
        assert found == 2


def test_lanczos_refuses_fewer_products_than_eigenpairs():
    matrix = matrix_with_spectrum(SPECTRUM)
    with pytest.raises(ConfigError, match=r"k=3 were asked with max_iter=2; pass max_iter >= 3") as error:
        top_eigenpairs(matrix, k=3, method="lanczos", max_iter=2)
    assert "\n" not in str(error.value)
    # Exactly k products: k finite estimates, flagged when not converged, never NaN.
    result = top_eigenpairs(matrix, k=3, method="lanczos", max_iter=3, tol=1e-12)
    assert len(result.eigenvalues) == 3 and torch.isfinite(result.eigenvalues).all()
    assert not result.all_converged and "max_iter=3" in result.message
    # Power iteration spends max_iter per eigenpair: one product each still gives k estimates.
    power = top_eigenpairs(matrix, k=3, method="power", max_iter=1)
    assert len(power.eigenvalues) == 3 and torch.isfinite(power.eigenvalues).all()


@pytest.mark.parametrize("method", ["lanczos", "power", "eigsh"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_products_that_are_not_finite_raise_a_numerical_error(method, bad):
    matrix = matrix_with_spectrum(SPECTRUM)
    matrix[3, 4] = matrix[4, 3] = bad
    with pytest.raises(NumericalError, match="product 1 of the eigen-solver is NaN or inf"):
        top_eigenpairs(matrix, k=2, method=method)


def test_unknown_residuals_are_null_in_json():
    summary = top_eigenpairs(matrix_with_spectrum(SPECTRUM), k=2, method="eigsh", tol=1e-10).to_dict()
    assert summary["residual_norms"] == [None, None] and summary["missing"] == 0
    assert json.loads(json.dumps(summary, allow_nan=False))["eigenvalues"] == pytest.approx([10.0, -7.0], rel=1e-8)


def test_which_largest_and_smallest():
    matrix = matrix_with_spectrum(SPECTRUM)
    largest = top_eigenpairs(matrix, k=2, which="largest", tol=1e-12, max_iter=12)
    smallest = top_eigenpairs(matrix, k=2, which="smallest", tol=1e-12, max_iter=12)
    assert largest.eigenvalues.tolist() == pytest.approx([10.0, 4.0], rel=1e-10)
    assert smallest.eigenvalues.tolist() == pytest.approx([-7.0, -0.3], rel=1e-10)


def test_lanczos_restarts_when_the_krylov_space_is_exhausted():
    matrix = torch.diag(torch.tensor([2.0, 1.0, 1.0, 1.0, 0.0], dtype=torch.float64))
    result = top_eigenpairs(matrix, k=3, method="lanczos", tol=1e-10)
    assert result.all_converged
    assert result.eigenvalues.tolist() == pytest.approx([2.0, 1.0, 1.0], abs=1e-12)
    gram = result.eigenvectors.T @ result.eigenvectors
    assert torch.allclose(gram, torch.eye(3, dtype=torch.float64), atol=1e-10)


def test_zero_operator_and_float32():
    assert top_eigenpairs(torch.zeros(4, 4), k=1, method="power").eigenvalues.tolist() == [0.0]
    assert top_eigenpairs(torch.zeros(4, 4), k=1, method="lanczos").all_converged
    matrix = matrix_with_spectrum(SPECTRUM).float()
    result = top_eigenpairs(matrix, k=2, tol=1e-5)
    assert result.eigenvectors.dtype == torch.float32
    assert result.eigenvalues.tolist() == pytest.approx([10.0, -7.0], rel=1e-5)


def test_to_dict_and_invalid_arguments():
    matrix = matrix_with_spectrum(SPECTRUM)
    summary = top_eigenpairs(matrix, k=2).to_dict()
    assert summary["eigenvalues"] == pytest.approx([10.0, -7.0], rel=1e-3)
    assert summary["eigenvectors_shape"] == [12, 2] and summary["method"] == "lanczos"
    with pytest.raises(ConfigError):
        top_eigenpairs(matrix, k=13)
    with pytest.raises(ConfigError):
        top_eigenpairs(matrix, method="arnoldi")
    with pytest.raises(ConfigError):
        top_eigenpairs(matrix, method="power", which="largest")
