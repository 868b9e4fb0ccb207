"""Forward selection of the weights a unit keeps, against brute force on tiny float64 layers."""
import pytest
import torch

from camphive.pruning.core.unit_curvature import ReconstructionCurvature
from camphive.pruning.unstructured import greedy_selection
from camphive.pruning.unstructured.greedy_selection import choose_within_units, greedy_keep
from tests.pruning.unstructured.obs_reference import closed_form_obs, damped, layer_problem, reconstruction_errors


def refit_error(weight_row: torch.Tensor, hessian: torch.Tensor, kept: set[int]) -> float:
    """The least ``(v - w)^T H (v - w)`` over ``v`` supported on ``kept``, by an explicit solve."""
    mask = torch.zeros(1, weight_row.numel(), dtype=torch.bool)
    mask[0, sorted(kept)] = True
    best = closed_form_obs(weight_row[None], hessian, mask)
    return float(reconstruction_errors(best, weight_row[None], hessian))


def brute_force_greedy(weight_row, hessian, alive_row, keep: int, quota: dict | None = None) -> set[int]:
    """Add, one at a time, the alive weight whose refit error is least given those added before (with ``quota``
    ``{group: (columns, count)}``: only from groups holding fewer than their count)."""
    kept: set[int] = set()
    full = set()
    for _ in range(keep):
        if quota is not None:
            full = {j for columns, count in quota.values() if len(kept & set(columns)) >= count for j in columns}
        candidates = [j for j in range(weight_row.numel()) if alive_row[j] and j not in kept and j not in full]
        kept.add(min(candidates, key=lambda j: refit_error(weight_row, hessian, kept | {j})))
    return kept


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_greedy_matches_brute_force(seed):
    weight, gram = layer_problem(4, 7, seed=seed)
    alive = torch.ones(4, 7, dtype=torch.bool)
    alive[1, [0, 3]] = False  # entries pruned in an earlier cycle: zero, never chosen again
    alive[2, 6] = False
    weight = weight * alive
    keep = torch.tensor([1, 3, 5, 2])
    chosen = greedy_keep(weight, ReconstructionCurvature({"fc.weight": gram}), "fc.weight", alive, keep)
    hessian = damped(gram)
    for row in range(4):
        expected = brute_force_greedy(weight[row], hessian, alive[row], int(keep[row]))
        assert set(chosen[row].nonzero().flatten().tolist()) == expected


@pytest.mark.parametrize("seed", [0, 1])
def test_exact_greedy_under_a_pattern_matches_brute_force_and_holds_each_group_count(seed):
    weight, gram = layer_problem(3, 12, seed=seed)
    groups = torch.tensor([[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8, 11]])  # strided, as a conv's groups are
    alive = torch.ones(3, 12, dtype=torch.bool)
    alive[0, [0, 4]] = False  # pruned in an earlier cycle
    alive[2, [2, 5, 8]] = False
    weight = weight * alive
    group_keep = torch.tensor([[2, 2, 1], [1, 3, 2], [3, 2, 1]])
    chosen = greedy_keep(weight, ReconstructionCurvature({"fc.weight": gram}), "fc.weight", alive, group_keep,
                         groups=groups)
    hessian = damped(gram)
    for row in range(3):
        assert torch.equal(chosen[row][groups].sum(-1), group_keep[row])
        quota = {g: (groups[g].tolist(), int(group_keep[row, g])) for g in range(3)}
        expected = brute_force_greedy(weight[row], hessian, alive[row], int(group_keep[row].sum()), quota)
        assert set(chosen[row].nonzero().flatten().tolist()) == expected


def test_blocks_under_a_pattern_keep_every_group_count():
    weight, gram = layer_problem(5, 16, seed=9)
    groups = torch.arange(16).view(4, 4)
    alive = torch.ones(5, 16, dtype=torch.bool)
    alive[:, ::4] = False  # one of each group pruned before: 3 alive per group
    group_keep = torch.tensor([[2, 2, 2, 2], [1, 2, 3, 0], [3, 3, 3, 3], [0, 0, 0, 1], [2, 1, 2, 1]])
    for max_steps in (1, 2, 64):
        chosen = greedy_keep(weight * alive, ReconstructionCurvature({"fc.weight": gram}), "fc.weight", alive,
                             group_keep, max_steps=max_steps, groups=groups)
        assert torch.equal(chosen[:, groups].sum(-1), group_keep)
        assert not bool((chosen & ~alive).any())


