"""Sparse files: exact float32 round trips, half-precision values, never larger than the dense
checkpoint, and one-line refusals of other models and of damaged or foreign files."""
from __future__ import annotations

import io
import json

import pytest
import torch
from safetensors.torch import save as save_safetensors
from torch import nn

from camphive import load_sparse, models, save_sparse
from camphive.checkpoints import load_checkpoint, save_checkpoint
from camphive.errors import CheckpointError, ConfigError
from camphive.sparse_format import FORMAT, dense_checkpoint_bytes, read_sparse, sparse_file_bytes


@pytest.fixture(autouse=True)
def one_thread():
    # The test machine is shared: several intra-op threads on busy cores are far slower.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


class TinyNet(nn.Module):
    """Conv-BN-ReLU, a conv with bias and a linear: weights, biases, BatchNorm buffers."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        return self.fc(torch.relu(self.conv2(x)).flatten(1))


def pruned(model: nn.Module, sparsity: float, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random masks at ``sparsity`` on every weight of 2+ dims, applied as camphive does (so -0.0 appears)."""
    generator = torch.Generator().manual_seed(seed)
    masks = {}
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() >= 2:
                masks[name] = torch.rand(parameter.shape, generator=generator) >= sparsity
                parameter.mul_(masks[name])
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.5, generator=generator)
                module.running_var.uniform_(0.5, 2.0, generator=generator)
                module.weight.normal_(1, 0.2, generator=generator)
    return masks


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view(torch.int32) if tensor.dtype == torch.float32 else tensor


def test_float32_round_trip_is_bit_identical_with_the_same_outputs(tmp_path):
    torch.manual_seed(0)
    model = TinyNet()
    masks = pruned(model, 0.8)
    written = save_sparse(model, tmp_path / "m.sparse.safetensors", masks=masks)
    assert written.sparse_tensors == 3 and written.path.is_file()
    torch.manual_seed(1)
    loaded = load_sparse(tmp_path / "m.sparse.safetensors", model=TinyNet())
    original = model.state_dict()
    for name, value in loaded.model.state_dict().items():
        assert value.dtype == original[name].dtype, name
        if name in masks:  # kept entries bit for bit; pruned ones +0.0 (a -0.0 from masking compares equal)
            assert torch.equal(bits(value)[masks[name]], bits(original[name])[masks[name]]), name
            assert torch.equal(value[~masks[name]], torch.zeros(int((~masks[name]).sum()))), name
        else:
            assert torch.equal(bits(value), bits(original[name])), name
    assert sorted(loaded.masks) == sorted(masks)
    assert all(torch.equal(loaded.masks[name], masks[name]) for name in masks)
    inputs = torch.randn(4, 3, 8, 8)
    assert torch.equal(loaded.model.eval()(inputs), model.eval()(inputs))


def test_masks_from_zeros_a_file_object_and_a_model_built_from_its_record(tmp_path):
    torch.manual_seed(0)
    model = models.create("small-cnn", num_classes=10, in_channels=1)
    pruned(model, 0.9)
    save_sparse(model, tmp_path / "m.sparse.safetensors", metadata={"dataset": "fashion-mnist"})
    with open(tmp_path / "m.sparse.safetensors", "rb") as file:
        loaded = load_sparse(file)  # no model: built from the architecture the file records
    assert loaded.metadata["dataset"] == "fashion-mnist" and loaded.metadata["arch"]["name"] == "small-cnn"
    weights = {name for name, parameter in model.named_parameters() if parameter.dim() >= 2}
    assert sorted(loaded.masks) == sorted(weights)
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], value), name
        if name in weights:
            assert torch.equal(loaded.masks[name], value != 0), name
    inputs = torch.randn(2, 1, 28, 28)
    assert torch.equal(loaded.model.eval()(inputs), model.eval()(inputs))
    state, masks, _ = read_sparse(io.BytesIO((tmp_path / "m.sparse.safetensors").read_bytes()))
    assert sorted(state) == sorted(model.state_dict()) and sorted(masks) == sorted(weights)


