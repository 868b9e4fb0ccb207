"""MACs and parameter counts against hand-computed numbers; latency bookkeeping."""
from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from camphive.errors import ConfigError
from camphive.measure import count_macs, count_parameters, measure_latency, model_summary
from camphive.modules import inputs_on_model_device


@pytest.fixture(autouse=True)
def one_thread():
    # The test machine is shared: several intra-op threads on busy cores are far slower.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


class TinyNet(nn.Module):
    """Input (B, 3, 9, 9). Hand-computed MACs per sample are in the comments."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)  # -> (8, 5, 5): 200 outputs x 3*9 = 5400
        self.bn = nn.BatchNorm2d(8)  # 200 elements -> 200
        self.relu = nn.ReLU()  # not counted
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)  # 200 x 1*9 = 1800
        # residual sum in forward: 200
        self.grouped = nn.Conv2d(8, 4, 1, groups=2)  # -> (4, 5, 5): 100 x 4*1 = 400
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(100, 10)  # 10 x 100 = 1000

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn(self.conv(x)))
        x = x + self.depthwise(x)
        return self.fc(self.flatten(self.grouped(x)))


TINY_PARAMETERS = (8 * 3 * 9 + 8) + (8 + 8) + 8 * 9 + (4 * 4 + 4) + (100 * 10 + 10)  # 1342


def tiny_net() -> TinyNet:
    torch.manual_seed(0)
    model = TinyNet()
    with torch.no_grad():  # no accidental zeros: every entry in +-[0.5, 1.5]
        for parameter in model.parameters():
            sign = torch.where(torch.rand_like(parameter) < 0.5, -1.0, 1.0)
            parameter.copy_(sign * (0.5 + torch.rand_like(parameter)))
    return model


def test_macs_match_hand_computed_counts():
    report = count_macs(tiny_net(), torch.randn(1, 3, 9, 9))
    assert report.per_layer == {
        "conv": 5400, "bn": 200, "depthwise": 1800, "(model)": 200, "grouped": 400, "fc": 1000,
    }
    assert report.by_kind == {"conv": 7600, "linear": 1000, "norm": 200, "add": 200}
    assert report.total == 9000
    assert report.uncounted == []


def test_macs_scale_with_batch_and_can_leave_out_norm_and_add():
    report = count_macs(tiny_net(), torch.randn(3, 3, 9, 9), include_norm_and_add=False)
    assert report.total == 3 * 8600
    assert "bn" not in report.per_layer and "(model)" not in report.per_layer
    assert report.by_kind["norm"] == report.by_kind["add"] == 0


def test_nonzero_macs_count_only_kept_weights():
    model = tiny_net()
    with torch.no_grad():
        model.conv.weight[0] = 0  # one filter: 27 weights, each used at 25 positions
        model.depthwise.weight.view(-1)[:4] = 0  # 4 weights x 25 positions
        model.fc.weight[0, :50] = 0  # 50 weights x 1 position
    dense = count_macs(model, torch.randn(1, 3, 9, 9), nonzero=False)
    sparse = count_macs(model, torch.randn(1, 3, 9, 9), nonzero=True)
    assert dense.total == 9000
    assert sparse.per_layer["conv"] == (216 - 27) * 25
    assert sparse.per_layer["depthwise"] == (72 - 4) * 25
    assert sparse.per_layer["fc"] == 1000 - 50
    assert sparse.per_layer["grouped"] == 400 and sparse.per_layer["bn"] == 200
    assert sparse.total == 9000 - 27 * 25 - 4 * 25 - 50
    assert count_parameters(model) == TINY_PARAMETERS
    assert count_parameters(model, nonzero=True) == TINY_PARAMETERS - 27 - 4 - 50


def test_linear_with_leading_dims_conv1d_and_transposed_conv():
    linear = nn.Linear(6, 4)
    assert count_macs(linear, torch.randn(2, 5, 6)).total == 2 * 5 * 4 * 6
    conv1d = nn.Conv1d(2, 4, 3)  # (1, 2, 10) -> (1, 4, 8): 32 outputs x 2*3
    assert count_macs(conv1d, torch.randn(1, 2, 10)).per_layer == {"(model)": 32 * 6}
    # Transposed: each of the 2*4*4 input elements is scattered through 3 * 3*3 weights.
    transposed = nn.ConvTranspose2d(2, 3, 3, stride=2)
    assert count_macs(transposed, torch.randn(1, 2, 4, 4)).total == 32 * 3 * 9


def test_macs_of_a_model_on_another_device_than_its_example():
    """A GPU model is often given CPU examples. The meta device stands in for the GPU here; it lets
    mixed devices pass, so where the inputs end up is checked directly (the GPU tests in
    tests/pruning cover the real failure)."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    expected = count_macs(model, torch.randn(1, 3, 8, 8)).total
    model.to("meta")
    assert count_macs(model, torch.randn(1, 3, 8, 8)).total == expected == 3 * 4 * 9 * 36 + 4 * 36 + 144 * 2
    assert inputs_on_model_device(model, torch.randn(1, 3, 8, 8))[0].device.type == "meta"
    assert inputs_on_model_device(nn.ReLU(), torch.randn(2))[0].device.type == "cpu"  # no parameters: unchanged