def test_under_a_pattern_every_pruning_unit_is_rechosen_with_its_group_counts():
    weight, gram = layer_problem(3, 8, seed=10)
    groups = torch.arange(8).view(2, 4)
    alive = torch.ones(3, 8, dtype=torch.bool)
    pruned_now = torch.zeros(3, 8, dtype=torch.bool)
    pruned_now[0, [0, 1, 4, 5]] = True  # 2:4, keeps half: re-chosen
    pruned_now[1, [2, 7]] = True  # keeps 3 of 4 in each group: re-chosen too (no keep-fraction limit)
    curvature = ReconstructionCurvature({"fc.weight": gram})
    result = choose_within_units(weight, curvature, "fc.weight", alive, pruned_now, groups)
    expected = greedy_keep(weight, curvature, "fc.weight", alive, torch.tensor([[2, 2], [3, 3], [4, 4]]),
                           groups=groups)
    assert torch.equal(result[:2], ~expected[:2])
    assert not bool(result[2].any())


def test_one_block_takes_the_largest_first_gains(monkeypatch):
    weight, gram = layer_problem(3, 8, seed=3)
    alive = torch.ones(3, 8, dtype=torch.bool)
    keep = torch.tensor([4, 2, 3])
    chosen = greedy_keep(weight, ReconstructionCurvature({"fc.weight": gram}), "fc.weight", alive, keep, max_steps=1)
    hessian = damped(gram)
    gains = (weight @ hessian) ** 2 / hessian.diagonal()  # the error decrease of keeping j alone
    for row in range(3):
        expected = set(gains[row].topk(int(keep[row])).indices.tolist())
        assert set(chosen[row].nonzero().flatten().tolist()) == expected


def test_blocks_keep_the_counts_and_never_pick_dead_entries():
    weight, gram = layer_problem(6, 12, seed=4)
    generator = torch.Generator().manual_seed(0)
    alive = torch.rand(6, 12, generator=generator) > 0.3
    keep = (alive.sum(1) * torch.tensor([0.0, 0.2, 0.5, 0.9, 1.0, 0.4])).long()
    for max_steps in (1, 2, 3, 64):
        chosen = greedy_keep(weight * alive, ReconstructionCurvature({"fc.weight": gram}), "fc.weight", alive, keep,
                             max_steps=max_steps, max_bytes=1)  # max_bytes=1: one unit per batch
        assert torch.equal(chosen.sum(1), keep)
        assert not bool((chosen & ~alive).any())


def test_each_group_of_a_grouped_conv_reads_its_own_curvature():
    weight_a, gram_a = layer_problem(3, 6, seed=5)
    weight_b, gram_b = layer_problem(3, 6, seed=6)
    alive = torch.ones(6, 6, dtype=torch.bool)
    keep = torch.tensor([1, 2, 3, 1, 2, 3])
    grouped = greedy_keep(torch.cat([weight_a, weight_b]), ReconstructionCurvature({"c.weight": torch.stack([gram_a, gram_b])}),
                          "c.weight", alive, keep)
    alone_a = greedy_keep(weight_a, ReconstructionCurvature({"c.weight": gram_a}), "c.weight", alive[:3], keep[:3])
    alone_b = greedy_keep(weight_b, ReconstructionCurvature({"c.weight": gram_b}), "c.weight", alive[3:], keep[3:])
    assert torch.equal(grouped, torch.cat([alone_a, alone_b]))


def test_only_units_that_keep_few_are_rechosen_with_the_same_counts():
    weight, gram = layer_problem(3, 8, seed=7)
    alive = torch.ones(3, 8, dtype=torch.bool)
    pruned_now = torch.zeros(3, 8, dtype=torch.bool)
    pruned_now[0, :6] = True  # keeps 2 of 8: re-chosen
    pruned_now[1, :3] = True  # keeps 5 of 8: above half, as selected
    assert greedy_selection.MAX_KEEP_FRACTION == 0.5
    curvature = ReconstructionCurvature({"fc.weight": gram})
    result = choose_within_units(weight, curvature, "fc.weight", alive, pruned_now)
    expected = greedy_keep(weight, curvature, "fc.weight", alive, torch.tensor([2, 8, 8]))
    assert torch.equal(result[0], ~expected[0])
    assert torch.equal(result[1:], pruned_now[1:])


def test_the_greedy_choice_refits_better_than_the_diagonal_scores_here():
    """On correlated inputs, choosing jointly must not lose to choosing by ``w_j^2 H_jj`` (checked per unit)."""
    weight, gram = layer_problem(8, 16, seed=8)
    hessian = damped(gram)
    alive = torch.ones(8, 16, dtype=torch.bool)
    keep = torch.full((8,), 3)
    chosen = greedy_keep(weight, ReconstructionCurvature({"fc.weight": gram}), "fc.weight", alive, keep)
    by_scores = torch.zeros_like(alive)
    by_scores.scatter_(1, (weight**2 * hessian.diagonal()).topk(3, dim=1).indices, True)
    greedy_errors = reconstruction_errors(closed_form_obs(weight, hessian, chosen), weight, hessian)
    score_errors = reconstruction_errors(closed_form_obs(weight, hessian, by_scores), weight, hessian)
    assert float(greedy_errors.sum()) < float(score_errors.sum())
