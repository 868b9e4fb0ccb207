"""2:4 semi-structured sparse inference on CUDA: pruned linears and 1x1 convolutions on sparse tensor cores.

GPUs of compute capability 8.0 and later (Ampere, Ada, Hopper, ...) multiply a weight that
holds at most 2 non-zeros in every group of 4 consecutive entries of its reduction dimension
at up to twice the dense rate, from a compressed copy (the kept half plus 2-bit indices).
torch exposes this as ``torch.sparse.SparseSemiStructuredTensor`` (backends cuSPARSELt and
CUTLASS) for 2-D weights in float16 and bfloat16 (and int8, which ``nn.Linear`` and
``nn.Conv2d`` do not run). :func:`to_semi_structured` puts it in a model:

- an ``nn.Linear`` whose ``(out, in)`` weight holds 2:4 along its input features becomes a
  :class:`SemiStructuredLinear`;
- a 1x1 ``nn.Conv2d`` (stride 1, no padding, one group) is the same GEMM over the pixels, its
  ``(out, in, 1, 1)`` weight holding 2:4 along consecutive input channels (camphive's
  ``pattern="2:4"`` layout); it becomes a :class:`SemiStructuredConv1x1`, which reads an NHWC
  (``channels_last``) input as its ``(pixels, in)`` matrix without a copy (an NCHW input costs one).

Every other linear and convolution stays as it is, with the reason in the result: the pattern
not held, a shape the kernels do not take (both weight dimensions multiples of 16 for
cuSPARSELt, of 32 x 64 for CUTLASS), a dtype other than float16 / bfloat16, a weight off the
GPU, forward hooks a replacement would drop. A converted layer's output is the dense layer's up
to the kernels' accumulation order: each compressed weight is checked to give back exactly the
dense one through the kernel before it replaces the layer. Converted layers are for inference:
they hold no trainable weight, and their weights leave ``state_dict`` (save before converting).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from camphive.errors import ConfigError, one_line

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
MIN_CAPABILITY = (8, 0)
# (out features, in features) the weight must be a multiple of, per backend, for float16 and bfloat16:
# torch's SparseSemiStructuredTensorCUSPARSELT / ...CUTLASS ``_DTYPE_SHAPE_CONSTRAINTS`` (a test keeps them equal).
WEIGHT_MULTIPLES = {"cusparselt": (16, 16), "cutlass": (32, 64)}
BACKENDS = ("auto", *WEIGHT_MULTIPLES)
HALF_FIX = "convert the model with model.half() (or model.to(torch.bfloat16)) first"
GPU_FIX = "move the model to the GPU (model.cuda()) first"


@dataclass
class SemiStructuredResult:
    """What :func:`to_semi_structured` did: the ``backend``, the layers ``converted`` (names in
    ``named_modules`` order) and ``dense`` ``{name: why it stayed dense}`` for every other linear
    and convolution."""

    backend: str
    converted: list[str] = field(default_factory=list)
    dense: dict[str, str] = field(default_factory=dict)
    _blocked: dict[str, str] = field(default_factory=dict, repr=False)  # held 2:4 but for dtype / device

    def to_dict(self) -> dict:
        return {"backend": self.backend, "converted": list(self.converted), "dense": dict(self.dense)}


class SemiStructuredLinear(nn.Module):
    """Inference-only ``nn.Linear`` computing ``F.linear`` with a 2:4 compressed ``(out, in)`` weight.

    ``weight``: the layer's weight as :func:`to_semi_structured` compresses it (any 2-D
    ``(out, in)`` matrix works: a dense one runs the same code on the CPU).
    """

    def __init__(self, layer: nn.Linear, weight: torch.Tensor) -> None:
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        # Not persistent: a converted model is for running; save the model before converting it.
        self.register_buffer("weight", weight, persistent=False)
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().clone(), persistent=False)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        rows = inputs.reshape(-1, self.in_features).contiguous()  # the sparse product takes 2-D operands
        outputs = F.linear(rows, self.weight, self.bias)
        return outputs.reshape(*inputs.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class SemiStructuredConv1x1(nn.Module):
    """Inference-only 1x1 ``nn.Conv2d`` (stride 1, no padding, groups 1) as ``F.linear`` over the pixels.

    The input's NHWC view ``(N*H*W, in)`` times the 2:4 compressed ``(out, in)`` weight. An
    NHWC (``channels_last``) input is read in place and the output is NHWC too; an NCHW input
    is copied to NHWC and the output copied back, as ``nn.Conv2d`` returns the input's layout.
    """

    def __init__(self, layer: nn.Conv2d, weight: torch.Tensor) -> None:
        super().__init__()
        self.in_channels, self.out_channels = layer.in_channels, layer.out_channels
        self.register_buffer("weight", weight, persistent=False)
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().clone(), persistent=False)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if inputs.dim() == 3:  # unbatched (C, H, W), as nn.Conv2d takes it
            return self.forward(inputs[None])[0]
        batch, channels, height, width = inputs.shape
        rows = inputs.permute(0, 2, 3, 1).reshape(-1, channels).contiguous()  # a view when the input is NHWC
        outputs = F.linear(rows, self.weight, self.bias)  # (N*H*W, out)
        outputs = outputs.reshape(batch, height, width, self.out_channels).permute(0, 3, 1, 2)
        if not inputs.is_contiguous(memory_format=torch.channels_last):
            outputs = outputs.contiguous()
        return outputs

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size=(1, 1), bias={self.bias is not None}"


def to_semi_structured(model: nn.Module, *, backend: str = "auto") -> SemiStructuredResult:
    """Replace, in place, every linear and 1x1 convolution whose weight holds 2:4 by its sparse twin.

    ``model``: on a CUDA GPU of compute capability 8.0 or later, in float16 or bfloat16, pruned
    with ``pattern="2:4"`` (at most 2 non-zeros in every 4 consecutive input features or
    channels). ``backend``: ``"cusparselt"``, ``"cutlass"`` or ``"auto"`` (cuSPARSELt where this
    torch build has it). Returns the layers converted and, for each linear and convolution left
    dense, why. No CUDA GPU, one below compute capability 8.0, or 2:4 layers that are all in
    another dtype or off the GPU (nothing would be converted) are one-line ``ConfigError``s.
    """
    if backend not in BACKENDS:
        raise ConfigError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
    _require_gpu(model)
    backend = _resolve_backend(backend)
    result = semi_structured_plan(model, backend=backend)
    if not result.converted and result._blocked:
        names = sorted(result._blocked)
        fix = GPU_FIX if all("GPU" in result._blocked[name] for name in names) else HALF_FIX
        raise ConfigError(one_line(f"no layer can run 2:4 sparse: {names[0]} holds 2:4 but is "
                                   f"{result._blocked[names[0]]} ({len(names)} such layers); {fix}"))
    converted = []
    for name in result.converted:
        layer = model.get_submodule(name)
        matrix = layer.weight.detach().reshape(layer.weight.shape[0], -1).contiguous()
        try:
            compressed = _compress(matrix, backend)
            exact = _reproduces(compressed, matrix)
        except RuntimeError as error:  # torch's kernels refused the weight
            result.dense[name] = one_line(f"torch could not compress it ({str(error)[:120]})")
            continue
        if not exact:
            result.dense[name] = "its compressed weight did not give back the dense one through the kernel"
            continue
        replacement = SemiStructuredLinear(layer, compressed) if isinstance(layer, nn.Linear) else (
            SemiStructuredConv1x1(layer, compressed))
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, replacement)
        converted.append(name)
    result.converted = converted
    return result


def semi_structured_plan(model: nn.Module, *, backend: str = "cusparselt") -> SemiStructuredResult:
    """Which layers :func:`to_semi_structured` would convert and why the others stay dense.

    Converts nothing and needs no GPU (layers off the GPU are named as such); ``backend``
    (``"cusparselt"`` or ``"cutlass"``) sets the shapes the kernels take.
    """
    if backend not in WEIGHT_MULTIPLES:
        raise ConfigError(f"backend {backend!r} is not one of {', '.join(WEIGHT_MULTIPLES)}")
    result = SemiStructuredResult(backend=backend)
    users = {}  # how many modules hold each weight: a shared (tied) weight is read by another module too
    for module in model.modules():
        if isinstance(getattr(module, "weight", None), torch.Tensor):
            users[id(module.weight)] = users.get(id(module.weight), 0) + 1
    for index, (name, module) in enumerate(model.named_modules()):
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        reason = "the model itself (it cannot be replaced in place)" if index == 0 else _layer_reason(module)
        if reason is None and users[id(module.weight)] > 1:
            reason = "its weight is shared with another module (tied), which reads it dense"
        if reason is None:
            reason = _pattern_reason(module) or _shape_reason(module, backend)
        if reason is None:
            reason = _dtype_reason(module) or _device_reason(module.weight)
            if reason is not None:
                result._blocked[name] = reason
        if reason is None:
            result.converted.append(name)
        else:
            result.dense[name] = reason
    return result


def holds_2_4(weight: torch.Tensor) -> bool:
    """Whether ``weight`` (``(out, in)`` or ``(out, in, *kernel)``, ``in`` a multiple of 4) has at most 2
    non-zeros in every group of 4 consecutive input features or channels (at each kernel position)."""
    return _groups_over_2(weight)[0] == 0


def _groups_over_2(weight: torch.Tensor) -> tuple[int, int]:
    """``(groups with more than 2 non-zeros, groups)`` over the 4 consecutive inputs of each unit and position."""
    out, channels = int(weight.shape[0]), int(weight.shape[1])
    if channels % 4:
        raise ConfigError(f"a weight of {channels} inputs has no groups of 4; it cannot hold 2:4")
    groups = (weight.detach() != 0).reshape(out, channels // 4, 4, -1).sum(dim=2)  # (out, blocks, positions)
    return int((groups > 2).sum()), groups.numel()


def _layer_reason(module: nn.Module) -> str | None:
    """Why the kind of ``module`` rules it out (None for an nn.Linear or a plain 1x1 nn.Conv2d)."""
    if type(module) not in (nn.Linear, nn.Conv2d):
        return f"a {type(module).__name__}, a subclass whose forward may differ from its base's"
    if isinstance(module, nn.Conv2d):
        kernel = "x".join(str(size) for size in module.kernel_size)
        if module.kernel_size != (1, 1):
            return f"a {kernel} convolution (only 1x1 convolutions are a single GEMM)"
        if module.stride != (1, 1) or module.padding not in ((0, 0), "valid", "same") or module.groups != 1:
            return (f"a 1x1 convolution with stride {module.stride}, padding {module.padding}, groups {module.groups} "
                    "(only stride 1, no padding and one group are a single GEMM)")
    if module._forward_hooks or module._forward_pre_hooks or module._backward_hooks or module._backward_pre_hooks:
        return "it has hooks, which a replacement would drop"
    return None


def _pattern_reason(module: nn.Module) -> str | None:
    inputs = "features" if isinstance(module, nn.Linear) else "channels"
    channels = int(module.weight.shape[1])
    if channels % 4:
        return f"{channels} input {inputs}, not a multiple of 4 (no 2:4 layout)"
    over, groups = _groups_over_2(module.weight)
    if over:
        return (f"not 2:4: {over} of {groups} groups of 4 consecutive input {inputs} hold more than 2 non-zeros "
                "(prune with pattern='2:4')")
    return None


def _shape_reason(module: nn.Module, backend: str) -> str | None:
    out, channels = int(module.weight.shape[0]), int(module.weight.shape[1])
    rows, columns = WEIGHT_MULTIPLES[backend]
    if out % rows or channels % columns:
        return (f"weight {out}x{channels} (out x in): the {backend} kernels need out a multiple of {rows} and in "
                f"a multiple of {columns}")
    return None


def _dtype_reason(module: nn.Module) -> str | None:
    dtype = module.weight.dtype
    if dtype not in SUPPORTED_DTYPES:
        return f"{_name(dtype)} (the sparse kernels run float16 or bfloat16)"
    if module.bias is not None and module.bias.dtype != dtype:
        return f"a {_name(module.bias.dtype)} bias with a {_name(dtype)} weight (the kernels need them equal)"
    return None


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _device_reason(weight: torch.Tensor) -> str | None:
    return None if weight.is_cuda else f"on {weight.device}, not on the GPU"


def _resolve_backend(backend: str) -> str:
    available = torch.backends.cusparselt.is_available()
    if backend == "cusparselt" and not available:
        raise ConfigError("this torch build has no cuSPARSELt; use backend='cutlass' or 'auto'")
    if backend == "auto":
        return "cusparselt" if available else "cutlass"
    return backend


def _require_gpu(model: nn.Module) -> None:
    """One ConfigError line unless CUDA is available and every GPU the model uses has capability >= 8.0."""
    if not torch.cuda.is_available():
        raise ConfigError("2:4 semi-structured sparse kernels need a CUDA GPU of compute capability 8.0 or later "
                          "(Ampere or newer) and torch sees none; run on such a GPU (on the CPU, "
                          "camphive.sparse_format.to_sparse_csr is the sparse option)")
    devices = {parameter.device for parameter in model.parameters() if parameter.is_cuda}
    for device in sorted(devices or {torch.device("cuda", torch.cuda.current_device())}, key=str):
        capability = tuple(torch.cuda.get_device_capability(device))
        if capability < MIN_CAPABILITY:
            raise ConfigError(f"GPU {device} ({torch.cuda.get_device_name(device)}) has compute capability "
                              f"{capability[0]}.{capability[1]}; 2:4 semi-structured sparse kernels need 8.0 or later "
                              "(Ampere, e.g. A100 or RTX 30xx, or newer): run on such a GPU")


def _compress(matrix: torch.Tensor, backend: str) -> torch.Tensor:
    """The 2:4 compressed ``(out, in)`` weight of the chosen backend (torch's own compression)."""
    from torch.sparse import SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS

    kind = SparseSemiStructuredTensorCUSPARSELT if backend == "cusparselt" else SparseSemiStructuredTensorCUTLASS
    return kind.from_dense(matrix)


def _reproduces(compressed: torch.Tensor, matrix: torch.Tensor) -> bool:
    """Whether the product the layer runs gives back ``matrix`` exactly: ``F.linear(I, W) = Wᵀ``, each entry
    one weight times 1 plus zeros, so no rounding hides a wrong compression."""
    with torch.no_grad():
        identity = torch.eye(matrix.shape[1], dtype=matrix.dtype, device=matrix.device)
        return torch.equal(F.linear(identity, compressed), matrix.t())
