"""Small helpers about models that every layer of the library needs: example inputs as a tuple
on the model's device, eval mode that restores each module's flag, a forward pass whose shape
errors read as one line, and label checks. They sit at the bottom of the import graph."""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from camphive.errors import ConfigError, DataError

Inputs = torch.Tensor | Sequence[torch.Tensor]


def as_input_tuple(example_inputs: Inputs) -> tuple[torch.Tensor, ...]:
    """A tensor becomes a 1-tuple; a sequence of tensors a tuple (positional arguments)."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, Sequence) and all(isinstance(x, torch.Tensor) for x in example_inputs):
        return tuple(example_inputs)
    raise ConfigError(
        f"example inputs must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}; "
        "pass e.g. torch.randn(1, 3, 32, 32)"
    )


def inputs_on_model_device(model: nn.Module, example_inputs: Inputs) -> tuple[torch.Tensor, ...]:
    """``example_inputs`` as a tuple on the device of ``model``'s parameters (a GPU model is often
    handed CPU examples, as data loaders give them); unchanged for a model without parameters."""
    inputs = as_input_tuple(example_inputs)
    device = next((p.device for p in model.parameters()), None)
    return inputs if device is None else tuple(x.to(device) for x in inputs)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every module in eval mode, then restore each module's own training flag."""
    flags = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for module, training in flags.items():
            module.training = training


def check_targets(targets: torch.Tensor, num_outputs: int, where: str) -> None:
    if targets.dtype.is_floating_point:
        return  # soft targets or regression: the loss function decides
    low, high = int(targets.min()), int(targets.max())
    if low < 0 or high >= num_outputs:
        raise DataError(
            f"labels in {where} range from {low} to {high} but the model has {num_outputs} outputs; "
            f"create the model with num_classes > {high} or fix the labels"
        )


def forward_checked(model: nn.Module, inputs: torch.Tensor, where: str) -> torch.Tensor:
    """Run the model; turn a shape mismatch into one clear line."""
    try:
        return model(inputs)
    except RuntimeError as error:
        message = str(error).splitlines()[0]
        if any(word in message for word in ("shape", "size", "channels", "Expected", "mat1", "match")):
            raise DataError(
                f"inputs of shape {tuple(inputs.shape)} in {where} do not fit the model ({message}); "
                "check the dataset's channels and image size against the model's in_channels"
            ) from error
        raise
