"""OBC (ExactOBS) against brute force and closed forms on tiny float64 layers."""
import itertools

import pytest
import torch

from camphive.errors import ConfigError
from camphive.pruning.unstructured import obc, removal_allocation
from camphive.pruning.unstructured.obc import greedy_trajectories, obc_prune
from camphive.pruning.unstructured.removal_allocation import allocate_removals
from tests.pruning.unstructured.obs_reference import closed_form_obs, damped, layer_problem, reconstruction_errors


def least_error(weight_row: torch.Tensor, hessian: torch.Tensor, removed: list[int]) -> float:
    """The least ``(w - w0)^T H (w - w0)`` with ``w`` zero on ``removed``, by an explicit solve."""
    kept = torch.ones(weight_row.numel(), dtype=torch.bool)
    kept[removed] = False
    best = closed_form_obs(weight_row[None], hessian, kept[None])
    return float(reconstruction_errors(best, weight_row[None], hessian))


@pytest.mark.parametrize("lazy_steps", [1, 2, 32])
def test_each_greedy_step_is_the_best_single_removal(monkeypatch, lazy_steps):
    monkeypatch.setattr(obc, "LAZY_STEPS", lazy_steps)  # 1 and 2 exercise folding and compaction
    weight, gram = layer_problem(3, 6, seed=1)
    hessian = damped(gram)
    order, losses = greedy_trajectories(weight, torch.linalg.inv(hessian), torch.ones(3, 6, dtype=torch.bool),
                                        torch.zeros(6, dtype=torch.bool), 6)
    for row in range(3):
        removed = []
        for step in range(6):
            before = least_error(weight[row], hessian, removed)
            increases = {p: least_error(weight[row], hessian, removed + [p]) - before
                         for p in range(6) if p not in removed}
            best = min(increases, key=increases.get)
            assert int(order[row, step]) == best
            assert float(losses[row, step]) == pytest.approx(increases[best], rel=1e-9, abs=1e-12)
            removed.append(best)


def test_trajectories_survive_folding_and_compaction():
    weight, gram = layer_problem(2, 70, seed=2)  # 70 steps: two folds of 32 and compactions
    hessian = damped(gram)
    order, losses = greedy_trajectories(weight, torch.linalg.inv(hessian), torch.ones(2, 70, dtype=torch.bool),
                                        torch.zeros(70, dtype=torch.bool), 70)
    assert torch.equal(order.sort(1).values, torch.arange(70).expand(2, -1))
    for row in range(2):  # summed greedy losses are the exact error of each prefix of the order
        for step in (5, 33, 50, 69):
            assert float(losses[row, :step].sum()) == pytest.approx(
                least_error(weight[row], hessian, order[row, :step].tolist()), rel=1e-8)


def test_final_weights_are_the_closed_form_obs_of_the_chosen_mask():
    weight, gram = layer_problem(5, 9, seed=3)
    new_weight, kept = obc_prune(weight, gram, 20)
    assert int((~kept).sum()) == 20 and torch.all(new_weight[~kept] == 0)
    torch.testing.assert_close(new_weight, closed_form_obs(weight, damped(gram), kept), rtol=1e-9, atol=1e-10)
    one_row_at_a_time, same_kept = obc_prune(weight, gram, 20, max_bytes=1)
    assert torch.equal(same_kept, kept)
    torch.testing.assert_close(one_row_at_a_time, new_weight, rtol=1e-12, atol=1e-13)


def test_chosen_row_counts_minimise_the_summed_greedy_loss():
    weight, gram = layer_problem(3, 5, seed=4)
    hessian = damped(gram)
    _, losses = greedy_trajectories(weight, torch.linalg.inv(hessian), torch.ones(3, 5, dtype=torch.bool),
                                    torch.zeros(5, dtype=torch.bool), 5)
    cumulative = torch.cat([torch.zeros(3, 1, dtype=torch.float64), losses.cumsum(1)], 1)
    for count in range(16):
        new_weight, kept = obc_prune(weight, gram, count)
        removals = (~kept).sum(1)
        assert int(removals.sum()) == count
        best = min(sum(float(cumulative[r, k]) for r, k in enumerate(ks))
                   for ks in itertools.product(range(6), repeat=3) if sum(ks) == count)
        chosen = float(cumulative[torch.arange(3), removals].sum())
        assert chosen == pytest.approx(best, rel=1e-12, abs=1e-14)
        assert float(reconstruction_errors(new_weight, weight, hessian).sum()) == pytest.approx(chosen, rel=1e-8,
                                                                                               abs=1e-12)


