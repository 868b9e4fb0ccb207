"""Structured pruning end to end: every model, targets, measurements, export and checkpoints."""
import copy

import pytest
import torch
from torch import nn

from camphive import models
from camphive.checkpoints import load_checkpoint, save_checkpoint
from camphive.errors import ConfigError
from camphive.export import export_onnx
from camphive.measure import count_macs, count_parameters
from camphive.pruning import prune
from camphive.pruning.criteria import STRUCTURED_CRITERIA
from camphive.pruning.structured.prune import prune_structured

MODELS = [("resnet20", 32), ("resnet56", 32), ("resnet110", 32), ("resnet18", 32), ("resnet18-imagenet", 64),
          ("mobilenetv2", 32), ("mobilenetv2-imagenet", 64)]


def batches(size: int = 32, channels: int = 3, count: int = 1, samples: int = 4, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(samples, channels, size, size, generator=generator),
             torch.randint(0, 10, (samples,), generator=generator)) for _ in range(count)]


@pytest.mark.parametrize("name,size", MODELS)
def test_every_model_prunes_and_keeps_its_output_shape(name, size):
    example = torch.randn(2, 3, size, size)
    for sparsity in (0.3, 0.5, 0.7):
        torch.manual_seed(0)
        model = models.create(name, num_classes=10).eval()
        dense_parameters = count_parameters(model)
        result = prune_structured(model, batches(size), sparsity, criterion="magnitude", merge="least_squares",
                                  example_inputs=example[:1], measure_latency=False, round_to=1)  # exact counts
        output = model(example)
        assert output.shape == (2, 10) and torch.isfinite(output).all()
        assert result.sparsity == pytest.approx(sparsity, abs=0.02)
        assert count_parameters(model) < dense_parameters * (1 - sparsity) ** 2 * 1.6
        assert result.extra["macs_ratio"] > 1 / (1 - sparsity) ** 2 * 0.75


def test_camp_hive_defaults_on_a_residual_net():
    model = models.create("resnet20").eval()
    data = batches(count=2, samples=8)
    reference = model(data[0][0])
    result = prune_structured(model, data, target_macs_ratio=1.5, measure_latency=False)
    assert result.config["criterion"] == "camp-hive" and result.config["merge"] == "least_squares"
    assert result.cycles[0]["folded_consumers"] > 0 and not result.cycles[0]["unfolded_consumers"]
    assert model(data[0][0]).shape == reference.shape


def test_reported_macs_are_those_of_the_pruned_model():
    model = models.create("resnet20")
    example = torch.randn(1, 3, 32, 32)
    result = prune_structured(model, batches(), 0.4, criterion="magnitude", example_inputs=example,
                              measure_latency=False)
    assert result.after["macs"] == count_macs(model, example).total
    assert result.after["parameters"] == count_parameters(model)
    assert result.before["macs"] == count_macs(models.create("resnet20"), example).total
    assert result.extra["macs_ratio"] == pytest.approx(result.before["macs"] / result.after["macs"])


@pytest.mark.parametrize("options", [{"round_to": 1}, {"global_pruning": True, "round_to": 1}, {"round_to": 8},
                                     {"cycles": 2, "round_to": 1}, {}])
def test_target_macs_ratio_is_reached(options):
    model = models.create("resnet20")
    result = prune_structured(model, batches(), target_macs_ratio=2.0, criterion="magnitude", measure_latency=False,
                              **options)
    assert result.extra["target_reached"]
    if options.get("round_to", 8) == 8:  # explicit or default: 16-channel groups keep 8 or 16, a coarser step
        assert 2.0 <= result.extra["macs_ratio"] <= 2.0 * 1.1
        assert all(kept % 8 == 0 for _, kept in result.extra["channels"].values())
    else:
        assert 2.0 <= result.extra["macs_ratio"] <= 2.0 * 1.05
    if "cycles" in options:
        assert len(result.cycles) == 2 and result.cycles[0]["macs"] > result.cycles[1]["macs"]


def test_global_pruning_prunes_groups_unevenly():
    model = models.create("small-cnn", in_channels=1)
    with torch.no_grad():  # 40 of conv2's 64 channels do nothing: globally they go first, and only they
        model.conv2.weight[:40] = 0
        model.conv3.weight[:, :40] = 0
    result = prune_structured(model, batches(28, channels=1), 0.5, criterion="magnitude", global_pruning=True,
                              measure_latency=False, round_to=1)
    assert result.sparsity == pytest.approx(0.5, abs=0.01)
    assert model.conv2.out_channels == 24 and model.conv2.weight.abs().sum((1, 2, 3)).min() > 0
    assert model.conv1.out_channels != 16 or model.conv3.out_channels != 64  # not uniform