def test_parameter_count_counts_shared_parameters_once():
    model = tiny_net()
    assert count_parameters(model) == TINY_PARAMETERS
    tied = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False))
    tied[1].weight = tied[0].weight
    assert count_parameters(tied) == 16


def test_macs_restore_training_flags_and_run_in_eval_mode():
    model = tiny_net().train()
    model.bn.eval()  # a deliberately frozen BN must stay frozen, the rest in training
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(module.training))
    count_macs(model, torch.randn(1, 3, 9, 9))
    assert seen == [False]
    assert model.training and model.conv.training and not model.bn.training


def test_uncounted_modules_are_named():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    report = count_macs(model, torch.randn(2, 4))
    assert report.uncounted == ["1"] and report.total == 2 * 16


def test_model_summary_is_per_sample_with_layer_sparsity():
    model = tiny_net()
    with torch.no_grad():
        model.fc.weight[:, :25] = 0
    summary = model_summary(model, torch.randn(4, 3, 9, 9))
    assert summary["parameters"] == TINY_PARAMETERS
    assert summary["nonzero_parameters"] == TINY_PARAMETERS - 250
    assert summary["macs"] == 9000 and summary["macs_nonzero"] == 9000 - 250
    assert summary["macs_conv_linear"] == 8600 and summary["macs_conv_linear_nonzero"] == 8350
    assert set(summary["layers"]) == {"conv", "depthwise", "grouped", "fc"}
    assert summary["layers"]["fc"] == {"weights": 1000, "nonzero": 750, "sparsity": 0.25, "macs": 1000, "macs_nonzero": 750}
    assert summary["prunable_weights"] == 216 + 72 + 16 + 1000
    assert summary["sparsity"] == pytest.approx(250 / (216 + 72 + 16 + 1000))


class CallRecorder(nn.Module):
    """Identity that logs (name, batch size, training, inference mode) of every call."""

    def __init__(self, name: str, log: list, sleep_seconds: float = 0.0) -> None:
        super().__init__()
        self.name, self.log, self.sleep_seconds = name, log, sleep_seconds
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.log.append((self.name, x.shape[0], self.training, torch.is_inference_mode_enabled()))
        if self.sleep_seconds:
            time.sleep(self.sleep_seconds)
        return x * self.scale


def test_latency_runs_are_interleaved_and_modes_restored():
    log: list = []
    models = {name: CallRecorder(name, log) for name in "abc"}
    models["b"].eval()
    threads_before = torch.get_num_threads()
    report = measure_latency(models, (3,), batch_sizes=(1, 4), repeats=5, warmup=2, threads=1)
    assert torch.get_num_threads() == threads_before
    assert models["a"].training and not models["b"].training and models["c"].training
    assert all(not training and inference for _, _, training, inference in log)
    assert len(log) == 2 * (2 + 5) * 3
    for offset, batch_size in ((0, 1), (21, 4)):
        calls = log[offset:offset + 21]
        assert {size for _, size, _, _ in calls} == {batch_size}
        assert [name for name, *_ in calls[:6]] == list("abcabc")  # warm-up, in order
        rounds = [[name for name, *_ in calls[6 + 3 * r: 9 + 3 * r]] for r in range(5)]
        # Every round runs each model once, starting with a different model each time.
        assert rounds == [list("abc"), list("bca"), list("cab"), list("abc"), list("bca")]
    assert report.baseline == "a" and report.warmup == 2 and report.threads == 1
    assert [(r.model, r.batch_size) for r in report.results] == [(m, b) for b in (1, 4) for m in "abc"]
    for result in report.results:
        assert result.repeats == 5
        assert result.q25_ms <= result.median_ms <= result.q75_ms
        assert result.iqr_ms == pytest.approx(result.q75_ms - result.q25_ms)
        assert result.samples_per_second == pytest.approx(result.batch_size / result.median_ms * 1e3)
    assert report.get("a", 4).speedup == 1.0
    assert set(report.to_dict()) == {"baseline", "device", "threads", "warmup", "results", "channels_last", "compiled",
                                     "load_average"}
    before, after = report.load_average  # the machine's state while timing, to read the medians by
    assert before >= 0 and after >= 0


