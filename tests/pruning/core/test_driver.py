"""The one cycle driver: both modes stop after any cycle and resume to the uninterrupted result."""
import copy

import pytest
import torch

from camphive.errors import ConfigError
from camphive.pruning import prune
from tests.pruning.cases import image_batches, tiny_cnn


@pytest.mark.parametrize("target", [{"sparsity": 0.6}, {"target_macs_ratio": 2.5}])
def test_structured_runs_resume_between_cycles_exactly(target):
    options = dict(mode="structured", cycles=3, measure_latency=False, **target)
    uninterrupted = tiny_cnn()
    expected = prune(uninterrupted, image_batches(), **options)
    saved = {}

    def stop_after_cycle_two(cycle, state, record):
        if cycle == 2:
            saved["model"], saved["state"] = copy.deepcopy(model), copy.deepcopy(state)
            raise KeyboardInterrupt

    model = tiny_cnn()
    with pytest.raises(KeyboardInterrupt):
        prune(model, image_batches(), on_cycle_end=stop_after_cycle_two, **options)
    resumed = saved["model"]
    result = prune(resumed, image_batches(), start_cycle=2, resume_state=saved["state"], reference=tiny_cnn(),
                   **options)  # the unpruned model: the default refit matches it
    assert [record["cycle"] for record in result.cycles] == [3]
    assert result.extra["channels"] == expected.extra["channels"]
    assert result.extra["macs_before"] == expected.extra["macs_before"]
    for (name, a), (_, b) in zip(resumed.named_parameters(), uninterrupted.named_parameters()):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-6), name


def test_a_structured_resume_needs_its_state():
    with pytest.raises(ConfigError, match="needs the resume_state"):
        prune(tiny_cnn(), image_batches(), 0.5, mode="structured", cycles=2, start_cycle=1, measure_latency=False)


def test_unstructured_cycles_report_to_on_cycle_end_with_their_masks():
    seen = []
    result = prune(tiny_cnn(), image_batches(), 0.6, cycles=3, on_cycle_end=lambda c, masks, r: seen.append((c, masks)))
    assert [cycle for cycle, _ in seen] == [1, 2, 3]
    for name, mask in seen[-1][1].items():
        assert torch.equal(mask, result.masks[name])


def test_cycles_and_calibration_statistics_log_their_progress(caplog):
    with caplog.at_level("INFO", logger="camphive.pruning"):
        prune(tiny_cnn(), image_batches(), 0.6, cycles=2)
    messages = [record.getMessage() for record in caplog.records if record.name == "camphive.pruning"]
    assert any(message.startswith("cycle 1/2: target") for message in messages)
    assert any(message.startswith("cycle 2/2: done in") for message in messages)
    assert any(message.startswith("cycle 1: covariances took") for message in messages)
