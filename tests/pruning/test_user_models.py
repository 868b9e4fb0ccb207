"""Models and data a user brings, the way they come: grouped convs, GroupNorm, LSTM readers,
integer inputs, several outputs, bad batches, options given loosely. Each case is either
pruned correctly or refused in one line before the model changes."""
import copy

import pytest
import torch
from torch import nn

from camphive.errors import ConfigError, DataError
from camphive.pruning import prune


def image_data(channels=3, size=8, batches=2, classes=4, seed=1, scale=1.0, shift=0.0):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, channels, size, size, generator=generator) * scale + shift,
             torch.randint(0, classes, (16,), generator=generator)) for _ in range(batches)]


class GroupedThenPlain(nn.Module):
    """c1 feeds a grouped conv (its channels must stay); c3 -> c4 is an ordinary pair."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 16, 3, padding=1, groups=2)
        self.c3, self.c4 = nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        x = torch.relu(self.c2(torch.relu(self.c1(x))))
        x = torch.relu(self.c4(torch.relu(self.c3(x))))
        return self.fc(x.mean((2, 3)))


def test_channels_read_by_a_grouped_conv_are_kept_and_the_rest_is_pruned():
    torch.manual_seed(0)
    model = GroupedThenPlain().eval()
    result = prune(model, image_data(), 0.5, mode="structured", measure_latency=False)
    assert (model.c1.out_channels, model.c2.out_channels, model.c2.in_channels) == (8, 16, 8)
    assert model.c3.out_channels == 8 and model.c4.in_channels == 8
    assert set(result.extra["skipped_groups"]) == {"c1", "c2"}
    assert "grouped convolution (groups=2)" in result.extra["skipped_groups"]["c1"]
    assert model(image_data()[0][0]).shape == (16, 4)


def test_a_model_of_grouped_convs_only_is_refused_before_anything_changes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, groups=2), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=4),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ConfigError, match="no prunable channel groups.*grouped convolution"):
        prune(model, image_data(channels=4), 0.5, mode="structured", measure_latency=False)
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())


class GroupNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.gn, self.c2 = nn.Conv2d(3, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.c2(torch.relu(self.gn(self.c1(x))))).mean((2, 3)))


@pytest.mark.parametrize("options", [{"sparsity": 0.3}, {"target_macs_ratio": 3.0, "cycles": 3},
                                     {"target_macs_ratio": 2.0, "global_pruning": True, "criterion": "magnitude"}])
def test_groupnorm_groups_lose_as_many_channels_each(options):
    torch.manual_seed(0)
    model = GroupNormNet().eval()
    with torch.no_grad():
        model.gn.weight.copy_(torch.arange(16.0) + 1)  # tells which original channel each kept one was
    prune(model, image_data(), mode="structured", measure_latency=False, **options)
    kept = (model.gn.weight.detach() - 1).round().long()
    assert model.gn.num_channels == model.c1.out_channels == kept.numel() < 16
    assert model.gn.num_channels % model.gn.num_groups == 0 and model.gn.num_groups == 4
    per_group = torch.bincount(kept // 4, minlength=4)
    assert bool((per_group == per_group[0]).all()), per_group  # every normalisation group keeps its own, evenly
    assert torch.isfinite(model(image_data()[0][0])).all()


class LinearIntoLSTM(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.lstm, self.fc = nn.Linear(4, 16), nn.LSTM(16, 16, batch_first=True), nn.Linear(16, 4)

    def forward(self, x):
        hidden, _ = self.lstm(torch.relu(self.inp(x)))
        return self.fc(hidden[:, -1])


def test_channels_only_an_lstm_reads_are_scored_not_removed_in_index_order():
    torch.manual_seed(0)
    model = LinearIntoLSTM().eval()
    with torch.no_grad():
        model.inp.weight[1::2] *= 1e-3  # the odd channels carry (almost) nothing
        model.inp.bias[1::2] *= 1e-3
    original = model.inp.weight.detach().clone()
    generator = torch.Generator().manual_seed(1)
    data = [(torch.randn(16, 5, 4, generator=generator), torch.randint(0, 4, (16,), generator=generator))]
    reference = copy.deepcopy(model)
    prune(model, data, 0.5, mode="structured", measure_latency=False, refit=False)
    assert torch.equal(model.inp.weight.detach(), original[0::2])  # the odd (weak) channels went
    assert model.lstm.input_size == 8 and model(data[0][0]).shape == (16, 4)
    # the default refit fits the linear layers' last dimension (their channels), on sequences too
    result = prune(reference, data, 0.5, mode="structured", measure_latency=False)
    assert result.extra["refit"]["layers"] == 2 and reference.lstm.input_size == 8
    assert torch.isfinite(reference(data[0][0])).all()


def test_integer_input_models_are_pruned_and_latency_says_why_it_was_not_timed():
    class Embedded(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.l1, self.fc = nn.Embedding(50, 16), nn.Linear(16, 16), nn.Linear(16, 4)

        def forward(self, x):
            return self.fc(torch.relu(self.l1(self.emb(x).mean(1))))

    torch.manual_seed(0)
    model = Embedded()
    data = [(torch.randint(0, 50, (16, 6)), torch.randint(0, 4, (16,)))]
    result = prune(model, data, 0.5, mode="structured")
    assert model.l1.out_features == 8
    assert "not floating point" in result.extra["latency"]["skipped"]


@pytest.mark.parametrize("mode", ["unstructured", "structured"])
@pytest.mark.parametrize("wrap", [lambda y: (y, y[:, :2]), lambda y: {"logits": y}])
def test_models_returning_several_outputs_are_refused_in_one_line(mode, wrap):
    class Several(nn.Module):
        def __init__(self):
            super().__init__()
            self.l1, self.l2 = nn.Linear(8, 16), nn.Linear(16, 4)

        def forward(self, x):
            return wrap(self.l2(torch.relu(self.l1(x))))

    data = [(torch.randn(16, 8), torch.randint(0, 4, (16,)))]
    with pytest.raises(ConfigError, match="not a tensor.*wrap yours"):
        prune(Several(), data, 0.5, mode=mode, measure_latency=False) if mode == "structured" else \
            prune(Several(), data, 0.5)


@pytest.mark.parametrize("bad, message", [(float("nan"), "NaN or inf"), (float("inf"), "NaN or inf")])
def test_calibration_inputs_with_nan_or_inf_are_refused(bad, message):
    data = image_data()
    data[1][0][3, 0, 2, 2] = bad
    model = GroupNormNet()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(DataError, match=f"batch 1 holds {message}"):
        prune(model, data, 0.5, criterion="magnitude")
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())


def test_batches_with_fewer_targets_than_inputs_are_refused():
    data = [(torch.randn(4, 3, 8, 8), torch.randint(0, 4, (5,)))]
    with pytest.raises(DataError, match="4 inputs but 5 targets"):
        prune(GroupNormNet(), data, 0.5, mode="structured", measure_latency=False)


@pytest.mark.parametrize("mode", ["unstructured", "structured"])
def test_sparsity_zero_leaves_the_model_exactly_as_it_was(mode):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                          nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    before = copy.deepcopy(model.state_dict())
    data = image_data(scale=3.0, shift=1.0)  # statistics unlike the model's BatchNorm buffers
    options = {"mode": "structured", "measure_latency": False} if mode == "structured" else {"spectrum_top_k": 0}
    prune(model, data, 0.0, **options)
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())


def test_loose_options_are_read_or_refused_in_one_line():
    torch.manual_seed(0)
    model = GroupedThenPlain().eval()
    result = prune(model, image_data(), 0.5, mode="structured", measure_latency=False, ignored_layers="c3")
    assert model.c3.out_channels == 16 and result.config["ignored_layers"] == ["c3"]  # one name, not its letters
    unstructured = GroupedThenPlain().eval()
    prune(unstructured, image_data(), 0.5, ignored_layers="c3", spectrum_top_k=0)
    assert bool((unstructured.c3.weight != 0).all()) and bool((unstructured.c4.weight == 0).any())
    with pytest.raises(ConfigError, match="cycles must be >= 1"):
        prune(GroupedThenPlain(), image_data(), 0.5, cycles=0)
    with pytest.raises(ConfigError, match="unknown option.*structured pruning: round_too; known: "):
        prune(GroupedThenPlain(), image_data(), 0.5, mode="structured", round_too=8)
    with pytest.raises(ConfigError, match=r"example_inputs of shape \(1, 1, 8, 8\) do not fit the model"):
        prune(GroupedThenPlain(), image_data(), 0.5, mode="structured", example_inputs=torch.randn(1, 1, 8, 8))


def test_a_sparsity_the_layer_floors_forbid_is_refused_before_the_first_cycle():
    torch.manual_seed(0)
    model = GroupNormNet().eval()
    before = copy.deepcopy(model.state_dict())
    finished = []
    with pytest.raises(ConfigError, match="would empty a layer.*min_keep=0.5"):
        prune(model, image_data(), 0.9, min_keep=0.5, cycles=3, spectrum_top_k=0,
              on_cycle_end=lambda cycle, masks, record: finished.append(cycle))
    assert finished == []  # refused up front, not after cycle 1 was done (and saved by the prune job)
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())
