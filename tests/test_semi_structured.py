"""2:4 semi-structured sparse layers: which layers convert and why the others stay dense, the wrappers' math
(run on the CPU with a dense weight through the same code), the refusals, and on a capable GPU the real kernels."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from camphive import semi_structured
from camphive.errors import ConfigError
from camphive.pruning import prune
from camphive.semi_structured import (
    SemiStructuredConv1x1,
    SemiStructuredLinear,
    holds_2_4,
    semi_structured_plan,
    to_semi_structured,
)

GPU_2_4 = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)
needs_gpu = pytest.mark.skipif(not GPU_2_4, reason="needs a CUDA GPU of compute capability 8.0 or later")


def prune_2_4(weight: torch.Tensor) -> torch.Tensor:
    """Zero the 2 smallest of every 4 consecutive inputs of each unit (the layout camphive's pattern='2:4' uses)."""
    with torch.no_grad():
        groups = weight.reshape(weight.shape[0], weight.shape[1] // 4, 4, -1)
        groups.scatter_(2, groups.abs().argsort(dim=2)[:, :, :2], 0.0)
    return weight


class Net(nn.Module):
    """A layer for every reason: converted 1x1 conv and linear, and each way a layer stays dense."""

    def __init__(self) -> None:
        super().__init__()
        self.pointwise = nn.Conv2d(64, 32, 1)
        self.spatial = nn.Conv2d(32, 32, 3, padding=1)
        self.strided = nn.Conv2d(32, 64, 1, stride=2, bias=False)
        self.unpruned = nn.Linear(64, 64)
        self.odd = nn.Linear(30, 32)
        self.narrow = nn.Linear(64, 24)
        self.fc = nn.Linear(64, 16)
        self.hooked = nn.Linear(64, 32)
        self.tied_a, self.tied_b = nn.Linear(64, 64), nn.Linear(64, 64)
        self.tied_b.weight = self.tied_a.weight
        self.wide = nn.Linear(128, 64, bias=False)
        for layer in (self.pointwise, self.strided, self.narrow, self.fc, self.hooked, self.tied_a, self.wide):
            prune_2_4(layer.weight)
        self.hooked.register_forward_hook(lambda module, args, output: output)


REASONS = {
    "spatial": "a 3x3 convolution (only 1x1 convolutions are a single GEMM)",
    "strided": "a 1x1 convolution with stride (2, 2), padding (0, 0), groups 1 (only stride 1, no padding and one "
               "group are a single GEMM)",
    "unpruned": "not 2:4: 1024 of 1024 groups of 4 consecutive input features hold more than 2 non-zeros "
                "(prune with pattern='2:4')",
    "odd": "30 input features, not a multiple of 4 (no 2:4 layout)",
    "narrow": "weight 24x64 (out x in): the cusparselt kernels need out a multiple of 16 and in a multiple of 16",
    "hooked": "it has hooks, which a replacement would drop",
    "tied_a": "its weight is shared with another module (tied), which reads it dense",
    "tied_b": "its weight is shared with another module (tied), which reads it dense",
}


@pytest.fixture
def dense_stand_in(monkeypatch):
    """to_semi_structured on the CPU: no GPU check, CPU weights allowed, the 'compression' keeps the dense weight."""
    monkeypatch.setattr(semi_structured, "_require_gpu", lambda model: None)
    monkeypatch.setattr(semi_structured, "_device_reason", lambda weight: None)
    monkeypatch.setattr(semi_structured, "_compress", lambda matrix, backend: matrix)


def test_the_shape_table_is_torchs():
    from torch.sparse import SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS

    for backend, kind in (("cusparselt", SparseSemiStructuredTensorCUSPARSELT),
                          ("cutlass", SparseSemiStructuredTensorCUTLASS)):
        for dtype in semi_structured.SUPPORTED_DTYPES:
            limits = kind._DTYPE_SHAPE_CONSTRAINTS[dtype]
            assert semi_structured.WEIGHT_MULTIPLES[backend] == (limits.sparse_min_rows, limits.sparse_min_cols)


def test_plan_converts_the_2_4_layers_and_says_why_each_other_stays_dense(monkeypatch):
    model = Net().half()
    plan = semi_structured_plan(model)  # on the CPU: every layer that qualifies is named as off the GPU
    assert plan.converted == [] and sorted(plan._blocked) == ["fc", "pointwise", "wide"]
    assert plan.dense["fc"] == "on cpu, not on the GPU"
    monkeypatch.setattr(semi_structured, "_device_reason", lambda weight: None)
    plan = semi_structured_plan(model)
    assert plan.converted == ["pointwise", "fc", "wide"] and plan.dense == REASONS
    cutlass = semi_structured_plan(model, backend="cutlass")
    assert cutlass.converted == ["pointwise", "wide"]
    assert cutlass.dense["fc"] == ("weight 16x64 (out x in): the cutlass kernels need out a multiple of 32 and in a "
                                   "multiple of 64")
    model.wide.float()
    assert semi_structured_plan(model).dense["wide"] == "float32 (the sparse kernels run float16 or bfloat16)"
    model.fc.bias.data = model.fc.bias.data.float()
    assert semi_structured_plan(model).dense["fc"] == "a float32 bias with a float16 weight (the kernels need them equal)"


def test_holds_2_4_reads_camphives_pattern_layout():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 4 * 4, 32), nn.ReLU(),
                          nn.Linear(32, 3))
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 8, 4, 4, generator=generator), torch.randint(0, 3, (8,), generator=generator))
               for _ in range(2)]
    prune(model, batches, criterion="magnitude", pattern="2:4")
    assert all(holds_2_4(model[index].weight) for index in (0, 3, 5))
    swapped = model[3].weight.detach().t().contiguous()  # 2:4 along the outputs, not the inputs
    assert not holds_2_4(swapped)
    with pytest.raises(ConfigError, match="no groups of 4"):
        holds_2_4(torch.zeros(4, 6))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_conv_wrapper_computes_the_convolution_in_both_layouts(dtype, channels_last):
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 8, 1).to(dtype)
    prune_2_4(conv.weight)
    wrapper = SemiStructuredConv1x1(conv, conv.weight.detach().reshape(8, -1))
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    inputs = torch.randn(3, 16, 5, 7, dtype=dtype).contiguous(memory_format=memory_format)
    with torch.no_grad():
        expected, outputs = conv(inputs), wrapper(inputs)
        torch.testing.assert_close(outputs, expected, rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-5)
        assert outputs.is_contiguous(memory_format=memory_format)
        torch.testing.assert_close(wrapper(inputs[0]), conv(inputs[0]), rtol=1e-2, atol=1e-5)  # unbatched
    assert not list(wrapper.state_dict())


