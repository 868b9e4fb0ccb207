"""Tests for camphive.models.resnet_imagenet."""
from __future__ import annotations

import pytest
import torch
import torch_pruning as tp
from torch import nn

import camphive
from camphive import models
from camphive.models.resnet_blocks import Bottleneck


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# torchvision's published counts for resnet18/34/50 (1000 classes).
@pytest.mark.parametrize(
    ("name", "expected"),
    [("resnet18-imagenet", 11_689_512), ("resnet34-imagenet", 21_797_672),
     ("resnet50-imagenet", 25_557_032)],
)
def test_parameter_counts_match_reference(name, expected):
    assert count(models.create(name, num_classes=1000)) == expected


def test_stem_and_32x_downsampling():
    model = models.create("resnet18-imagenet").eval()
    assert model.conv1.kernel_size == (7, 7) and model.conv1.stride == (2, 2)
    assert isinstance(model.maxpool, nn.MaxPool2d)
    seen = {}
    model.layer4.register_forward_hook(lambda m, i, o: seen.update(out=o.shape))
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    assert seen["out"] == (1, 512, 2, 2)


def test_resnet50_uses_bottlenecks_with_stride_on_3x3():
    model = models.create("resnet50-imagenet")
    first = model.layer2[0]
    assert isinstance(first, Bottleneck)
    assert first.conv1.stride == (1, 1) and first.conv2.stride == (2, 2)
    assert first.conv3.out_channels == 512 and model.fc.in_features == 2048


def torchvision_resnet50_shapes(num_classes: int) -> dict[str, tuple[int, ...]]:
    """Every state-dict entry of torchvision's resnet50 (v1.5) with its shape, written out from its layout."""
    shapes = {"conv1.weight": (64, 3, 7, 7)}

    def norm(prefix: str, channels: int) -> None:
        shapes.update({f"{prefix}.weight": (channels,), f"{prefix}.bias": (channels,),
                       f"{prefix}.running_mean": (channels,), f"{prefix}.running_var": (channels,),
                       f"{prefix}.num_batches_tracked": ()})

    norm("bn1", 64)
    in_channels = 64
    for stage, (blocks, width) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512)), start=1):
        for block in range(blocks):
            prefix = f"layer{stage}.{block}"
            shapes[f"{prefix}.conv1.weight"] = (width, in_channels, 1, 1)
            shapes[f"{prefix}.conv2.weight"] = (width, width, 3, 3)
            shapes[f"{prefix}.conv3.weight"] = (4 * width, width, 1, 1)
            for index, channels in ((1, width), (2, width), (3, 4 * width)):
                norm(f"{prefix}.bn{index}", channels)
            if block == 0:
                shapes[f"{prefix}.downsample.0.weight"] = (4 * width, in_channels, 1, 1)
                norm(f"{prefix}.downsample.1", 4 * width)
            in_channels = 4 * width
    shapes.update({"fc.weight": (num_classes, 2048), "fc.bias": (num_classes,)})
    return shapes


def test_resnet50_state_dict_has_torchvision_names_and_shapes():
    state = models.create("resnet50-imagenet", num_classes=1000).state_dict()
    expected = torchvision_resnet50_shapes(1000)
    assert len(state) == len(expected) == 320
    assert {name: tuple(tensor.shape) for name, tensor in state.items()} == expected
    assert list(state)[:2] == ["conv1.weight", "bn1.weight"] and list(state)[-1] == "fc.bias"


def test_resnet50_output_shape_and_strides_on_a_small_input():
    model = models.create("resnet50-imagenet", num_classes=10).eval()
    strides = {name: module.stride for name, module in model.named_modules() if isinstance(module, nn.Conv2d)}
    assert [name for name, stride in strides.items() if stride == (2, 2)] == [
        "conv1", "layer2.0.conv2", "layer2.0.downsample.0", "layer3.0.conv2", "layer3.0.downsample.0",
        "layer4.0.conv2", "layer4.0.downsample.0"]
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 10)


def test_resnet50_dependency_graph_couples_each_residual_stream():
    """Torch-Pruning's graph (structured pruning) puts a stage's block outputs and shortcut in one group."""
    torch.manual_seed(0)
    model = models.create("resnet50-imagenet", num_classes=10).eval()
    example = torch.randn(2, 3, 64, 64)
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    group = graph.get_pruning_group(model.layer1[0].conv3, tp.prune_conv_out_channels, idxs=[0, 5, 9])
    names = {dependency.target.name.split(" ")[0] for dependency, _ in group}
    assert {"layer1.0.conv3", "layer1.0.downsample.0", "layer1.1.conv3", "layer1.2.conv3", "layer1.0.bn3",
            "layer1.1.conv1", "layer1.2.conv1", "layer2.0.conv1", "layer2.0.downsample.0"} <= names
    group.prune()
    assert model.layer1[2].conv3.out_channels == model.layer2[0].downsample[0].in_channels == 253
    with torch.no_grad():
        assert model(example).shape == (2, 10)


def test_resnet50_prunes_structurally_end_to_end():
    torch.manual_seed(0)
    model = models.create("resnet50-imagenet", num_classes=10)
    batches = [(torch.randn(4, 3, 64, 64), torch.randint(0, 10, (4,)))]
    result = camphive.prune(model, batches, mode="structured", target_macs_ratio=1.5, criterion="magnitude",
                            measure_latency=False)
    assert result.after["macs"] < result.before["macs"] / 1.4
    with torch.no_grad():
        assert model.eval()(batches[0][0]).shape == (4, 10)
