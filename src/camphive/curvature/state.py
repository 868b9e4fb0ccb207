"""Put a model in the fixed state curvature needs, and give it back exactly as it was.

Curvature is the Hessian of a *fixed* function, so BatchNorm uses its running statistics and
dropout is off (eval mode). Only the parameters being differentiated require grad, which
keeps the autograd graph small. Afterwards every module's training flag and every
parameter's ``requires_grad`` are restored; ``.grad`` is never written because all
derivatives go through ``torch.autograd.grad``.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from camphive.batches import Batch, take_batches
from camphive.errors import ConfigError


@contextmanager
def curvature_mode(model: nn.Module, differentiated: Iterable[torch.Tensor] = ()) -> Iterator[None]:
    """Eval mode, ``requires_grad`` only on ``differentiated``; restore both on exit."""
    training = [(module, module.training) for module in model.modules()]
    requires = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
    wanted = {id(tensor) for tensor in differentiated}
    try:
        model.eval()
        for parameter, _ in requires:
            parameter.requires_grad_(id(parameter) in wanted)
        for tensor in differentiated:
            tensor.requires_grad_(True)
        yield
    finally:
        for module, flag in training:
            module.training = flag
        for parameter, flag in requires:
            parameter.requires_grad_(flag)


def parameter_device_dtype(tensors: Iterable[torch.Tensor]) -> tuple[torch.device, torch.dtype]:
    """The one device and floating dtype of ``tensors``; mixed ones are an error."""
    tensors = list(tensors)
    devices = {tensor.device for tensor in tensors}
    dtypes = {tensor.dtype for tensor in tensors}
    if len(devices) != 1 or len(dtypes) != 1:
        raise ConfigError(
            f"curvature needs the chosen parameters on one device with one dtype, got devices "
            f"{sorted(map(str, devices))} and dtypes {sorted(map(str, dtypes))}; move the model with model.to(...)"
        )
    return devices.pop(), dtypes.pop()


def prepare_batches(
    data, num_batches: int | None, device: torch.device, dtype: torch.dtype, batch_size: int = 128
) -> list[Batch]:
    """Read and check the calibration batches once, moved to ``device``.

    Floating-point inputs are cast to the model's ``dtype`` so a float64 model can be fed
    float32 data; integer inputs (token ids) and the targets keep their dtype.
    """
    prepared = []
    for inputs, targets in take_batches(data, num_batches, batch_size=batch_size):
        if inputs.is_floating_point():
            inputs = inputs.to(device=device, dtype=dtype)
        else:
            inputs = inputs.to(device)
        if targets.is_floating_point():
            targets = targets.to(device=device, dtype=dtype)
        else:
            targets = targets.to(device)
        prepared.append((inputs, targets))
    return prepared


class ModelSnapshot:
    """A copy of all parameters and buffers, to notice any later edit of the model.

    A cached autograd graph describes the model as it was; after pruning, a weight edit
    through ``.data`` or a new BatchNorm statistic it would be stale. Comparing values (not
    version counters, which ``.data`` edits bypass) costs one pass over the weights, which is
    small beside one Hessian-vector product.
    """

    def __init__(self, model: nn.Module) -> None:
        self._tensors = [tensor for tensor in (*model.parameters(), *model.buffers())]
        self._copies = [tensor.detach().clone() for tensor in self._tensors]

    def unchanged(self, model: nn.Module) -> bool:
        current = [tensor for tensor in (*model.parameters(), *model.buffers())]
        if len(current) != len(self._tensors) or any(a is not b for a, b in zip(current, self._tensors)):
            return False
        return all(torch.equal(tensor.detach(), copy) for tensor, copy in zip(current, self._copies))
