import torch

from camphive.pruning.core.unit_curvature import LowRankLossCurvature, ReconstructionCurvature
from camphive.pruning.unstructured.merging import least_squares_merge, merge_into_partner, pair_merge
from tests.pruning.cases import explicit_least_squares, gaussian_covariance


def test_curvature_merge_of_a_single_pair_is_the_closed_form():
    covariance = torch.tensor([[2.0, 0.6, 0.0], [0.6, 1.5, 0.2], [0.0, 0.2, 1.0]], dtype=torch.float64)
    view = ReconstructionCurvature({"w": covariance}, damping=0.0)
    weights = torch.tensor([[0.5, -1.0, 2.0]], dtype=torch.float64)
    pruned = torch.tensor([[True, False, False]])
    alpha = pair_merge(weights, view, "w", pruned, torch.tensor([0]), torch.tensor([0]), torch.tensor([1]))
    # w_s += (H_ps / H_ss) w_p = -1.0 + (0.6 / 1.5) * 0.5 = -0.8
    assert torch.allclose(weights, torch.tensor([[0.0, -0.8, 2.0]], dtype=torch.float64))
    assert torch.allclose(alpha, torch.ones(1, dtype=torch.float64))


def test_pair_merge_coefficient_is_clipped():
    covariance = torch.tensor([[4.0, 0.9], [0.9, 0.1]], dtype=torch.float64)  # H_ps / H_ss = 9
    view = ReconstructionCurvature({"w": covariance}, damping=0.0)
    weights = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    pair_merge(weights, view, "w", torch.tensor([[True, False]]), torch.tensor([0]), torch.tensor([0]),
               torch.tensor([1]), clip=2.0)
    assert torch.allclose(weights, torch.tensor([[0.0, 2.0]], dtype=torch.float64))


def test_pair_merge_never_increases_the_quadratic_model_even_when_pairs_collide():
    covariance = gaussian_covariance(6, seed=1)
    view = ReconstructionCurvature({"w": covariance}, damping=0.0)
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        weights = torch.randn(3, 6, generator=generator, dtype=torch.float64)
        pruned = torch.zeros(3, 6, dtype=torch.bool)
        pruned[:, :3] = True
        rows = torch.arange(3).repeat_interleave(3)
        cols = torch.arange(3).repeat(3)
        partners = torch.full_like(cols, 4)  # every pruned weight into one partner
        merged = weights.clone()
        pair_merge(merged, view, "w", pruned, rows, cols, partners)
        plain = weights.clone()
        plain[pruned] = 0
        cost = lambda w: float(((w - weights) @ covariance * (w - weights)).sum())
        assert cost(merged) <= cost(plain) + 1e-12


def test_merge_into_partner_adds_up_shared_partners():
    weights = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    merge_into_partner(weights, torch.tensor([0, 0]), torch.tensor([0, 1]), torch.tensor([3, 3]), 0.5)
    assert weights.tolist() == [[0.0, 0.0, 3.0, 5.5]]


def test_least_squares_merge_equals_explicit_solve_per_unit():
    covariance = gaussian_covariance(7, seed=2)
    view = ReconstructionCurvature({"w": covariance}, damping=0.0)
    generator = torch.Generator().manual_seed(1)
    weights = torch.randn(5, 7, generator=generator, dtype=torch.float64)
    pruned = torch.rand(5, 7, generator=generator) < 0.4
    pruned[0] = False
    pruned[1, :] = True  # a unit pruned entirely: nothing to fold into
    kept = ~pruned
    merged = weights.clone()
    least_squares_merge(merged, view, "w", pruned, kept)
    for r in range(5):
        expected = weights[r].clone()
        S, P = kept[r].nonzero().flatten(), pruned[r].nonzero().flatten()
        if len(S) and len(P):
            expected[S] += torch.linalg.solve(covariance[S][:, S], covariance[S][:, P] @ weights[r, P])
        expected[P] = 0
        assert torch.allclose(merged[r], expected, atol=1e-12)