@pytest.mark.parametrize("bias", [True, False])
def test_linear_wrapper_computes_the_linear_for_any_leading_shape(bias):
    torch.manual_seed(0)
    linear = nn.Linear(32, 16, bias=bias)
    prune_2_4(linear.weight)
    wrapper = SemiStructuredLinear(linear, linear.weight.detach())
    with torch.no_grad():
        for inputs in (torch.randn(32), torch.randn(5, 32), torch.randn(2, 3, 32), torch.randn(6, 32).t().t()):
            torch.testing.assert_close(wrapper(inputs), linear(inputs), rtol=1e-6, atol=1e-6)
        transposed = torch.randn(32, 4).t()  # a non-contiguous input
        torch.testing.assert_close(wrapper(transposed), linear(transposed), rtol=1e-6, atol=1e-6)


def test_to_semi_structured_replaces_the_layers_and_keeps_the_outputs(dense_stand_in):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(64, 32, 1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(64, 64, 1, bias=False), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 16))
    for index in (0, 4, 7):
        prune_2_4(model[index].weight)
    model = model.to(torch.bfloat16).eval()
    inputs = torch.randn(2, 64, 6, 6, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = model(inputs)
        result = to_semi_structured(model, backend="cutlass")
        assert result.converted == ["0", "4"]  # the linear's 16 outputs are too few for CUTLASS (32)
        assert result.dense["2"].startswith("a 3x3 convolution") and result.dense["7"].startswith("weight 16x64")
        assert isinstance(model[0], SemiStructuredConv1x1) and isinstance(model[4], SemiStructuredConv1x1)
        torch.testing.assert_close(model(inputs), expected, rtol=1e-2, atol=1e-2)
    assert not any(name.startswith(("0.", "4.")) for name in model.state_dict())
    assert result.to_dict() == {"backend": result.backend, "converted": ["0", "4"], "dense": result.dense}


def test_a_compression_that_changes_the_weight_or_fails_leaves_the_layer_dense(dense_stand_in, monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64)).half()
    for layer in model:
        prune_2_4(layer.weight)

    def compress(matrix, backend):
        if matrix.data_ptr() == model[0].weight.data_ptr():
            return matrix.clone().index_fill_(1, torch.tensor([1]), 0.5)  # a wrong compression
        raise RuntimeError("CUDA error: kernel refused\nsecond line")

    monkeypatch.setattr(semi_structured, "_compress", compress)
    result = to_semi_structured(model, backend="cutlass")
    assert result.converted == [] and type(model[0]) is nn.Linear and type(model[1]) is nn.Linear
    assert result.dense == {"0": "its compressed weight did not give back the dense one through the kernel",
                            "1": "torch could not compress it (CUDA error: kernel refused second line)"}