def test_large_layer_path_keeps_the_count_and_the_closed_form(monkeypatch):
    monkeypatch.setattr(removal_allocation, "EXACT_LIMIT", 0)  # the allocation by price, as on real layers
    weight, gram = layer_problem(6, 10, seed=8)
    for count in (1, 17, 31, 59):
        new_weight, kept = obc_prune(weight, gram, count)
        assert int((~kept).sum()) == count
        torch.testing.assert_close(new_weight, closed_form_obs(weight, damped(gram), kept), rtol=1e-9, atol=1e-10)


def brute_force_allocation(cumulative, count):
    rows, width = cumulative.shape
    return min(sum(float(cumulative[r, k]) for r, k in enumerate(ks))
               for ks in itertools.product(range(width), repeat=rows) if sum(ks) == count)


@pytest.mark.parametrize("seed", range(4))
def test_allocation_exact_by_program_and_by_price_when_convex(seed):
    generator = torch.Generator().manual_seed(seed)
    bumpy = torch.cat([torch.zeros(4, 1), torch.rand(4, 5, generator=generator).cumsum(1)], 1).double()
    bumpy[0, :2] = float("inf")  # a row with 2 dead entries must lose at least 2
    convex = torch.cat([torch.zeros(4, 1), torch.rand(4, 5, generator=generator).sort(1).values.cumsum(1)], 1).double()
    for count in range(2, 21):
        chosen = allocate_removals(bumpy, count)
        assert int(chosen.sum()) == count and int(chosen[0]) >= 2
        assert float(bumpy[torch.arange(4), chosen].sum()) == pytest.approx(brute_force_allocation(bumpy, count))
    for count in range(21):
        chosen = removal_allocation._allocate_by_price(convex, count)
        assert int(chosen.sum()) == count
        assert float(convex[torch.arange(4), chosen].sum()) == pytest.approx(brute_force_allocation(convex, count))


def test_already_pruned_entries_stay_pruned_and_are_folded():
    weight, gram = layer_problem(4, 8, seed=5)
    alive = torch.rand(4, 8, generator=torch.Generator().manual_seed(0)) > 0.3
    alive[0] = False  # a row with nothing left
    new_weight, kept = obc_prune(weight, gram, int((~alive).sum()) + 5, alive=alive)
    assert not torch.any(kept & ~alive) and int((~kept).sum()) == int((~alive).sum()) + 5
    torch.testing.assert_close(new_weight, closed_form_obs(weight, damped(gram), kept), rtol=1e-9, atol=1e-10)


def test_n_m_pattern_and_conv_shape():
    weight, gram = layer_problem(4, 12, seed=6)
    conv_weight = weight.reshape(4, 3, 2, 2).float()
    new_weight, kept = obc_prune(conv_weight, gram, pattern=(2, 4))
    assert new_weight.shape == kept.shape == conv_weight.shape and new_weight.dtype == torch.float32
    kept = kept.reshape(4, 12)
    assert torch.equal((~kept).reshape(4, 3, 4).sum(2), torch.full((4, 3), 2))
    torch.testing.assert_close(new_weight.reshape(4, 12).double(), closed_form_obs(weight, damped(gram), kept),
                               rtol=1e-5, atol=1e-6)


def test_n_m_pattern_is_greedy_inside_open_groups():
    weight, gram = layer_problem(2, 8, seed=7)
    hessian = damped(gram)
    order, _ = greedy_trajectories(weight, torch.linalg.inv(hessian), torch.ones(2, 8, dtype=torch.bool),
                                   torch.zeros(8, dtype=torch.bool), 4, pattern=(2, 4))
    for row in range(2):
        removed = []
        for step in range(4):
            open_inputs = [p for p in range(8) if p not in removed and sum(q // 4 == p // 4 for q in removed) < 2]
            before = least_error(weight[row], hessian, removed)
            best = min(open_inputs, key=lambda p: least_error(weight[row], hessian, removed + [p]) - before)
            assert int(order[row, step]) == best
            removed.append(best)


def test_fan_in_limit_is_a_one_line_error():
    weight, gram = layer_problem(3, 10)
    with pytest.raises(ConfigError, match="3 x 10.*max_fan_in 8.*use sparsegpt, or raise max_fan_in") as error:
        obc_prune(weight, gram, 5, max_fan_in=8, layer="conv1")
    assert "\n" not in str(error.value) and "conv1" in str(error.value)