def test_min_channels_floors_every_group():
    model = models.create("small-cnn", in_channels=1)
    result = prune_structured(model, batches(28, channels=1), 0.9, criterion="random", global_pruning=True,
                              min_channels=0.25, measure_latency=False, round_to=8)  # 8 divides every floor
    assert all(kept >= original // 4 for original, kept in result.extra["channels"].values())
    assert result.sparsity == pytest.approx(0.75, abs=0.01)  # the floors bind everywhere


@pytest.mark.parametrize("criterion", STRUCTURED_CRITERIA)
def test_every_criterion_runs_through_the_same_entry(criterion):
    model = models.create("small-cnn", in_channels=1)
    result = prune(model, batches(28, channels=1, samples=8), 0.5, mode="structured", criterion=criterion,
                   example_inputs=torch.randn(1, 1, 28, 28), measure_latency=False)
    assert result.mode == "structured" and result.config["criterion"] == criterion
    assert model.conv2.out_channels == 32 and model.fc2.out_features == 10
    assert result.config["merge"] == ("least_squares" if criterion == "camp-hive" else "none")


def test_latency_is_measured_before_and_after():
    model = models.create("small-cnn", in_channels=1)
    result = prune_structured(model, batches(28, channels=1), 0.5, criterion="magnitude", latency_seconds=0.02,
                              latency_batch_sizes=(1, 8))
    latency = result.extra["latency"]
    for key in ("batch_1", "batch_8"):
        assert latency[key]["before_ms"] > 0 and latency[key]["after_ms"] > 0
        assert latency[key]["speedup"] == pytest.approx(latency[key]["before_ms"] / latency[key]["after_ms"])
    assert latency["channels_last"] is False and len(latency["load_average"]) == 2  # how busy the machine was


def test_latency_in_the_nhwc_layout_needs_image_inputs():
    model = models.create("small-cnn", in_channels=1)
    result = prune_structured(model, batches(28, channels=1), 0.5, criterion="magnitude", latency_seconds=0.02,
                              latency_batch_sizes=(2,), latency_channels_last=True)
    assert result.extra["latency"]["channels_last"] is True and result.extra["latency"]["batch_2"]["speedup"] > 0
    mlp = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    data = [(torch.randn(4, 6), torch.randint(0, 3, (4,)))]
    with pytest.raises(ConfigError, match="latency_channels_last needs one image input"):
        prune_structured(mlp, data, 0.5, criterion="magnitude", latency_channels_last=True)
    assert mlp[0].out_features == 8  # refused before anything was removed


def test_latency_compiled_reaches_the_timer_and_the_result(monkeypatch):
    import camphive.measure.latency as latency
    from camphive.measure import measure_latency

    seen = []

    def timer(models, input_shape, **options):  # the real timer, eager, recording what prune asked for
        seen.append(options)
        return measure_latency(models, input_shape, **{**options, "compiled": False})

    monkeypatch.setattr(latency, "measure_latency", timer)  # what compare_latency times with
    model = models.create("small-cnn", in_channels=1)
    result = prune(model, batches(28, channels=1), 0.5, mode="structured", criterion="magnitude",
                   latency_seconds=0.02, latency_batch_sizes=(2,), latency_compiled=True)
    assert [options["compiled"] for options in seen] == [True]
    assert result.extra["latency"]["batch_2"]["speedup"] > 0
    assert result.extra["latency"]["compiled"] is False  # says what was really timed (the stand-in ran eagerly)


def test_pruned_model_exports_to_onnx(tmp_path):
    model = models.create("mobilenetv2").eval()
    example = torch.randn(1, 3, 32, 32)
    prune_structured(model, batches(), 0.5, criterion="magnitude", merge="least_squares", measure_latency=False)
    exported = export_onnx(model, tmp_path / "pruned.onnx", example)
    assert exported.max_abs_diff <= 1e-4 and (tmp_path / "pruned.onnx").exists()


def test_pruned_checkpoint_reloads(tmp_path):
    model = models.create("resnet20").eval()
    prune_structured(model, batches(), target_macs_ratio=2.0, criterion="magnitude", measure_latency=False)
    path = save_checkpoint(tmp_path / "pruned.safetensors", model)
    loaded = load_checkpoint(path).model.eval()
    x = torch.randn(2, 3, 32, 32)
    def widths(net):
        return [conv.out_channels for conv in net.modules() if isinstance(conv, nn.Conv2d)]
    assert widths(loaded) == widths(model) != widths(models.create("resnet20"))
    assert torch.equal(loaded(x), model(x))


def test_a_user_model_with_concatenation_prunes():
    class TwoBranch(nn.Module):
        def __init__(self):
            super().__init__()
            self.left, self.right = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 6, 1)
            self.mix = nn.Conv2d(14, 10, 3, padding=1)
            self.head = nn.Linear(10, 4)

        def forward(self, x):
            y = torch.cat([torch.relu(self.left(x)), torch.relu(self.right(x))], 1)
            return self.head(torch.relu(self.mix(y)).mean((2, 3)))

    torch.manual_seed(0)
    model = TwoBranch().eval()
    data = [(torch.randn(8, 3, 12, 12), torch.randint(0, 4, (8,)))]
    prune_structured(model, data, 0.5, measure_latency=False)
    assert (model.left.out_channels, model.right.out_channels, model.mix.in_channels) == (4, 3, 7)
    assert model(data[0][0]).shape == (8, 4)


