"""Parameters, multiply-accumulates (MACs) and latency of a model.

MAC convention (one forward pass, hooks on modules, model in eval mode):

* Convolutions (1d/2d/3d, grouped and depthwise, transposed): every weight is used once per
  output position, so MACs = positions x weights, which for an ordinary convolution is
  ``out_elements * (in_channels / groups) * kernel_elements``. Linear layers likewise:
  ``out_elements * in_features`` (leading dimensions beyond the batch included). Biases are
  not counted.
* ``nonzero=True`` counts only the non-zero weights (each still used once per position):
  the effective MACs of an unstructured-sparse model run by a sparse kernel.
* ``include_norm_and_add=True`` also counts 1 MAC per output element of every BatchNorm (in
  eval mode it is one multiply-add, ``x * scale + shift``) and 1 per output element of every
  tensor-tensor addition or subtraction that the forward pass performs outside those
  layers (residual sums, found by a ``TorchFunctionMode``; additions of a Python number are
  not counted). Activations, pooling and other norms are not counted: they are not MACs.
  Published MAC counts (ResNet-56: 125 M) are conv + linear only, i.e. the ``conv`` and
  ``linear`` entries of :attr:`MacsReport.by_kind`.

Counts are for the forward pass on the inputs given, so pass one sample for per-sample
MACs (:func:`model_summary` does so).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from camphive.layers import prunable_layers
from camphive.modules import Inputs, as_input_tuple, eval_mode, inputs_on_model_device

_NORM_TYPES = (nn.modules.batchnorm._BatchNorm,)
_ADDITION_NAMES = {"add", "add_", "__add__", "__radd__", "__iadd__", "sub", "sub_", "__sub__", "__rsub__", "__isub__"}
_ROOT_NAME = "(model)"


def count_parameters(model: nn.Module, nonzero: bool = False) -> int:
    """Number of parameter entries (shared parameters once); only non-zero ones if ``nonzero``."""
    if nonzero:
        return sum(int(torch.count_nonzero(p.detach())) for p in model.parameters())
    return sum(p.numel() for p in model.parameters())


@dataclass
class MacsReport:
    """MACs of one forward pass: ``total``, per module name, and per kind (conv, linear, norm, add).

    Additions are attributed to the module whose forward performed them (``"(model)"`` for
    the top module). ``uncounted`` names modules with parameters whose compute is not
    counted (e.g. LayerNorm, embeddings, attention), so a total that misses them says so.
    """

    total: int
    per_layer: dict[str, int]
    by_kind: dict[str, int]
    nonzero: bool
    include_norm_and_add: bool
    uncounted: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _conv_or_linear_macs(module: nn.Module, inputs: tuple, output: torch.Tensor, nonzero: bool) -> int:
    """MACs = weights used x positions where each is used (see the module docstring)."""
    weight = module.weight.detach()
    weights = int(torch.count_nonzero(weight)) if nonzero else weight.numel()
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        positions = inputs[0].numel() // module.in_channels  # each weight scatters once per input position
    elif isinstance(module, nn.Linear):
        positions = output.numel() // module.out_features
    else:
        positions = output.numel() // module.out_channels
    return positions * weights


class _AdditionCounter(TorchFunctionMode):
    """Counts output elements of tensor-tensor additions, attributed to the running module."""

    def __init__(self, module_stack: list[tuple[str, nn.Module]], record: Callable[[str, str, int], None]) -> None:
        super().__init__()
        self.module_stack = module_stack
        self.record = record

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", "")
        if name in _ADDITION_NAMES and len(args) >= 2 and all(isinstance(a, torch.Tensor) for a in args[:2]):
            owner_name, owner = self.module_stack[-1] if self.module_stack else (_ROOT_NAME, None)
            # Additions inside counted layers (none in torch's own) would be counted twice.
            if not isinstance(owner, (nn.Linear, nn.modules.conv._ConvNd, *_NORM_TYPES)):
                self.record(owner_name, "add", result.numel() if isinstance(result, torch.Tensor) else 0)
        return result


def count_macs(
    model: nn.Module, example_inputs: Inputs, nonzero: bool = False, include_norm_and_add: bool = True
) -> MacsReport:
    """Count MACs of ``model(*example_inputs)`` by hooks on one forward pass.

    The model runs once in eval mode without gradients; each module's training flag is
    restored afterwards. See the module docstring for what is counted. The inputs are moved to
    the model's device.
    """
    inputs = inputs_on_model_device(model, example_inputs)
    per_layer: dict[str, int] = {}
    by_kind = {"conv": 0, "linear": 0, "norm": 0, "add": 0}
    uncounted: list[str] = []
    module_stack: list[tuple[str, nn.Module]] = []

    def record(name: str, kind: str, macs: int) -> None:
        per_layer[name] = per_layer.get(name, 0) + macs
        by_kind[kind] += macs

    def make_hooks(name: str, module: nn.Module):
        def pre_hook(mod, args):
            module_stack.append((name or _ROOT_NAME, mod))

        def post_hook(mod, args, output):
            module_stack.pop()
            if isinstance(mod, (nn.Linear, nn.modules.conv._ConvNd)):
                kind = "linear" if isinstance(mod, nn.Linear) else "conv"
                record(name or _ROOT_NAME, kind, _conv_or_linear_macs(mod, args, output, nonzero))
            elif isinstance(mod, _NORM_TYPES):
                if include_norm_and_add:
                    record(name or _ROOT_NAME, "norm", output.numel())
            elif any(True for _ in mod.parameters(recurse=False)) and (name or _ROOT_NAME) not in uncounted:
                uncounted.append(name or _ROOT_NAME)

        return pre_hook, post_hook

    handles = []
    try:
        for name, module in model.named_modules():
            pre_hook, post_hook = make_hooks(name, module)
            handles.append(module.register_forward_pre_hook(pre_hook))
            handles.append(module.register_forward_hook(post_hook))
        with eval_mode(model), torch.no_grad():
            if include_norm_and_add:
                with _AdditionCounter(module_stack, record):
                    model(*inputs)
            else:
                model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    return MacsReport(
        total=sum(by_kind.values()), per_layer=per_layer, by_kind=by_kind, nonzero=nonzero,
        include_norm_and_add=include_norm_and_add, uncounted=uncounted,
    )


def model_summary(model: nn.Module, example_inputs: Inputs) -> dict[str, Any]:
    """Parameters, sparsity and per-sample MACs (dense and non-zero) of ``model``.

    MACs are for the first sample of ``example_inputs`` (leading dimension sliced to 1).
    ``macs`` follows the full convention (conv, linear, BN, additions); ``macs_conv_linear``
    is the figure comparable with published counts. ``layers`` covers the prunable (conv
    and linear) layers: weights, non-zero weights, sparsity and MACs.
    """
    first_sample = tuple(x[:1] for x in as_input_tuple(example_inputs))
    dense = count_macs(model, first_sample, nonzero=False)
    sparse = count_macs(model, first_sample, nonzero=True)
    layers = {}
    for name, layer in prunable_layers(model).items():
        weights = layer.weight.numel()
        nonzero = int(torch.count_nonzero(layer.weight.detach()))
        layers[name] = {
            "weights": weights, "nonzero": nonzero, "sparsity": 1.0 - nonzero / weights,
            "macs": dense.per_layer.get(name, 0), "macs_nonzero": sparse.per_layer.get(name, 0),
        }
    prunable_weights = sum(entry["weights"] for entry in layers.values())
    prunable_nonzero = sum(entry["nonzero"] for entry in layers.values())
    parameters = count_parameters(model)
    nonzero_parameters = count_parameters(model, nonzero=True)
    return {
        "parameters": parameters,
        "nonzero_parameters": nonzero_parameters,
        "prunable_weights": prunable_weights,
        "prunable_nonzero": prunable_nonzero,
        "sparsity": 1.0 - prunable_nonzero / prunable_weights if prunable_weights else 0.0,
        "macs": dense.total,
        "macs_nonzero": sparse.total,
        "macs_conv_linear": dense.by_kind["conv"] + dense.by_kind["linear"],
        "macs_conv_linear_nonzero": sparse.by_kind["conv"] + sparse.by_kind["linear"],
        "macs_uncounted_modules": dense.uncounted,
        "layers": layers,
    }


# --------------------------------------------------------------------------- latency
