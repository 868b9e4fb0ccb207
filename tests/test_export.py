"""ONNX export checked by onnxruntime; Conv-BN folding exact in eval mode."""
from __future__ import annotations

import onnxruntime
import pytest
import torch
from torch import nn

import camphive.export as export_module
from camphive import models
from camphive.checkpoints import save_checkpoint
from camphive.conv_batchnorm import conv_batchnorm_pairs
from camphive.errors import CamphiveError, ConfigError
from camphive.export import ExampleInputsError, export_onnx, fold_batchnorm
from camphive.jobs.export import export_job


@pytest.fixture(autouse=True)
def one_thread():
    # The test machine is shared: several intra-op threads on busy cores are far slower.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


class ResidualNet(nn.Module):
    """Conv-BN pairs (plain, grouped, depthwise), a residual sum, and one conv whose
    output feeds both a BN and the sum (so that pair must not be folded)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=4)  # grouped, with bias
        self.bn2 = nn.BatchNorm2d(8)
        self.depthwise = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8, bias=False)
        self.bn3 = nn.BatchNorm2d(8)
        self.conv4 = nn.Conv2d(8, 8, 1)
        self.bn4 = nn.BatchNorm2d(8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)) + x)
        x = self.bn3(self.depthwise(x))
        y = self.conv4(x)
        x = self.bn4(y) + y
        return self.fc(self.flatten(self.pool(x)))


def randomize_batchnorms(model: nn.Module) -> nn.Module:
    """Non-trivial running statistics and affine parameters, so folding is really tested."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                if module.track_running_stats:
                    module.running_mean.normal_(0, 0.5)
                    module.running_var.uniform_(0.3, 3.0)
                if module.affine:
                    module.weight.normal_(1, 0.5)
                    module.bias.normal_(0, 0.5)
    return model


def residual_net() -> ResidualNet:
    torch.manual_seed(0)
    return randomize_batchnorms(ResidualNet())


def test_pairs_follow_the_data_flow():
    assert conv_batchnorm_pairs(residual_net()) == [("conv1", "bn1"), ("conv2", "bn2"), ("depthwise", "bn3")]


def test_fold_batchnorm_is_exact_in_eval_mode_and_leaves_the_input_model_alone():
    model = residual_net().train()
    weight_before = model.conv1.weight.detach().clone()
    folded = fold_batchnorm(model)
    assert model.training and isinstance(model.bn1, nn.BatchNorm2d)
    assert torch.equal(model.conv1.weight, weight_before)
    assert not folded.training
    assert all(isinstance(getattr(folded, name), nn.Identity) for name in ("bn1", "bn2", "bn3"))
    assert isinstance(folded.bn4, nn.BatchNorm2d)  # its conv output also feeds the sum
    assert folded.conv1.bias is not None
    x = torch.randn(4, 3, 12, 12)
    with torch.no_grad():
        expected = model.eval()(x)
        assert torch.allclose(folded(x), expected, atol=1e-5, rtol=0)
        # In float64 the fold is exact up to rounding (a wrong eps would show here).
        model64 = model.double()
        assert torch.allclose(fold_batchnorm(model64)(x.double()), model64(x.double()), atol=1e-12, rtol=0)


def test_fold_conv1d_and_skip_batchnorm_without_running_stats():
    torch.manual_seed(1)
    model = randomize_batchnorms(nn.Sequential(
        nn.Conv1d(2, 6, 3, groups=2), nn.BatchNorm1d(6), nn.ReLU(),
        nn.Conv1d(6, 6, 1), nn.BatchNorm1d(6, track_running_stats=False),
    ))
    folded = fold_batchnorm(model)
    assert isinstance(folded[1], nn.Identity) and isinstance(folded[4], nn.BatchNorm1d)
    x = torch.randn(5, 2, 9)
    with torch.no_grad():
        assert torch.allclose(folded(x), model.eval()(x), atol=1e-5, rtol=0)


class WeightReader(nn.Module):
    """The forward reads conv.weight itself, so folding the conv would change that use."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1)
        self.bn = nn.BatchNorm2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)) + self.conv.weight.sum()


def test_no_pair_when_the_forward_reads_the_conv_weight_directly():
    assert conv_batchnorm_pairs(WeightReader()) == []


class UntraceableNet(nn.Module):
    """Data-dependent control flow defeats torch.fx: only the Sequential pair is folded."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        self.conv = nn.Conv2d(4, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block(x)
        y = self.conv(x)
        return self.bn(y) + y if x.sum() > 0 else self.bn(y)