def test_bad_targets_and_options_are_one_line_errors():
    model = models.create("small-cnn", in_channels=1)
    data = batches(28, channels=1)
    for kwargs, match in [({}, "exactly one"), ({"sparsity": 0.5, "target_macs_ratio": 2.0}, "exactly one"),
                          ({"sparsity": 1.0}, "fraction"), ({"target_macs_ratio": 0.5}, ">= 1"),
                          ({"sparsity": 0.5, "criterion": "nope"}, "unknown criterion"),
                          ({"sparsity": 0.5, "merge": "half"}, "unknown merge"),
                          ({"sparsity": 0.5, "criterion": "magnitude", "channel_score": "obs"}, "camp-hive")]:
        with pytest.raises(ConfigError, match=match) as error:
            prune_structured(model, data, measure_latency=False, **kwargs)
        assert "\n" not in str(error.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("criterion", ["camp-hive", "magnitude", "taylor", "tp-taylor", "tp-hessian"])
def test_a_gpu_model_prunes_with_cpu_calibration_batches_as_on_the_cpu(criterion):
    """Loaders give CPU batches; a model on the GPU must prune from them, to the CPU run's shapes and outputs."""
    torch.manual_seed(0)
    on_cpu = models.create("resnet20", num_classes=10).eval()
    on_gpu = copy.deepcopy(on_cpu).cuda()
    data, example = batches(count=2, samples=8), torch.randn(4, 3, 32, 32)
    options = dict(target_macs_ratio=2.0, round_to=4, criterion=criterion, measure_latency=False)
    expected = prune_structured(on_cpu, data, **options)
    result = prune_structured(on_gpu, data, **options)
    assert result.extra["channels"] == expected.extra["channels"]
    assert result.extra["macs_after"] == expected.extra["macs_after"]
    torch.testing.assert_close(on_gpu(example.cuda()).cpu(), on_cpu(example), atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("capability, multiple", [("AVX2", 8), ("AVX512", 16), ("DEFAULT", 8)])
def test_default_rounding_keeps_multiples_of_the_vector_width_in_groups_of_16_or_more_and_exact_counts_below(
        monkeypatch, capability, multiple):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    model = models.create("small-cnn", in_channels=1)  # groups of 32, 64, 128 and 256 channels
    result = prune_structured(model, batches(28, channels=1), target_macs_ratio=2.0, criterion="magnitude",
                              measure_latency=False)
    assert result.config["round_to"] == multiple and result.config["round_min_group"] == 16
    assert result.extra["macs_ratio"] >= 2.0
    counts = [kept for original, kept in result.extra["channels"].values() if original >= 16]
    assert all(kept % multiple == 0 for kept in counts) and any(kept % 16 for kept in counts) == (multiple == 8)
    resnet = models.create("resnet20")  # 16-channel groups: under multiples of 16, keep 8 or 16
    result = prune_structured(resnet, batches(), target_macs_ratio=3.0, criterion="magnitude", measure_latency=False)
    narrow = [kept for original, kept in result.extra["channels"].values() if original == 16]
    assert result.extra["target_reached"] and set(narrow) <= {8, 16} and 8 in narrow
    tiny = nn.Sequential(nn.Conv2d(1, 6, 3), nn.ReLU(), nn.Conv2d(6, 4, 3), nn.Flatten(), nn.LazyLinear(10))
    tiny(torch.randn(1, 1, 8, 8))
    kept = prune_structured(tiny, batches(8, channels=1), 0.5, criterion="magnitude", measure_latency=False)
    assert sorted(count for _, count in kept.extra["channels"].values()) == [2, 3]  # 4 and 6 channels: not rounded


def test_the_stages_that_take_long_at_imagenet_scale_say_so_in_the_log(caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="camphive.pruning"):
        prune_structured(models.create("small-cnn", in_channels=1), batches(28, channels=1), target_macs_ratio=1.5,
                         criterion="magnitude", latency_batch_sizes=(1,), latency_seconds=0.01)
        prune(models.create("small-cnn", in_channels=1), batches(28, channels=1), 0.5, cycles=1)
    messages = [record.getMessage() for record in caplog.records]
    assert any(m.startswith("timing the model before and after pruning at batch sizes 1 ") for m in messages)
    assert any(m.endswith("re-estimating BatchNorm statistics") for m in messages)
    assert "cycle 1: forward selection within units" in messages
    assert "cycle 1: merging the pruned weights (least_squares)" in messages
