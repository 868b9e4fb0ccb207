"""A criterion written by a user: one object, for weights and channels, through the same driver."""
import pytest
import torch

from camphive.errors import ConfigError
from camphive.pruning import Criterion, prune
from tests.pruning.cases import image_batches, tiny_cnn


class SquaredMagnitude(Criterion):
    name = "squared-magnitude"

    def scores(self, info):
        return {name: weight.detach() ** 2 for name, weight in info.weights().items()}


class LastChannelsFirst(Criterion):
    """Channels only: scores each channel by its index, so the highest indices are kept."""

    name = "index"

    def channel_scores(self, groups, info):
        return [torch.arange(group.size, dtype=torch.float64) for group in groups]


def test_a_user_criterion_prunes_exactly_like_the_builtin_with_the_same_ranking():
    ours, builtin = tiny_cnn(), tiny_cnn()
    result = prune(ours, image_batches(), 0.7, criterion=SquaredMagnitude())
    expected = prune(builtin, image_batches(), 0.7, criterion="magnitude")
    assert result.config["criterion"] == "squared-magnitude"
    for name, mask in result.masks.items():
        assert torch.equal(mask, expected.masks[name])
    for a, b in zip(ours.parameters(), builtin.parameters()):
        assert torch.equal(a, b)


def test_structured_mode_sums_a_user_criterion_over_each_channel_group():
    ours, builtin = tiny_cnn(), tiny_cnn()
    options = dict(mode="structured", measure_latency=False, merge="none")
    prune(ours, image_batches(), 0.5, criterion=SquaredMagnitude(), **options)
    prune(builtin, image_batches(), 0.5, criterion="magnitude", **options)
    # Summed squares and summed absolute values rank these channels differently in general; what must
    # hold is that the structure changed the same way (same channel counts) and the model still runs.
    assert [m.weight.shape for m in ours.modules() if hasattr(m, "weight") and m.weight is not None] == \
        [m.weight.shape for m in builtin.modules() if hasattr(m, "weight") and m.weight is not None]
    assert ours(torch.randn(2, 1, 8, 8)).shape == (2, 3)


def test_a_channel_only_criterion_keeps_the_channels_it_scores_highest():
    model = tiny_cnn()
    first_conv = model[0].weight.detach().clone()
    prune(model, image_batches(), 0.5, mode="structured", criterion=LastChannelsFirst(), merge="none",
          recalibrate_bn=False, measure_latency=False)
    assert torch.equal(model[0].weight, first_conv[2:])  # channels 2 and 3 of 4 kept
    with pytest.raises(ConfigError, match="has no per-weight scores"):
        prune(tiny_cnn(), image_batches(), 0.5, criterion=LastChannelsFirst())


def test_options_for_named_criteria_are_refused_with_an_instance():
    with pytest.raises(ConfigError, match="set them on your SquaredMagnitude instance"):
        prune(tiny_cnn(), image_batches(), 0.5, criterion=SquaredMagnitude(), score="obs")