def test_fold_falls_back_to_sequential_pairs_when_tracing_fails():
    torch.manual_seed(2)
    model = randomize_batchnorms(UntraceableNet())
    assert conv_batchnorm_pairs(model) == [("block.0", "block.1")]
    folded = fold_batchnorm(model)
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        assert torch.allclose(folded(x), model.eval()(x), atol=1e-5, rtol=0)


def test_export_round_trip_with_dynamic_batch(tmp_path):
    model = residual_net().train()
    path = tmp_path / "nested" / "model.onnx"
    result = export_onnx(model, path, torch.randn(2, 3, 12, 12))
    assert model.training and model.bn1.training
    assert path.is_file() and result.file_size_bytes == path.stat().st_size
    assert result.max_abs_diff is not None and result.max_abs_diff <= 1e-4
    assert result.checked_batch_sizes == [2, 3]
    assert result.onnxruntime_version == onnxruntime.__version__
    assert result.to_dict()["input_names"] == ["input"]
    assert [p.name for p in tmp_path.joinpath("nested").iterdir()] == ["model.onnx"]  # no temporary left
    # Our own check at a third batch size: the batch dimension is really dynamic.
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(5, 3, 12, 12)
    (onnx_output,) = session.run(None, {"input": x.numpy()})
    with torch.no_grad():
        expected = model.eval()(x)
    assert torch.allclose(torch.from_numpy(onnx_output), expected, atol=1e-4, rtol=0)