def test_latency_speedup_and_calibrated_repeats():
    log: list = []
    models = {"slow": CallRecorder("slow", log, 0.006), "fast": CallRecorder("fast", log, 0.002)}
    report = measure_latency(models, (2,), batch_sizes=(1,), warmup=1, target_seconds=0.15)
    fast = report.get("fast", 1)
    assert fast.median_ms >= 2.0
    assert 1.5 < fast.speedup < 6.0  # about 3 (6 ms / 2 ms), loosely: the machine is shared
    assert 5 <= fast.repeats <= 40  # ~0.15 s / 8 ms per round, at least min_repeats


def test_compare_latency_gives_one_record_per_model_after_pruning():
    from camphive.measure import compare_latency
    from camphive.measure.latency import latency_columns

    log: list = []
    models = {"dense": CallRecorder("dense", log, 0.004), "a": CallRecorder("a", log, 0.001),
              "b": CallRecorder("b", log)}
    records = compare_latency(models, (2,), batch_sizes=(1, 3), target_seconds=0.05, channels_last=False)
    assert list(records) == ["a", "b"]  # the first model is the baseline, timed with them in one interleaved run
    assert {name for name, *_ in log} == {"dense", "a", "b"}
    for record in records.values():
        assert set(record) == {"device", "threads", "channels_last", "compiled", "load_average", "batch_1", "batch_3"}
        assert record["device"] == "cpu" and record["channels_last"] is False and record["compiled"] is False
        for size in (1, 3):
            timing = record[f"batch_{size}"]
            assert set(timing) == {"before_ms", "after_ms", "before_iqr_ms", "after_iqr_ms", "speedup", "repeats"}
            assert timing["speedup"] == pytest.approx(timing["before_ms"] / timing["after_ms"])
    assert records["a"]["batch_1"]["before_ms"] == records["b"]["batch_1"]["before_ms"]  # one baseline for all
    assert records["a"]["batch_1"]["speedup"] > 1.5  # 4 ms against 1 ms, loosely: the machine is shared
    columns = latency_columns(records["a"], 3)
    assert columns == {"latency_batch": 3, "latency_before_ms": records["a"]["batch_3"]["before_ms"],
                       "latency_after_ms": records["a"]["batch_3"]["after_ms"],
                       "latency_before_iqr_ms": records["a"]["batch_3"]["before_iqr_ms"],
                       "latency_after_iqr_ms": records["a"]["batch_3"]["after_iqr_ms"],
                       "speedup": records["a"]["batch_3"]["speedup"]}
    assert set(latency_columns(None, 1).values()) == {None}
    with pytest.raises(ConfigError, match="needs the model before pruning and at least one after"):
        compare_latency({"dense": models["dense"]}, (2,))


class LayoutRecorder(nn.Module):
    """A conv that records whether its input and weight were NHWC (channels_last) when called."""

    def __init__(self, seen: list):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.record = lambda item: seen.append(item)  # a function: deep copies share it

    def forward(self, x):
        nhwc = torch.channels_last
        self.record((x.is_contiguous(memory_format=nhwc), self.conv.weight.is_contiguous(memory_format=nhwc)))
        return self.conv(x)


def test_latency_channels_last_times_nhwc_copies_and_leaves_models_alone():
    seen: list = []
    model = LayoutRecorder(seen)
    weight_before = model.conv.weight.detach().clone()
    report = measure_latency({"m": model}, (3, 8, 8), batch_sizes=(2,), repeats=3, warmup=1, channels_last=True)
    assert report.channels_last and len(seen) == 4
    assert all(x_nhwc and w_nhwc for x_nhwc, w_nhwc in seen)  # a 2x3x8x8 NCHW tensor is not NHWC-contiguous
    assert not model.conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(model.conv.weight, weight_before)
    seen.clear()
    measure_latency({"m": model}, (3, 8, 8), batch_sizes=(2,), repeats=3, warmup=1)
    assert not any(x_nhwc or w_nhwc for x_nhwc, w_nhwc in seen)
    with pytest.raises(ConfigError, match="channels_last"):
        measure_latency(nn.Linear(3, 3), (3,), channels_last=True)


