"""LayerTimer: rebuilt layers match the originals' shapes; shapes are timed once; the child process runs."""
import json
import subprocess

import pytest
import torch
from torch import nn

import camphive.measure.layer_timing as layer_timing
from camphive.measure.layer_timing import LayerTimer, build_layer


class Mixed(nn.Module):
    """A conv stack with a strided conv, a depthwise conv, a 1-d conv and a linear after a flatten."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.twin = nn.Conv2d(16, 16, 3, padding=1, groups=16)  # the same shape as depthwise: timed once
        self.line = nn.Conv1d(16, 8, 5, padding="same")
        self.fc = nn.Linear(8 * 64, 10)

    def forward(self, x):
        x = self.twin(self.depthwise(self.bn(self.conv(x))))
        x = self.line(x.flatten(2)[:, :, :64])
        return self.fc(x.flatten(1))


def test_rebuilt_layers_take_the_inputs_and_give_the_outputs_of_the_originals():
    model = Mixed().eval()
    example = torch.randn(1, 3, 16, 16)
    timer = LayerTimer(model, (example,), batch_size=2, isolate=False)
    outputs = {}

    def record(name):
        def hook(module, args, output):
            outputs[name] = output.shape
        return hook
    hooks = [module.register_forward_hook(record(name)) for name, module in model.named_modules() if name]
    model(example)
    for hook in hooks:
        hook.remove()
    generator = torch.Generator().manual_seed(0)
    counts = {"conv": (3, 16), "bn": (16, 16), "depthwise": (16, 16), "twin": (16, 16), "line": (16, 8), "fc": (512, 10)}
    assert set(timer.specs) == set(counts)
    for name, spec in timer.specs.items():
        layer, batch = build_layer(spec.recipe(*counts[name], 2), generator)
        assert layer(batch).shape == (2, *outputs[name][1:]), name
    narrow, batch = build_layer(timer.specs["depthwise"].recipe(8, 8, 3), generator)
    assert narrow.groups == 8 and narrow(batch).shape == (3, 8, 8, 8)  # a depthwise conv stays depthwise
    assert timer.specs["conv"].macs(3, 16) == pytest.approx(16 * 3 * 9 * 8 * 8)  # 8x8 outputs of a stride-2 conv
    assert timer.specs["depthwise"].macs(8, 8) == pytest.approx(8 * 9 * 8 * 8)  # one 3x3 filter per channel
    assert timer.specs["line"].macs(16, 8) == pytest.approx(8 * 16 * 5 * 64)  # padding="same": 64 outputs


def test_each_distinct_shape_is_timed_once_and_calls_are_capped_in_size():
    model = Mixed().eval()
    timer = LayerTimer(model, (torch.randn(1, 3, 16, 16),), batch_size=64, seconds=0.01, min_repeats=2,
                       max_macs_per_call=16 * 9 * 64 * 10, isolate=False)  # ten samples of the depthwise conv
    assert timer.batch_for("depthwise") == 10 and timer.batch_for("fc") == 18 and timer.batch_for("conv") == 3
    assert timer.batch_for("bn") == 64
    by_bytes = LayerTimer(model, (torch.randn(1, 3, 16, 16),), batch_size=64, max_bytes_per_call=5 * 4 * 64 * 32,
                          isolate=False)  # five samples of the depthwise conv's 16 + 16 channels at 8x8, float32
    assert by_bytes.batch_for("depthwise") == 5 and by_bytes.batch_for("fc") == 19  # 4 * (512 + 10) bytes each
    timer.measure([("depthwise", 16, 16), ("twin", 16, 16), ("depthwise", 8, 8), ("bn", 16, 16), ("fc", 512, 10)])
    assert timer.timed_shapes == 4 and len(timer.table) == 4
    assert timer.seconds("depthwise", 16, 16) == timer.seconds("twin", 16, 16) > 0
    timer.measure([("twin", 8, 8)])  # already in the table: nothing is timed
    assert timer.timed_shapes == 4
    with pytest.raises(KeyError):
        timer.seconds("line", 16, 8)  # never measured


def test_the_child_process_times_the_shapes_and_a_failed_child_falls_back_to_this_process(monkeypatch, caplog):
    model = Mixed().eval()
    example = (torch.randn(1, 3, 16, 16),)
    isolated = LayerTimer(model, example, batch_size=4, seconds=0.01, min_repeats=2)
    assert isolated.isolate
    isolated.measure([("conv", 3, 16), ("conv", 3, 8)])
    assert isolated.seconds("conv", 3, 16) > 0 and isolated.seconds("conv", 3, 8) > 0

    def failing(*args, **kwargs):
        return subprocess.CompletedProcess(args, 1, "", "Traceback...\nRuntimeError: no child today\n")
    monkeypatch.setattr(layer_timing.subprocess, "run", failing)
    fallback = LayerTimer(model, example, batch_size=4, seconds=0.01, min_repeats=2)
    with caplog.at_level("WARNING", logger="camphive.measure"):
        fallback.measure([("conv", 3, 16)])
    assert fallback.seconds("conv", 3, 16) > 0 and "no child today" in caplog.text


def test_the_child_gets_this_process_threads_and_layout_and_its_answer_fills_the_table(monkeypatch):
    model = Mixed().eval()
    sent = {}

    def child(command, input, **kwargs):
        sent.update(json.loads(input))
        return subprocess.CompletedProcess(command, 0, json.dumps([1e-3 * (i + 1) for i in range(len(sent["recipes"]))]),
                                           "")
    monkeypatch.setattr(layer_timing.subprocess, "run", child)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        timer = LayerTimer(model, (torch.randn(1, 3, 16, 16),), batch_size=8, channels_last=True)
        timer.measure([("conv", 3, 16), ("bn", 16, 16)])
    finally:
        torch.set_num_threads(previous)
    assert sent["threads"] == 1 and sent["channels_last"] is True and len(sent["recipes"]) == 2
    assert timer.seconds("conv", 3, 16) == pytest.approx(1e-3) and timer.seconds("bn", 16, 16) == pytest.approx(2e-3)
    reloaded = LayerTimer(model, (torch.randn(1, 3, 16, 16),), batch_size=8)
    reloaded.load_timings(json.loads(json.dumps(timer.timings())))  # through JSON, as a resume state is stored
    assert reloaded.seconds("conv", 3, 16) == pytest.approx(1e-3)


def test_onnxruntime_times_exported_layers_and_counts_a_batchnorm_as_folded(monkeypatch):
    model = Mixed().eval()
    exported = []
    original_export = torch.onnx.export

    def recording_export(layer, args, *rest, **kwargs):
        exported.append(type(layer).__name__)
        return original_export(layer, args, *rest, **kwargs)
    monkeypatch.setattr(torch.onnx, "export", recording_export)
    timer = LayerTimer(model, (torch.randn(1, 3, 16, 16),), batch_size=4, seconds=0.01, min_repeats=2,
                       runtime="onnxruntime", isolate=False)
    timer.measure([("conv", 3, 16), ("conv", 3, 8), ("bn", 16, 16), ("fc", 512, 10)])
    assert exported == ["Conv2d", "Conv2d", "Linear"]  # the norm is not exported: onnxruntime folds it
    assert timer.seconds("conv", 3, 16) > 0 and timer.seconds("fc", 512, 10) > 0
    assert timer.seconds("bn", 16, 16) == 0.0
    stored = json.loads(json.dumps(timer.timings()))
    assert stored["runtime"] == "onnxruntime"
    in_torch = LayerTimer(model, (torch.randn(1, 3, 16, 16),), batch_size=4, isolate=False)
    in_torch.load_timings(stored)  # timed in another runtime: not taken over
    assert not in_torch.table
    again = LayerTimer(model, (torch.randn(1, 3, 16, 16),), batch_size=4, runtime="onnxruntime", isolate=False)
    again.load_timings(stored)
    assert again.seconds("conv", 3, 16) == timer.seconds("conv", 3, 16)
    with pytest.raises(ValueError, match="runtime must be one of torch, onnxruntime"):
        LayerTimer(model, (torch.randn(1, 3, 16, 16),), runtime="tvm")


def test_a_layer_onnxruntime_cannot_run_is_timed_in_pytorch_with_a_warning(monkeypatch, caplog):
    def failing(layer, batch, threads):
        raise RuntimeError("Exporting the operator 'aten::circular_pad' is not supported")
    monkeypatch.setattr(layer_timing, "_onnx_runner", failing)
    timer = LayerTimer(Mixed().eval(), (torch.randn(1, 3, 16, 16),), batch_size=4, seconds=0.01, min_repeats=2,
                       runtime="onnxruntime", isolate=False)
    with caplog.at_level("WARNING", logger="camphive.measure"):
        timer.measure([("conv", 3, 16), ("bn", 16, 16)])
    assert timer.seconds("conv", 3, 16) > 0 and timer.seconds("bn", 16, 16) == 0.0
    assert "cannot run in onnxruntime" in caplog.text and "circular_pad" in caplog.text