def test_export_folded_fixed_batch_with_two_outputs(tmp_path):
    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = residual_net()

        def forward(self, x):
            logits = self.body(x)
            return logits, logits.softmax(dim=1)

    result = export_onnx(TwoHeads(), tmp_path / "two.onnx", torch.randn(1, 3, 12, 12), fold_batchnorm=True, dynamic_batch=False)
    assert result.folded_pairs == 3 and result.checked_batch_sizes == [1]
    assert result.output_names == ["output_0", "output_1"] and result.max_abs_diff <= 1e-4
    session = onnxruntime.InferenceSession(result.path, providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == [1, 3, 12, 12]


def test_mismatch_raises_one_line_and_keeps_no_file(tmp_path, monkeypatch):
    class OffByOneSession(onnxruntime.InferenceSession):
        def run(self, *args, **kwargs):
            return [output + 1.0 for output in super().run(*args, **kwargs)]

    monkeypatch.setattr(onnxruntime, "InferenceSession", OffByOneSession)
    path = tmp_path / "model.onnx"
    path.write_bytes(b"previous export")
    with pytest.raises(CamphiveError, match=r"differs from torch by 1") as error:
        export_onnx(residual_net(), path, torch.randn(2, 3, 12, 12))
    assert "\n" not in str(error.value)
    assert path.read_bytes() == b"previous export"  # the old file is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


def test_failed_check_leaves_no_file_at_target(tmp_path, monkeypatch):
    def failing_check(*args, **kwargs):
        raise CamphiveError("forced failure")

    monkeypatch.setattr(export_module, "_check_with_onnxruntime", failing_check)
    with pytest.raises(CamphiveError, match="forced failure"):
        export_onnx(residual_net(), tmp_path / "model.onnx", torch.randn(1, 3, 12, 12))
    assert list(tmp_path.iterdir()) == []


def test_unwritable_path_and_exporter_failure_are_one_line_errors(tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(CamphiveError, match="cannot write ONNX file") as error:
        export_onnx(nn.Linear(3, 2), blocker / "model.onnx", torch.randn(1, 3))
    assert "\n" not in str(error.value)
    with pytest.raises(CamphiveError, match="is a directory"):
        export_onnx(nn.Linear(3, 2), tmp_path, torch.randn(1, 3))

    def broken_exporter(*args, **kwargs):
        raise RuntimeError("Unsupported: ONNX export of operator foo\nsecond line")

    monkeypatch.setattr(torch.onnx, "export", broken_exporter)
    with pytest.raises(CamphiveError, match="ONNX export .* failed: RuntimeError: Unsupported") as error:
        export_onnx(nn.Linear(3, 2), tmp_path / "linear.onnx", torch.randn(1, 3))
    assert "\n" not in str(error.value)
    assert [p.name for p in tmp_path.iterdir()] == ["a_file"]


def test_export_without_check_reports_no_difference(tmp_path):
    result = export_onnx(nn.Linear(3, 2), tmp_path / "linear.onnx", torch.randn(4, 3), check=False)
    assert result.max_abs_diff is None and result.onnxruntime_version is None
    assert result.checked_batch_sizes == [] and (tmp_path / "linear.onnx").stat().st_size == result.file_size_bytes


class ShapeReadingPool(nn.Module):
    """A custom layer whose forward reads its input's shape as ints (symbolic tracing cannot)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height = int(x.shape[-2])
        return x[..., : height // 2, :].mean((-2, -1))


class ResidualNetWithCustomPool(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.conv2, self.bn2 = nn.Conv2d(6, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.pool = ShapeReadingPool()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        return self.pool(torch.relu(self.bn2(self.conv2(x)) + x))


def test_a_custom_layer_that_reads_shapes_does_not_stop_folding():
    torch.manual_seed(3)
    net = randomize_batchnorms(ResidualNetWithCustomPool())
    assert conv_batchnorm_pairs(net) == [("conv1", "bn1"), ("conv2", "bn2")]
    folded = fold_batchnorm(net)
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(folded(x), net.eval()(x), atol=1e-5, rtol=0)


def test_small_cnn_folds_all_three_batchnorms():
    from camphive import models

    torch.manual_seed(4)
    model = randomize_batchnorms(models.create("small-cnn", num_classes=10, in_channels=1))
    assert conv_batchnorm_pairs(model) == [("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")]
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(fold_batchnorm(model)(x), model.eval()(x), atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- inputs that do not fit


def test_example_inputs_the_model_cannot_take_are_a_one_line_config_error_before_any_file(tmp_path):
    path = tmp_path / "nested" / "model.onnx"
    with pytest.raises(ConfigError, match=r"cannot run on inputs of shape \(1, 1, 8, 8\) float32 .*3 channels") as error:
        export_onnx(nn.Conv2d(3, 4, 3), path, torch.randn(1, 1, 8, 8))
    assert isinstance(error.value, ExampleInputsError) and error.value.shapes == [(1, 1, 8, 8)]
    assert "\n" not in str(error.value)
    assert list(tmp_path.iterdir()) == []  # neither the file nor its folder was created
    kept = tmp_path / "kept.onnx"
    kept.write_bytes(b"previous export")
    with pytest.raises(ConfigError, match="shape and dtype"):
        export_onnx(nn.Linear(3, 2), kept, torch.randn(1, 5))
    assert kept.read_bytes() == b"previous export"


class FixedBatch(nn.Module):
    """Runs only on a batch of one: the forward flattens the batch away."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.reshape(1, -1))


def test_a_model_with_a_fixed_batch_size_is_told_to_export_without_dynamic_batch(tmp_path):
    with pytest.raises(ExampleInputsError, match=r"shape \(2, 3\).*dynamic_batch=False"):
        export_onnx(FixedBatch(), tmp_path / "fixed.onnx", torch.randn(1, 3))
    assert list(tmp_path.iterdir()) == []  # the temporary file is gone too
    result = export_onnx(FixedBatch(), tmp_path / "fixed.onnx", torch.randn(1, 3), dynamic_batch=False)
    assert result.checked_batch_sizes == [1]


@pytest.fixture
def rgb_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = models.create("small-cnn", num_classes=10, in_channels=3)
    return save_checkpoint(tmp_path / "model.safetensors", model, input_shape=[3, 32, 32])


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32)])
def test_export_job_names_the_shape_given_and_the_recorded_one(rgb_checkpoint, tmp_path, shape):
    target = tmp_path / "out" / "shape.onnx"
    given = ",".join(map(str, shape))
    with pytest.raises(ConfigError, match=rf"--input-shape {given} does not fit .*pass --input-shape 3,32,32 \(recorded") as error:
        export_job(checkpoint=rgb_checkpoint, onnx=target, input_shape=shape)
    assert "\n" not in str(error.value)
    assert not target.parent.exists()


def test_export_job_refuses_sizes_below_one_and_names_a_recorded_shape_it_cannot_run(tmp_path):
    model = models.create("small-cnn", num_classes=10, in_channels=3)
    wrong = save_checkpoint(tmp_path / "wrong.safetensors", model, input_shape=[1, 28, 28])
    with pytest.raises(ConfigError, match=r"--input-shape 0,32,32 has a size below 1"):
        export_job(checkpoint=wrong, onnx=tmp_path / "zero.onnx", input_shape=(0, 32, 32))
    with pytest.raises(ConfigError, match=r"records input shape 1,28,28, which its model does not accept"):
        export_job(checkpoint=wrong, onnx=tmp_path / "recorded.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wrong.safetensors"]
