import pytest
import torch

from camphive.errors import ConfigError
from camphive.pruning.unstructured.selection import _first_in_order, cycle_targets, keep_floor, select_to_prune


def _scores(*shapes, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {f"l{i}": torch.rand(shape, generator=generator) for i, shape in enumerate(shapes)}


def test_global_selection_hits_the_exact_count_and_takes_the_lowest():
    scores = _scores((10, 10), (5, 20), (3,))
    alive = {name: torch.ones_like(score, dtype=torch.bool) for name, score in scores.items()}
    chosen = select_to_prune(scores, alive, 0.7, min_keep=0.0)
    assert sum(int(c.sum()) for c in chosen.values()) == round(0.7 * 203)
    threshold = max(float(scores[n][chosen[n]].max()) for n in scores if chosen[n].any())
    for name in scores:
        kept = scores[name][~chosen[name]]
        assert (kept >= threshold).all() or name == "l2"  # l2's floor protects its best entry


def test_floor_protects_every_layer():
    scores = {"big": torch.ones(100), "small": torch.zeros(10)}  # small would go first
    alive = {name: torch.ones_like(s, dtype=torch.bool) for name, s in scores.items()}
    chosen = select_to_prune(scores, alive, 0.5, min_keep=0.2)
    assert int((~chosen["small"]).sum()) == keep_floor(10, 0.2) == 2


def test_target_that_would_empty_a_layer_is_refused():
    scores = {"a": torch.rand(10), "b": torch.rand(10)}
    alive = {name: torch.ones(10, dtype=torch.bool) for name in scores}
    with pytest.raises(ConfigError, match="would empty a layer"):
        select_to_prune(scores, alive, 0.95, min_keep=0.1)


def test_layer_selection_prunes_each_layer_to_the_target_counting_earlier_pruning():
    scores = _scores((40,), (60,))
    alive = {name: torch.ones_like(score, dtype=torch.bool) for name, score in scores.items()}
    alive["l0"][:10] = False  # 25% already pruned
    chosen = select_to_prune(scores, alive, 0.5, selection="layer", min_keep=0.0)
    assert int(chosen["l0"].sum()) == 10 and int(chosen["l1"].sum()) == 30
    assert not (chosen["l0"] & ~alive["l0"]).any()


def test_schedules_end_at_the_target():
    assert cycle_targets(0.9, 3, "linear") == pytest.approx([0.3, 0.6, 0.9])
    cubic = cycle_targets(0.9, 3, "cubic")
    assert cubic[-1] == 0.9 and cubic[0] > 0.3 and cubic == sorted(cubic)
    with pytest.raises(ConfigError):
        cycle_targets(0.9, 0)


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, float("nan")])
def test_bad_sparsity(sparsity):
    scores = {"a": torch.rand(10)}
    with pytest.raises(ConfigError, match="sparsity must be in"):
        select_to_prune(scores, {"a": torch.ones(10, dtype=torch.bool)}, sparsity)


def test_first_in_order_is_what_a_stable_sort_puts_first_ties_and_infinities_included():
    generator = torch.Generator().manual_seed(0)
    for trial in range(20):
        values = torch.randint(0, 5, (200,), generator=generator).double()  # many ties
        values[torch.rand(200, generator=generator) < 0.2] = float("inf")
        values[torch.rand(200, generator=generator) < 0.1] = -float("inf")
        for count in (0, 1, 37, 150, 200):
            for largest in (False, True):
                expected = torch.zeros(200, dtype=torch.bool)
                expected[torch.sort(values, descending=largest, stable=True).indices[:count]] = True
                assert torch.equal(_first_in_order(values, count, largest), expected), (trial, count, largest)
