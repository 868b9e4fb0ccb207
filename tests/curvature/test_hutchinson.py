"""Hutchinson estimators: exact on diagonal matrices, converging on dense ones."""
from __future__ import annotations

import pytest
import torch

from camphive.curvature.hutchinson import hutchinson_diagonal, hutchinson_trace
from camphive.curvature.hvp import HessianOperator
from camphive.curvature.operators import DenseOperator
from camphive.errors import ConfigError

from .cases import dense_hessian, image_batches, make_cnn, weight_names


def random_symmetric(dim: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    matrix = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
    return (matrix + matrix.T) / 2 + 3 * torch.eye(dim, dtype=torch.float64)


def test_diagonal_is_exact_for_a_diagonal_matrix():
    values = torch.tensor([3.0, -1.0, 0.5, 7.0], dtype=torch.float64)
    estimate = hutchinson_diagonal(DenseOperator(torch.diag(values)), num_probes=1, seed=4)
    assert torch.equal(estimate.diagonal, values)
    assert hutchinson_trace(DenseOperator(torch.diag(values)), num_probes=3).samples == pytest.approx([9.5] * 3)


def test_diagonal_error_shrinks_as_probes_grow():
    matrix = random_symmetric(30)
    operator = DenseOperator(matrix)
    errors = [
        float((hutchinson_diagonal(operator, num_probes=probes, seed=0).diagonal - matrix.diagonal()).norm())
        for probes in (4, 64, 1024)
    ]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.1 * errors[0]
    assert operator.num_matvecs == 4 + 64 + 1024


def test_trace_is_unbiased_within_its_standard_error():
    matrix = random_symmetric(30, seed=1)
    estimate = hutchinson_trace(DenseOperator(matrix), num_probes=400, seed=2)
    assert abs(estimate.trace - float(matrix.trace())) < 4 * estimate.standard_error
    assert estimate.standard_error > 0 and len(estimate.samples) == 400
    assert estimate.to_dict()["num_matvecs"] == 400


def test_same_seed_same_estimate_and_block_size_does_not_matter():
    operator = DenseOperator(random_symmetric(12))
    first = hutchinson_diagonal(operator, num_probes=10, seed=7, block_size=3).diagonal
    second = hutchinson_diagonal(operator, num_probes=10, seed=7, block_size=10).diagonal
    assert torch.allclose(first, second, rtol=1e-12, atol=1e-12)


def test_on_a_network_hessian():
    model = make_cnn()
    batches = image_batches()
    hessian = dense_hessian(model, batches, weight_names(model))
    operator = HessianOperator(model, batches)
    estimate = hutchinson_diagonal(operator, num_probes=16, seed=0)
    direct = hutchinson_diagonal(DenseOperator(hessian), num_probes=16, seed=0)
    assert torch.allclose(estimate.diagonal, direct.diagonal, rtol=1e-8, atol=1e-10)
    assert operator.num_matvecs == 16


def test_invalid_probe_counts():
    with pytest.raises(ConfigError):
        hutchinson_trace(DenseOperator(torch.eye(3)), num_probes=0)
