"""Property tests: random layer shapes and sparsities never break the sparsity and mask invariants."""
import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from camphive.pruning import prune
from camphive.pruning.unstructured.selection import keep_floor, select_to_prune

shapes = st.lists(st.tuples(st.integers(1, 12), st.integers(1, 12)), min_size=1, max_size=4)


@settings(max_examples=60, deadline=None)
@given(shapes=shapes, sparsity=st.floats(0.0, 0.99), min_keep=st.sampled_from([0.0, 0.01, 0.1, 2]),
       selection=st.sampled_from(["global", "layer"]), seed=st.integers(0, 1000), already=st.floats(0.0, 0.5))
def test_selection_invariants(shapes, sparsity, min_keep, selection, seed, already):
    generator = torch.Generator().manual_seed(seed)
    scores = {f"l{i}": torch.rand(shape, generator=generator) for i, shape in enumerate(shapes)}
    alive = {}
    for name, score in scores.items():
        mask = torch.rand(score.shape, generator=generator) >= already
        floor = keep_floor(score.numel(), min_keep)
        mask.view(-1)[:floor] = True  # earlier pruning respected the floor too
        alive[name] = mask
    try:
        chosen = select_to_prune(scores, alive, sparsity, selection=selection, min_keep=min_keep)
    except Exception as error:  # a target that cannot be met must say so, never fall short silently
        assert "empty a layer" in str(error) or "fewer than" in str(error)
        return
    for name in scores:
        assert not (chosen[name] & ~alive[name]).any()
        remaining = int((alive[name] & ~chosen[name]).sum())
        assert remaining >= min(keep_floor(scores[name].numel(), min_keep), int(alive[name].sum()))
    total = sum(s.numel() for s in scores.values())
    pruned_after = sum(int((~(alive[n] & ~chosen[n])).sum()) for n in scores)
    if selection == "global":
        already_pruned = sum(int((~alive[n]).sum()) for n in scores)
        assert pruned_after == max(round(sparsity * total), already_pruned)


@settings(max_examples=15, deadline=None)
@given(hidden=st.integers(2, 16), inputs=st.integers(2, 10), sparsity=st.floats(0.0, 0.9),
       merge=st.sampled_from(["none", "curvature", "least_squares", "half"]), pairing=st.sampled_from(["cyclic", "coupled"]),
       seed=st.integers(0, 100))
def test_prune_invariants_on_random_mlps(hidden, inputs, sparsity, merge, pairing, seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, 3))
    batches = [(torch.randn(8, inputs), torch.randint(0, 3, (8,))) for _ in range(2)]
    total = inputs * hidden + hidden * 3
    floors = keep_floor(inputs * hidden, 0.01) + keep_floor(hidden * 3, 0.01)
    if round(sparsity * total) > total - floors:
        return
    result = prune(model, batches, sparsity, merge=merge, pairing=pairing, spectrum_top_k=0)
    assert math.isclose(result.sparsity, round(sparsity * total) / total, abs_tol=1e-9)
    parameters = dict(model.named_parameters())
    for name, mask in result.masks.items():
        assert torch.count_nonzero(parameters[name][~mask]) == 0
        assert torch.isfinite(parameters[name]).all()
        assert mask.sum() >= 1