def test_low_rank_view_matches_its_explicit_matrices():
    generator = torch.Generator().manual_seed(0)
    values = torch.tensor([3.0, -2.0], dtype=torch.float64)
    vectors = torch.randn(2, 4, 5, generator=generator, dtype=torch.float64)
    residual = torch.rand(4, 5, generator=generator, dtype=torch.float64)
    view = LowRankLossCurvature(values, {"w": vectors}, {"w": residual}, damping=0.0)
    rows = torch.arange(4)
    matrices = view.unit_matrices("w", 4, rows)
    for r in range(4):
        expected = sum(abs(values[k]) * torch.outer(vectors[k, r], vectors[k, r]) for k in range(2))
        expected = expected + torch.diag(residual[r])
        assert torch.allclose(matrices[r], expected)
    left, right = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    assert torch.allclose(view.bilinear("w", left, right), torch.einsum("ri,rij,rj->r", left, matrices, right))
    cols = torch.tensor([[1, 3], [0, 4], [2, 2], [4, 0]])
    assert torch.allclose(view.unit_rows("w", 4, rows, cols), matrices[rows[:, None], cols])
    assert torch.allclose(view.diagonal("w", 4), matrices.diagonal(dim1=-2, dim2=-1))


def test_grouped_reconstruction_view_uses_each_units_group():
    first, second = gaussian_covariance(3, seed=0), gaussian_covariance(3, seed=1)
    view = ReconstructionCurvature({"w": torch.stack([first, second])}, damping=0.0)
    diagonal = view.diagonal("w", 4)  # units 0-1 read group 0, units 2-3 group 1
    assert torch.allclose(diagonal[1], first.diagonal()) and torch.allclose(diagonal[2], second.diagonal())
    left = torch.randn(4, 3, dtype=torch.float64)
    expected = torch.stack([left[r] @ (first if r < 2 else second) @ left[r] for r in range(4)])
    assert torch.allclose(view.bilinear("w", left, left), expected)


def test_views_restrict_and_apply_their_unit_matrices_exactly():
    generator = torch.Generator().manual_seed(3)
    values = torch.tensor([2.0, -0.5, 1.0], dtype=torch.float64)
    vectors = torch.randn(3, 6, 5, generator=generator, dtype=torch.float64)
    residual = torch.rand(6, 5, generator=generator, dtype=torch.float64)
    grouped = torch.stack([gaussian_covariance(5, seed=4), gaussian_covariance(5, seed=5)])
    rows = torch.tensor([5, 0, 3, 2])
    cols = torch.tensor([[4, 1, 2], [0, 3, 4], [2, 1, 0], [3, 0, 1]])
    probes = torch.randn(4, 5, generator=generator, dtype=torch.float64)
    for view in (LowRankLossCurvature(values, {"w": vectors}, {"w": residual}, damping=0.1),
                 ReconstructionCurvature({"w": grouped}, damping=0.1),
                 ReconstructionCurvature({"w": grouped[0]}, damping=0.1)):
        matrices = view.unit_matrices("w", 6, rows)
        expected = torch.stack([matrices[i][cols[i]][:, cols[i]] for i in range(4)])
        assert torch.allclose(view.submatrices("w", 6, rows, cols), expected)
        assert torch.allclose(view.times("w", 6, rows, probes), torch.einsum("nij,nj->ni", matrices, probes))


def test_least_squares_merge_is_exact_for_every_view_side_and_chunking():
    generator = torch.Generator().manual_seed(6)
    fan_in = 12
    values = torch.tensor([2.0, 1.0], dtype=torch.float64)
    vectors = torch.randn(2, 8, fan_in, generator=generator, dtype=torch.float64)
    residual = torch.rand(8, fan_in, generator=generator, dtype=torch.float64) + 0.1
    grouped = torch.stack([gaussian_covariance(fan_in, seed=7), gaussian_covariance(fan_in, seed=8)])
    for fraction in (0.15, 0.5, 0.85):  # few pruned (solved on the complement), half, most (on the kept set)
        weights = torch.randn(8, fan_in, generator=generator, dtype=torch.float64)
        draw = torch.rand(8, fan_in, generator=generator)
        pruned = draw < fraction
        earlier = (draw > 0.95) & ~pruned  # pruned in an earlier cycle: neither kept nor touched
        kept = ~pruned & ~earlier
        for view in (LowRankLossCurvature(values, {"w": vectors}, {"w": residual}, damping=0.0),
                     ReconstructionCurvature({"w": grouped}, damping=0.0)):
            expected = explicit_least_squares(weights, view.unit_matrices("w", 8, torch.arange(8)), pruned, kept)
            for chunk_elements in (1, 2**22):  # one unit per chunk, and all at once
                merged = weights.clone()
                least_squares_merge(merged, view, "w", pruned, kept, chunk_elements=chunk_elements)
                assert torch.allclose(merged, expected, atol=1e-9), (fraction, type(view).__name__)
                assert torch.equal(merged[earlier], weights[earlier])