def test_torchs_own_compression_is_called_and_its_refusal_keeps_the_layer_dense(monkeypatch):
    """The real SparseSemiStructuredTensor.from_dense, reached on the CPU, refuses a CPU weight: left dense, no crash."""
    monkeypatch.setattr(semi_structured, "_require_gpu", lambda model: None)
    monkeypatch.setattr(semi_structured, "_device_reason", lambda weight: None)
    model = nn.Sequential(nn.Linear(64, 64)).half()
    prune_2_4(model[0].weight)
    result = to_semi_structured(model, backend="cutlass")
    assert result.converted == [] and type(model[0]) is nn.Linear
    assert result.dense["0"].startswith("torch could not compress it (Error original_tensor.device= cpu")


def test_refused_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError) as error:
        to_semi_structured(Net().half(), backend="cutlass")
    message = str(error.value)
    assert "\n" not in message and "need a CUDA GPU of compute capability 8.0 or later" in message
    assert "to_sparse_csr" in message


def test_refused_below_compute_capability_8(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    with pytest.raises(ConfigError, match=r"GPU cuda:0 \(Tesla T4\) has compute capability 7.5; 2:4 semi-structured "
                                          r"sparse kernels need 8.0 or later"):
        to_semi_structured(Net().half(), backend="cutlass")


def test_2_4_layers_only_in_float32_or_off_the_gpu_are_refused_naming_the_fix(monkeypatch):
    monkeypatch.setattr(semi_structured, "_require_gpu", lambda model: None)
    with pytest.raises(ConfigError, match=r"no layer can run 2:4 sparse: pointwise holds 2:4 but is float32 \(the "
                                          r"sparse kernels run float16 or bfloat16\) \(2 such layers\); convert the "
                                          r"model with model.half\(\)"):
        to_semi_structured(Net(), backend="cutlass")
    with pytest.raises(ConfigError, match=r"pointwise holds 2:4 but is on cpu, not on the GPU \(2 such layers\); "
                                          r"move the model to the GPU \(model.cuda\(\)\) first"):
        to_semi_structured(Net().half(), backend="cutlass")
    unpruned = nn.Sequential(nn.Linear(64, 64))
    assert to_semi_structured(unpruned, backend="cutlass").converted == []  # nothing held 2:4: no error


def test_bad_backends_are_one_line_errors(monkeypatch):
    with pytest.raises(ConfigError, match="backend 'triton' is not one of auto, cusparselt, cutlass"):
        to_semi_structured(Net(), backend="triton")
    monkeypatch.setattr(semi_structured, "_require_gpu", lambda model: None)
    monkeypatch.setattr(torch.backends.cusparselt, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="this torch build has no cuSPARSELt; use backend='cutlass' or 'auto'"):
        to_semi_structured(Net(), backend="cusparselt")


def test_re_exported_beside_to_sparse_csr():
    from camphive import sparse_format

    assert sparse_format.to_semi_structured is to_semi_structured


@needs_gpu
@pytest.mark.parametrize("backend", ["cusparselt", "cutlass"])
def test_on_the_gpu_converted_layers_match_dense(backend):
    if backend == "cusparselt" and not torch.backends.cusparselt.is_available():
        pytest.skip("this torch build has no cuSPARSELt")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(64, 128, 1), nn.ReLU(), nn.Conv2d(128, 64, 1, bias=False), nn.Flatten(),
                          nn.Linear(64 * 4 * 4, 64))
    for index in (0, 2, 4):
        prune_2_4(model[index].weight)
    model = model.cuda().half().eval()
    converted = copy.deepcopy(model)
    assert to_semi_structured(converted, backend=backend).converted == ["0", "2", "4"]
    assert type(converted[0].weight).__name__.startswith("SparseSemiStructuredTensor")
    with torch.no_grad():
        for memory_format in (torch.contiguous_format, torch.channels_last):
            inputs = torch.randn(8, 64, 4, 4, device="cuda", dtype=torch.half).contiguous(memory_format=memory_format)
            expected, outputs = model(inputs), converted(inputs)
            torch.testing.assert_close(outputs, expected, rtol=2e-2, atol=2e-2)
            assert F.mse_loss(outputs.float(), expected.float()) < 1e-4
