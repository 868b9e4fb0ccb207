import torch

from camphive.pruning.core.unit_curvature import ReconstructionCurvature
from camphive.pruning.unstructured.pairing import coupled_pairs, cyclic_pairs
from tests.pruning.cases import gaussian_covariance


def test_cyclic_pairing_walks_kept_weights_round_robin_in_significance_order():
    significance = torch.tensor([[9.0, 1.0, 8.0, 2.0, 3.0, 7.0, 0.5]])
    pruned = torch.tensor([[False, True, False, True, True, False, True]])
    kept = ~pruned
    rows, pruned_cols, partners = cyclic_pairs(pruned, kept, significance)
    # pruned by significance: 4 (3.0), 3 (2.0), 1 (1.0), 6 (0.5); kept: 0 (9), 2 (8), 5 (7)
    assert pruned_cols.tolist() == [4, 3, 1, 6]
    assert partners.tolist() == [0, 2, 5, 0]
    assert rows.tolist() == [0, 0, 0, 0]


def test_pairs_never_leave_their_unit_and_skip_units_without_kept_weights():
    generator = torch.Generator().manual_seed(0)
    pruned = torch.rand(6, 10, generator=generator) < 0.5
    pruned[2] = True  # a unit with nothing kept
    kept = ~pruned
    significance = torch.rand(6, 10, generator=generator)
    view = ReconstructionCurvature({"w": gaussian_covariance(10)})
    for rows, pruned_cols, partners in (cyclic_pairs(pruned, kept, significance), coupled_pairs(pruned, kept, view, "w")):
        assert pruned[rows, pruned_cols].all() and kept[rows, partners].all()
        assert 2 not in rows.tolist()
        assert len(rows) == int(pruned.sum()) - 10


def test_coupled_pairing_picks_the_largest_normalised_coupling():
    covariance = gaussian_covariance(5, seed=3)
    view = ReconstructionCurvature({"w": covariance}, damping=0.0)
    pruned = torch.tensor([[True, False, True, False, False]])
    rows, pruned_cols, partners = coupled_pairs(pruned, ~pruned, view, "w")
    for p, s in zip(pruned_cols.tolist(), partners.tolist()):
        candidates = [1, 3, 4]
        best = max(candidates, key=lambda c: abs(covariance[p, c]) / covariance[c, c].sqrt())
        assert s == best