@pytest.mark.parametrize("dtype, relative", [("float16", 2 ** -11), ("bfloat16", 2 ** -8)])
def test_half_precision_values_are_the_rounded_weights_and_everything_else_is_exact(tmp_path, dtype, relative):
    torch.manual_seed(0)
    model = TinyNet()
    masks = pruned(model, 0.8)
    exact = save_sparse(model, tmp_path / "exact.safetensors", masks=masks)
    half = save_sparse(model, tmp_path / "half.safetensors", masks=masks, dtype=dtype)
    assert half.file_bytes < exact.file_bytes and half.values_dtype == dtype
    loaded = load_sparse(tmp_path / "half.safetensors", model=TinyNet()).model.state_dict()
    for name, value in model.state_dict().items():
        assert loaded[name].dtype == value.dtype, name
        if name in masks:  # each weight rounded to the nearest half-precision value; pruned entries exactly 0
            assert torch.equal(loaded[name], value.to(getattr(torch, dtype)).float()), name
            normal = value.abs() > 1e-4  # beyond float16's subnormals, within half a unit in the last place
            assert torch.all((loaded[name] - value)[normal].abs() <= value[normal].abs() * relative), name
            assert torch.equal(loaded[name][~masks[name]], torch.zeros(int((~masks[name]).sum()))), name
        else:
            assert torch.equal(loaded[name], value), name


def magnitude_pruned(model: nn.Module, sparsity: float) -> dict[str, torch.Tensor]:
    """Global magnitude pruning of every weight of 2+ dims to ``sparsity``, applied."""
    weights = {name: parameter for name, parameter in model.named_parameters() if parameter.dim() >= 2}
    magnitudes = torch.cat([parameter.detach().abs().flatten() for parameter in weights.values()])
    threshold = magnitudes.kthvalue(int(sparsity * magnitudes.numel())).values
    masks = {name: parameter.detach().abs() > threshold for name, parameter in weights.items()}
    with torch.no_grad():
        for name, parameter in weights.items():
            parameter.mul_(masks[name])
    return masks