def test_latency_compiled_times_compiled_copies_after_two_warmups(monkeypatch):
    compiled_calls: list = []

    def fake_compile(function, dynamic=None):  # records what would be compiled; runs it eagerly
        compiled_calls.append((function, dynamic))
        return lambda batch: ("compiled", function(batch))

    monkeypatch.setattr(torch, "compile", fake_compile)
    log: list = []
    models = {name: CallRecorder(name, log) for name in "ab"}
    report = measure_latency(models, (3,), batch_sizes=(1, 4), repeats=3, warmup=0, compiled=True)
    assert report.compiled and report.warmup == 2  # the first warm-up round compiles: never timed
    assert [dynamic for _, dynamic in compiled_calls] == [False, False]
    codes = [function.__code__ for function, _ in compiled_calls]
    assert codes[0] is not codes[1]  # one compile cache per model, not one per model class
    assert len(log) == 2 * (2 + 3) * 2
    assert [name for name, *_ in log[:4]] == list("abab")  # each compiled function runs its own model


def test_latency_compiled_errors_are_one_line(monkeypatch):
    def broken_compile(model, dynamic=None):
        def run(batch):
            raise RuntimeError("InductorError: CppCompileError: C++ compile error\n  long details")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    with pytest.raises(ConfigError, match="torch.compile failed for model 'net'") as caught:
        measure_latency({"net": nn.Linear(3, 3)}, (3,), batch_sizes=(1,), repeats=1, compiled=True)
    assert "\n" not in str(caught.value) and "compiled=True" in str(caught.value)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # raised inside torch.compile itself
def test_latency_compiled_runs_a_real_compiled_model():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    report = measure_latency({"mlp": model}, (3,), batch_sizes=(2,), repeats=3, compiled=True, threads=1)
    assert report.get("mlp", 2).median_ms > 0 and report.get("mlp", 2).repeats == 3
    assert type(model) is nn.Sequential  # the model passed in is not replaced or wrapped


def test_latency_rejects_bad_arguments():
    with pytest.raises(ConfigError):
        measure_latency({}, (3,))
    with pytest.raises(ConfigError):
        measure_latency(nn.Linear(3, 3), (3,), batch_sizes=(0,))
    with pytest.raises(ConfigError):
        measure_latency(nn.Linear(3, 3), (3,), repeats=0)


def test_onnx_latency_times_exported_files_interleaved(tmp_path):
    from camphive.export import export_onnx
    from camphive.measure import measure_onnx_latency

    torch.manual_seed(0)
    small, large = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), nn.Sequential(nn.Conv2d(3, 64, 3), nn.ReLU(),
                                                                                 nn.Conv2d(64, 64, 3))
    files = {}
    for name, model in (("large", large), ("small", small)):
        files[name] = tmp_path / f"{name}.onnx"
        export_onnx(model, files[name], torch.randn(1, 3, 16, 16))
    report = measure_onnx_latency(files, (3, 16, 16), batch_sizes=(1, 8), repeats=5, warmup=1)
    assert report.baseline == "large" and report.device == "cpu (onnxruntime)" and report.threads == 1
    assert [(r.model, r.batch_size, r.repeats) for r in report.results] == [
        (m, b, 5) for b in (1, 8) for m in ("large", "small")]
    assert report.get("large", 8).speedup == 1.0
    assert report.get("small", 8).speedup > 2.0  # ~100x fewer MACs; loosely, the machine is shared
    with pytest.raises(ConfigError, match="does not exist"):
        measure_onnx_latency({"gone": tmp_path / "gone.onnx"}, (3, 16, 16))
    with pytest.raises(ConfigError, match="batch sizes"):
        measure_onnx_latency(files, (3, 16, 16), batch_sizes=(0,))
    with pytest.raises(ConfigError, match=r"not \(batch, 3, 32\)"):
        measure_onnx_latency(files, (3, 32))
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not an onnx file")
    with pytest.raises(ConfigError, match="cannot load"):
        measure_onnx_latency({"broken": broken}, (3, 16, 16))
