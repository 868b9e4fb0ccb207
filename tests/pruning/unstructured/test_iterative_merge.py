import pytest
import torch

from camphive.errors import ConfigError
from camphive.pruning.core.unit_curvature import LowRankLossCurvature, ReconstructionCurvature
from camphive.pruning.unstructured.iterative_merge import conjugate_gradient_merge
from camphive.pruning.unstructured.merging import DIRECT_WIDTH, least_squares_merge
from camphive.pruning.unstructured.settings import UnstructuredSettings
from tests.pruning.cases import explicit_least_squares


def _correlated_covariance(fan_in: int, seed: int) -> torch.Tensor:
    """A conv-like Gram: groups of 9 nearly equal inputs, ReLU'd: ill-conditioned, as the merge meets it."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(4 * fan_in, -(-fan_in // 9), generator=generator, dtype=torch.float64)
    inputs = base.repeat_interleave(9, 1)[:, :fan_in] + 0.1 * torch.randn(4 * fan_in, fan_in, generator=generator,
                                                                          dtype=torch.float64)
    inputs = inputs.relu()
    return inputs.T @ inputs / inputs.shape[0]


def _masks(out_units, fan_in, kept_fraction, seed):
    draw = torch.rand(out_units, fan_in, generator=torch.Generator().manual_seed(seed))
    earlier = draw > 0.9  # pruned in an earlier cycle: zero, never changed
    kept = draw < kept_fraction
    return ~kept & ~earlier, kept, earlier


def _error(merged, weights, matrices):
    change = merged - weights
    return torch.einsum("ri,rij,rj->r", change, matrices, change)


@pytest.mark.parametrize("kept_fraction", [0.2, 0.6])
def test_conjugate_gradients_reach_the_explicit_solution_of_every_view(kept_fraction):
    generator = torch.Generator().manual_seed(0)
    fan_in = 40
    weights = torch.randn(6, fan_in, generator=generator, dtype=torch.float64)
    weights[:, -4:] = 0.0
    pruned, kept, earlier = _masks(6, fan_in, kept_fraction, seed=1)
    earlier[:, -4:] = True  # zero weights pruned before
    pruned &= ~earlier
    kept &= ~earlier
    grouped = torch.stack([_correlated_covariance(fan_in, 2), _correlated_covariance(fan_in, 3)])
    vectors = torch.randn(2, 6, fan_in, generator=generator, dtype=torch.float64)
    for view in (ReconstructionCurvature({"w": grouped}, damping=0.01),
                 ReconstructionCurvature({"w": grouped[0]}, damping=0.01),
                 LowRankLossCurvature(torch.tensor([3.0, 1.0], dtype=torch.float64), {"w": vectors},
                                      {"w": torch.rand(6, fan_in, generator=generator, dtype=torch.float64) + 0.1},
                                      damping=0.01)):
        matrices = view.unit_matrices("w", 6, torch.arange(6))
        expected = explicit_least_squares(weights, matrices, pruned, kept)
        for preconditioner in ("jacobi", "inverse") if view.has_shared_inverse("w") else ("jacobi",):
            merged = weights.clone()
            iterations = conjugate_gradient_merge(merged, view, "w", torch.arange(6), pruned, kept, tolerance=1e-4,
                                                  preconditioner=preconditioner)
            merged[pruned] = 0
            assert torch.equal(merged[earlier], weights[earlier])
            assert 0 < int(iterations.max()) < 200, iterations  # converged, not stopped by max_iterations
            plain = weights * ~pruned
            # float32 work: the merge's error within 1e-4 of the optimum's, relative to plain pruning's
            gap = _error(merged, weights, matrices) - _error(expected, weights, matrices)
            assert (gap.abs() <= 1e-4 * _error(plain, weights, matrices)).all(), (type(view).__name__, preconditioner)


def test_the_inverse_preconditioner_needs_at_most_one_iteration_per_weight_pruned_plus_one():
    fan_in = 60
    view = ReconstructionCurvature({"w": _correlated_covariance(fan_in, 9)}, damping=0.01)
    weights = torch.randn(3, fan_in, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    kept = torch.ones(3, fan_in, dtype=torch.bool)
    kept[0, :2] = kept[1, 10:13] = kept[2, 5:9] = False  # 2, 3 and 4 pruned: (Hinv)_SS is off by rank 2, 3, 4
    iterations = conjugate_gradient_merge(weights.clone(), view, "w", torch.arange(3), ~kept, kept, tolerance=1e-3,
                                          preconditioner="inverse")
    jacobi = conjugate_gradient_merge(weights.clone(), view, "w", torch.arange(3), ~kept, kept, tolerance=1e-3)
    assert (iterations <= torch.tensor([3, 4, 5])).all(), iterations
    assert (jacobi > iterations).all(), jacobi


def test_every_iteration_lowers_the_quadratic_model_starting_below_plain_pruning():
    fan_in = 90
    matrix = _correlated_covariance(fan_in, 4)
    view = ReconstructionCurvature({"w": matrix}, damping=0.01)
    matrices = view.unit_matrices("w", 5, torch.arange(5))
    weights = torch.randn(5, fan_in, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    pruned, kept, _ = _masks(5, fan_in, 0.5, seed=6)
    errors = []
    for iterations in (0, 1, 2, 4, 8, 16):
        merged = weights.clone()
        conjugate_gradient_merge(merged, view, "w", torch.arange(5), pruned, kept, max_iterations=iterations)
        merged[pruned] = 0
        errors.append(_error(merged, weights, matrices))
    assert torch.equal(errors[0], _error(weights * ~pruned, weights, matrices))  # 0 iterations: plain pruning
    for before, after in zip(errors, errors[1:]):
        assert (after <= before * (1 + 1e-6)).all()
    assert (errors[-1] < 0.9 * errors[0]).all()


def test_auto_solves_narrow_units_directly_and_wide_ones_by_conjugate_gradients():
    fan_in = 2 * DIRECT_WIDTH + 60
    view = ReconstructionCurvature({"w": _correlated_covariance(fan_in, 7)}, damping=0.01)
    weights = torch.randn(4, fan_in, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    kept = torch.zeros(4, fan_in, dtype=torch.bool)
    kept[0, :DIRECT_WIDTH] = True  # narrow on the kept side
    kept[1, : fan_in - DIRECT_WIDTH] = True  # narrow on the pruned side (the complement)
    kept[2:, : fan_in // 2] = True  # wide on both sides
    pruned = ~kept
    direct, auto = weights.clone(), weights.clone()
    least_squares_merge(direct, view, "w", pruned, kept, solver="direct")
    least_squares_merge(auto, view, "w", pruned, kept, solver="auto")
    assert torch.allclose(auto[:2], direct[:2], rtol=0, atol=1e-12)  # the same factorisations (other padding)
    assert not torch.allclose(auto[2:], direct[2:], rtol=0, atol=1e-9)  # iterative, in float32 ...
    matrices = view.unit_matrices("w", 4, torch.arange(4))
    plain = _error(weights * kept, weights, matrices)
    gap = _error(auto, weights, matrices) - _error(direct, weights, matrices)
    assert (gap[2:].abs() <= 1e-3 * plain[2:]).all()  # ... but as good within the tolerance


def test_merge_solver_setting_is_checked_and_resolved():
    assert UnstructuredSettings(sparsity=0.5).merge_solver == "auto"
    assert UnstructuredSettings(sparsity=0.5, merge_solver="cg").merge_solver == "cg"
    assert UnstructuredSettings(sparsity=0.5, criterion="magnitude").merge_solver is None
    with pytest.raises(ConfigError, match="merge_solver solves the least-squares merge"):
        UnstructuredSettings(sparsity=0.5, merge="curvature", merge_solver="cg")
    with pytest.raises(ConfigError, match="unknown merge_solver 'lu'"):
        UnstructuredSettings(sparsity=0.5, merge_solver="lu")
    with pytest.raises(ConfigError, match="unknown solver"):
        least_squares_merge(torch.zeros(1, 2), None, "w", torch.zeros(1, 2, dtype=torch.bool),
                            torch.ones(1, 2, dtype=torch.bool), solver="lu")