@pytest.mark.parametrize("case", ["dense, no masks", "dense, masks all True", "95 %", "one tensor", "1 % and 90 %"])
def test_file_is_never_larger_than_the_dense_checkpoint(tmp_path, case):
    torch.manual_seed(0)
    masks = None
    if case == "one tensor":
        model = nn.Linear(3, 2, bias=False)
    else:
        model = models.create("small-cnn", num_classes=10, in_channels=1)
    if case == "dense, masks all True":
        masks = {name: torch.ones_like(parameter, dtype=torch.bool)
                 for name, parameter in model.named_parameters() if parameter.dim() >= 2}
    if case == "95 %":
        masks = magnitude_pruned(model, 0.95)
    if case == "1 % and 90 %":
        with torch.no_grad():
            model.conv2.weight.view(-1)[: model.conv2.weight.numel() // 100] = 0.0  # too few zeros to pay
            model.fc1.weight.view(-1)[: model.fc1.weight.numel() * 9 // 10] = 0.0
    metadata = {"dataset": "fashion-mnist", "input_shape": [1, 28, 28]}
    dense = save_checkpoint(tmp_path / "dense.safetensors", model, **metadata)
    for dtype in ("float32", "float16", "bfloat16"):
        written = save_sparse(model, tmp_path / f"{dtype}.safetensors", masks=masks, dtype=dtype, metadata=metadata)
        assert written.dense_bytes == dense.stat().st_size == dense_checkpoint_bytes(model, metadata)
        assert written.file_bytes == written.path.stat().st_size <= written.dense_bytes, (dtype, written)
        plain = save_sparse(model, tmp_path / f"{dtype}-plain.safetensors", masks=masks, dtype=dtype)
        assert sparse_file_bytes(model, masks=masks, dtype=dtype) == plain.file_bytes  # the size, nothing written
    if case == "95 %":  # the goals: 1/8 of the dense file with float32 values, 1/12 with float16
        assert save_sparse(model, tmp_path / "a", masks=masks).ratio <= 1 / 8
        assert save_sparse(model, tmp_path / "b", masks=masks, dtype="float16").ratio <= 1 / 12
    if case == "1 % and 90 %":
        stored = load_sparse(tmp_path / "float32.safetensors", model=models.create("small-cnn", in_channels=1))
        assert "fc1.weight" in stored.masks and "conv2.weight" not in stored.masks
        assert all(torch.equal(value, model.state_dict()[name]) for name, value in stored.model.state_dict().items())


def one_line_error(error_info) -> str:
    message = str(error_info.value)
    assert "\n" not in message
    return message


def test_another_architecture_is_refused_naming_the_difference(tmp_path):
    path = tmp_path / "m.safetensors"
    save_sparse(TinyNet(), path)
    with pytest.raises(CheckpointError) as error:
        load_sparse(path, model=TinyNet(width=4))
    message = one_line_error(error)
    assert "conv1.weight has shape [8, 3, 3, 3] in the file and [4, 3, 3, 3] in the model" in message
    assert "and 5 more differences" in message  # bn1's weight, bias, mean, variance and conv2.weight

    class Wider(TinyNet):
        def __init__(self) -> None:
            super().__init__()
            self.extra = nn.Linear(2, 2)

    with pytest.raises(CheckpointError) as error:
        load_sparse(path, model=Wider())
    assert "the model's extra.weight is not in the file" in one_line_error(error)


def test_truncated_corrupt_and_foreign_files_are_refused_in_one_line(tmp_path):
    torch.manual_seed(0)
    model = TinyNet()
    masks = pruned(model, 0.8)
    data = save_sparse(model, tmp_path / "m.safetensors", masks=masks).path.read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    damaged = {"empty": b"", "header cut": data[: header_end // 2], "data cut": data[: header_end + 10],
               "one byte short": data[:-1], "random": bytes(range(256)) * 4}
    before = sorted(tmp_path.iterdir())
    for label, content in damaged.items():
        (tmp_path / "bad.safetensors").write_bytes(content)
        with pytest.raises(CheckpointError) as error:
            load_sparse(tmp_path / "bad.safetensors", model=TinyNet())
        assert "truncated or corrupt" in one_line_error(error), label
    assert sorted(tmp_path.iterdir()) == sorted([*before, tmp_path / "bad.safetensors"])  # nothing else written

    state = {name: value.clone() for name, value in model.state_dict().items()}
    foreign = {"plain state dict": save_safetensors(state), "other metadata": save_safetensors(state, {"x": "1"})}
    for label, content in foreign.items():
        with pytest.raises(CheckpointError) as error:
            load_sparse(io.BytesIO(content), model=TinyNet())
        assert "is not a camphive sparse file" in one_line_error(error), label
    save_checkpoint(tmp_path / "dense.safetensors", model, masks)
    with pytest.raises(CheckpointError) as error:
        load_sparse(tmp_path / "dense.safetensors")
    assert "is a dense camphive checkpoint" in one_line_error(error)
    with pytest.raises(CheckpointError) as error:
        load_sparse(tmp_path / "missing.safetensors")
    assert "does not exist" in one_line_error(error)


def test_a_header_that_disagrees_with_its_tensors_is_corrupt(tmp_path):
    torch.manual_seed(0)
    model = TinyNet()
    pruned(model, 0.8)
    stored = read_stored(save_sparse(model, tmp_path / "m.safetensors").path)
    tensors, metadata = stored
    cases = {
        "fingerprint": ({**metadata, "fingerprint": "0" * 16}, tensors),
        "record shape": ({**metadata, "tensors": {**metadata["tensors"],
                                                  "fc.weight": {"encoding": "bitmask", "shape": [10, 1023],
                                                                "dtype": "float32"}}}, tensors),
        "values missing": (metadata, {name: value for name, value in tensors.items() if name != "fc.weight:values"}),
        "values short": (metadata, {**tensors, "fc.weight:values": tensors["fc.weight:values"][:-1].clone()}),
        "newer format": (None, tensors),
    }
    for label, (header, content) in cases.items():
        extra = {"camphive-sparse-2": "{}"} if header is None else {FORMAT: json.dumps(header)}
        with pytest.raises(CheckpointError) as error:
            load_sparse(io.BytesIO(save_safetensors(content, extra)), model=TinyNet())
        message = one_line_error(error)
        assert ("upgrade camphive" if header is None else "truncated or corrupt") in message, (label, message)


def read_stored(path):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as file:
        return {name: file.get_tensor(name) for name in file.keys()}, json.loads(file.metadata()[FORMAT])


def test_bad_settings_are_refused_before_anything_is_written(tmp_path):
    model = TinyNet()
    masks = pruned(model, 0.5)
    target = tmp_path / "m.safetensors"
    with torch.no_grad():
        model.fc.weight[~masks["fc.weight"]] = 1.0  # masks not applied
    bad = [({"masks": masks}, "fc.weight is non-zero where its mask is False"),
           ({"masks": {"nope.weight": masks["fc.weight"]}}, "mask for 'nope.weight' names no floating tensor"),
           ({"masks": {"fc.weight": masks["fc.weight"].float()}}, "must be a bool tensor"),
           ({"dtype": "int8"}, "values dtype 'int8' is not supported"),
           ({"metadata": {"fingerprint": "x"}}, "may not set fingerprint")]
    for options, fragment in bad:
        with pytest.raises(ConfigError) as error:
            save_sparse(model, target, **options)
        assert fragment in one_line_error(error)
    assert list(tmp_path.iterdir()) == []


def test_cli_export_sparse_writes_the_file_and_reports_its_size(tmp_path, capsys):
    from camphive.cli import main

    torch.manual_seed(0)
    model = models.create("small-cnn", num_classes=10, in_channels=1)
    masks = magnitude_pruned(model, 0.95)
    checkpoint = save_checkpoint(tmp_path / "model.safetensors", model, masks, dataset="synthetic",
                                 input_shape=[1, 28, 28])
    assert main(["export", "--checkpoint", str(checkpoint), "--format", "sparse"]) == 0
    output = capsys.readouterr().out
    target = tmp_path / "model.sparse.safetensors"  # the default: beside the checkpoint
    written = load_sparse(target)
    assert written.metadata["dataset"] == "synthetic" and written.metadata["input_shape"] == [1, 28, 28]
    assert all(torch.equal(value, model.state_dict()[name]) for name, value in written.model.state_dict().items())
    assert all(torch.equal(written.masks[name], masks[name]) for name in masks)
    dense = dense_checkpoint_bytes(model, {"dataset": "synthetic", "input_shape": [1, 28, 28]})
    assert f"bytes: {target.stat().st_size}" in output and f"dense float32 checkpoint bytes: {dense}" in output
    assert f"size / dense: {target.stat().st_size / dense:.4f}" in output
    assert main(["export", "--checkpoint", str(checkpoint), "--sparse", str(tmp_path / "half.safetensors"),
                 "--values-dtype", "float16"]) == 0  # --sparse alone implies the format
    assert (tmp_path / "half.safetensors").stat().st_size < target.stat().st_size
    (tmp_path / "export.yaml").write_text(f"format: sparse\nsparse: {tmp_path / 'config.safetensors'}\n")
    assert main(["export", "--checkpoint", str(checkpoint), "--config", str(tmp_path / "export.yaml")]) == 0
    assert (tmp_path / "config.safetensors").read_bytes() == target.read_bytes()  # the same file, from a config


@pytest.mark.parametrize("args, fragment", [
    (["--format", "sparse", "--values-dtype", "float8"], "--values-dtype 'float8' is not supported"),
    (["--format", "zip"], "--format 'zip' is not known"),
    (["--format", "sparse", "--onnx", "m.onnx"], "--onnx applies to --format onnx"),
    (["--values-dtype", "float16", "--onnx", "m.onnx"], "apply to --format sparse"),
    (["--format", "sparse", "--sparse", "{checkpoint}"], "is the checkpoint itself"),
    (["--format", "sparse", "--checkpoint", "{folder}/nothing.safetensors"], "does not exist"),
])
def test_cli_export_bad_input_exits_non_zero_in_one_line_and_writes_nothing(tmp_path, capsys, args, fragment):
    from camphive.cli import main

    checkpoint = save_checkpoint(tmp_path / "model.safetensors", TinyNet())
    before = {path: path.stat().st_mtime_ns for path in tmp_path.iterdir()}
    args = [arg.format(checkpoint=checkpoint, folder=tmp_path) for arg in args]
    given = ["--checkpoint", str(checkpoint)] if "--checkpoint" not in args else []
    code = main(["export", *given, *args])
    error = capsys.readouterr().err
    assert code == 2 and error.count("\n") == 1 and fragment in error and "Traceback" not in error, error
    assert {path: path.stat().st_mtime_ns for path in tmp_path.iterdir()} == before


def test_prune_job_writes_the_sparse_file_and_reports_its_size(tmp_path):
    from camphive.jobs.prune import prune_job

    checkpoint = save_checkpoint(tmp_path / "dense.safetensors", models.create("small-cnn", num_classes=10,
                                                                              in_channels=3),
                                 dataset="synthetic", input_shape=[3, 32, 32])
    results = prune_job(checkpoint=checkpoint, out=tmp_path / "run", sparsity=0.9, criterion="magnitude",
                        calib_samples=16, device="cpu", options={"spectrum_top_k": 0})
    sparse = results["sparse_file"]
    path = tmp_path / "run" / "model.sparse.safetensors"
    assert sparse["path"] == str(path) and sparse["bytes"] == path.stat().st_size
    final = load_checkpoint(tmp_path / "run" / "model.safetensors")
    assert sparse["dense_bytes"] == dense_checkpoint_bytes(final.model, {
        key: value for key, value in final.metadata.items() if key not in ("format", "arch")})
    assert sparse["bytes"] * 5 < sparse["dense_bytes"]
    loaded = load_sparse(path)
    assert all(torch.equal(value, final.model.state_dict()[name]) for name, value in loaded.model.state_dict().items())
    assert json.loads((tmp_path / "run" / "results.json").read_text())["sparse_file"] == sparse


class MixedNet(nn.Module):
    """Layers CSR measured faster on (large, very sparse linears and 1x1 convs) and layers it must leave alone."""

    def __init__(self) -> None:
        super().__init__()
        self.pointwise = nn.Conv2d(96, 576, 1)  # converted at 0.97
        self.strided = nn.Conv2d(576, 96, 1, stride=2, bias=False)  # a stride: not a plain GEMM
        self.spatial = nn.Conv2d(96, 96, 3, padding=1)  # 3x3: not converted
        self.big = nn.Linear(96 * 4 * 4, 1024)  # converted at 0.97
        self.half_pruned = nn.Linear(1024, 1024)  # sparsity 0.5: not converted
        self.small = nn.Linear(1024, 512, bias=False)  # 0.99 sparse, but 512x512 measured slower at batch 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.spatial(self.strided(torch.relu(self.pointwise(x))))
        return self.small(torch.relu(self.half_pruned(torch.relu(self.big(x.flatten(1))))))


@pytest.mark.parametrize("batch", [1, 3])
def test_to_sparse_csr_replaces_only_the_measured_layers_and_keeps_the_outputs(batch):
    from camphive.sparse_format import CSRConv1x1, CSRLinear, to_sparse_csr

    torch.manual_seed(0)
    model = MixedNet().eval()
    generator = torch.Generator().manual_seed(1)
    sparsities = {"pointwise": 0.97, "strided": 0.99, "spatial": 0.99, "big": 0.97, "half_pruned": 0.5, "small": 0.99}
    with torch.no_grad():
        for name, sparsity in sparsities.items():
            weight = getattr(model, name).weight
            weight.mul_(torch.rand(weight.shape, generator=generator) >= sparsity)
    inputs = torch.randn(batch, 96, 8, 8)
    with torch.no_grad():
        expected = model(inputs)
        assert to_sparse_csr(model) == ["pointwise", "big"]
        assert isinstance(model.pointwise, CSRConv1x1) and isinstance(model.big, CSRLinear)
        assert type(model.strided) is nn.Conv2d and type(model.half_pruned) is nn.Linear
        torch.testing.assert_close(model(inputs), expected, rtol=1e-5, atol=1e-5)
    assert not any(name.startswith(("pointwise.", "big.")) for name in model.state_dict())
    with pytest.raises(ConfigError) as error:
        to_sparse_csr(MixedNet(), min_sparsity=0.5)
    assert "below 0.95 CSR measured slower than dense" in one_line_error(error)
