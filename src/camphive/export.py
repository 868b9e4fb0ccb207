"""ONNX export checked against onnxruntime, and Conv-BatchNorm folding.

The export uses PyTorch's TorchScript-based exporter (``torch.onnx.export(...,
dynamo=False)``): the torch.export-based default of torch >= 2.9 needs ``onnxscript``,
which this project does not depend on. That exporter already folds a BatchNorm into the
convolution before it when the model is in eval mode; :func:`fold_batchnorm` does the
same on the PyTorch model itself, which is what speeds up PyTorch CPU inference.
"""
from __future__ import annotations

import copy
import os
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from camphive.conv_batchnorm import conv_batchnorm_pairs
from camphive.errors import CamphiveError, ConfigError, one_line
from camphive.modules import Inputs, as_input_tuple, eval_mode

# --------------------------------------------------------------------------- folding


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Return an eval-mode copy of ``model`` with each Conv->BN pair folded into the conv.

    For BN ``y = gamma * (z - mean) / sqrt(var + eps) + beta`` reading ``z = W x + b``,
    the conv becomes ``W' = W * s`` (per output channel, any ``groups``) and
    ``b' = (b - mean) * s + beta`` with ``s = gamma / sqrt(var + eps)`` (computed in float64),
    and the BN is replaced by ``nn.Identity``, so module names stay as they were. The copy
    equals the original in eval mode; it is meant for inference (no BN left to train).
    Pairs are those of :func:`conv_batchnorm_pairs`; the input model is not changed.
    """
    return _fold_copy(model)[0]


@torch.no_grad()
def _fold_copy(model: nn.Module) -> tuple[nn.Module, list[tuple[str, str]]]:
    folded = copy.deepcopy(model)
    pairs = conv_batchnorm_pairs(folded)
    modules = dict(folded.named_modules())
    for conv_name, bn_name in pairs:
        conv, bn = modules[conv_name], modules[bn_name]
        scale = bn.weight.double() if bn.affine else torch.ones_like(bn.running_var, dtype=torch.float64)
        scale = scale / torch.sqrt(bn.running_var.double() + bn.eps)
        shift = bn.bias.double() if bn.affine else torch.zeros_like(scale)
        bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
        weight_shape = (-1,) + (1,) * (conv.weight.dim() - 1)
        conv.weight.copy_((conv.weight.double() * scale.view(weight_shape)).to(conv.weight.dtype))
        new_bias = ((bias - bn.running_mean.double()) * scale + shift).to(conv.weight.dtype)
        if conv.bias is None:
            conv.bias = nn.Parameter(new_bias.to(conv.weight.device))
        else:
            conv.bias.copy_(new_bias)
        parent_name, _, child_name = bn_name.rpartition(".")
        setattr(modules[parent_name] if parent_name else folded, child_name, nn.Identity())
    return folded.eval(), pairs


# --------------------------------------------------------------------------- export


@dataclass
class ExportResult:
    """What was written and how closely onnxruntime reproduces PyTorch.

    ``max_abs_diff`` is the largest absolute difference over all outputs and all checked
    batches (``checked_batch_sizes``); None when ``check=False``.
    """

    path: str
    file_size_bytes: int
    opset: int
    dynamic_batch: bool
    folded_pairs: int
    max_abs_diff: float | None
    onnxruntime_version: str | None
    checked_batch_sizes: list[int] = field(default_factory=list)
    input_names: list[str] = field(default_factory=list)
    output_names: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    example_inputs: Inputs,
    *,
    opset: int = 17,
    check: bool = True,
    fold_batchnorm: bool = False,
    dynamic_batch: bool = True,
    atol: float = 1e-4,
) -> ExportResult:
    """Export ``model`` (in eval mode) to ONNX at ``path``, checked with onnxruntime.

    The file is written to a temporary name in the target folder and moved to ``path``
    only when the check passes, so a failed export leaves no broken file (and an older
    file at ``path`` untouched). The check runs the file in onnxruntime
    (CPUExecutionProvider) on ``example_inputs`` and, when ``dynamic_batch``, on a random
    batch of another size, and requires ``max |onnx - torch| <= atol``. Inputs are named
    ``input`` (``input_0``... for several), outputs ``output`` (``output_0``...); with
    ``dynamic_batch`` their first dimension is named ``batch``. The model stays on its
    device and keeps its training flags. Raises :class:`CamphiveError` (one line) when the
    path cannot be written, the export fails, or onnxruntime disagrees with PyTorch, and
    :class:`ExampleInputsError` (a :class:`ConfigError`) when the model cannot run on
    ``example_inputs`` (a wrong shape or dtype), before any file is created.
    """
    inputs = as_input_tuple(example_inputs)
    target = Path(path)
    if target.is_dir():
        raise CamphiveError(f"ONNX output path {str(target)!r} is a directory; give a file name such as model.onnx")
    # The parameter shadows the function of the same name here, hence _fold_copy.
    work_model, pairs = _fold_copy(model) if fold_batchnorm else (model, [])
    device = next((p.device for p in work_model.parameters()), inputs[0].device)
    inputs = tuple(x.to(device) for x in inputs)
    with eval_mode(work_model):
        # Before anything is written: inputs the model cannot take leave no file (nor folder).
        reference = _torch_outputs(work_model, inputs, _EXAMPLE_HINT)
    temporary = _temporary_file_beside(target)
    try:
        with eval_mode(work_model):
            input_names = ["input"] if len(inputs) == 1 else [f"input_{i}" for i in range(len(inputs))]
            output_names = ["output"] if len(reference) == 1 else [f"output_{i}" for i in range(len(reference))]
            dynamic_axes = {name: {0: "batch"} for name in input_names + output_names} if dynamic_batch else None
            _run_exporter(work_model, inputs, temporary, opset, input_names, output_names, dynamic_axes)
            max_diff, versions, batch_sizes = None, None, []
            if check:
                max_diff, versions, batch_sizes = _check_with_onnxruntime(
                    work_model, temporary, inputs, reference, input_names, dynamic_batch, atol
                )
        size = temporary.stat().st_size
        os.replace(temporary, target)
    except OSError as error:
        raise CamphiveError(f"cannot write ONNX file {str(target)!r}: {error.strerror or error}; choose a writable path") from error
    finally:
        temporary.unlink(missing_ok=True)
    return ExportResult(
        path=str(target), file_size_bytes=size, opset=opset, dynamic_batch=dynamic_batch,
        folded_pairs=len(pairs), max_abs_diff=max_diff, onnxruntime_version=versions,
        checked_batch_sizes=batch_sizes, input_names=input_names, output_names=output_names,
    )


def _temporary_file_beside(target: Path) -> Path:
    """An empty file in the target's folder (same file system, so ``os.replace`` is atomic)."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    except OSError as error:
        raise CamphiveError(
            f"cannot write ONNX file {str(target)!r}: {error.strerror or error}; choose a writable folder"
        ) from error
    os.close(handle)
    return Path(name)


class ExampleInputsError(ConfigError):
    """The model raised an error on the example inputs (their shape or dtype does not fit it)."""

    def __init__(self, message: str, shapes: list[tuple[int, ...]], detail: str) -> None:
        super().__init__(message)
        self.shapes = shapes  # the example inputs' shapes, batch dimension included
        self.detail = detail  # the model's own complaint, one line


_EXAMPLE_HINT = "pass example inputs of the shape and dtype the model was built for"
_OTHER_BATCH_HINT = (
    "the model runs on the example batch only, so its batch size is fixed; export with dynamic_batch=False"
)


@torch.inference_mode()
def _torch_outputs(model: nn.Module, inputs: tuple[torch.Tensor, ...], hint: str = _EXAMPLE_HINT) -> list[torch.Tensor]:
    try:
        output = model(*inputs)
    except torch.OutOfMemoryError:
        raise
    except (RuntimeError, ValueError, TypeError, IndexError) as error:
        # What a forward raises on inputs of the wrong shape or dtype; one line, not a traceback.
        shapes = [tuple(x.shape) for x in inputs]
        described = ", ".join(f"{tuple(x.shape)} {str(x.dtype).removeprefix('torch.')}" for x in inputs)
        detail = f"{type(error).__name__}: {one_line(str(error))[:200]}"
        raise ExampleInputsError(
            f"the model cannot run on inputs of shape {described} ({detail}); {hint}", shapes, detail
        ) from error
    outputs = [output] if isinstance(output, torch.Tensor) else output
    if not isinstance(outputs, (list, tuple)) or not all(isinstance(o, torch.Tensor) for o in outputs):
        raise CamphiveError(
            f"model output is a {type(output).__name__}; ONNX export supports a tensor or a tuple of tensors"
        )
    return [o.detach().cpu() for o in outputs]


def _run_exporter(model, inputs, temporary: Path, opset, input_names, output_names, dynamic_axes) -> None:
    try:
        with warnings.catch_warnings():
            # The TorchScript exporter warns that it is deprecated on every call; that is known.
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                model, inputs, str(temporary), dynamo=False, opset_version=opset,
                input_names=input_names, output_names=output_names, dynamic_axes=dynamic_axes,
                do_constant_folding=True,
            )
    except OSError:
        raise
    except Exception as error:  # noqa: BLE001 - exporter errors come in many types
        message = one_line(str(error))[:300]
        raise CamphiveError(
            f"ONNX export (opset {opset}) failed: {type(error).__name__}: {message}; "
            "try another opset or replace the unsupported operation"
        ) from error


def _check_with_onnxruntime(model, file: Path, inputs, reference, input_names, dynamic_batch, atol):
    """Largest |onnxruntime - torch| over the example batch and, if dynamic, a batch of another size."""
    import onnx
    import onnxruntime

    try:
        onnx.checker.check_model(str(file))
    except onnx.checker.ValidationError as error:
        raise CamphiveError(f"exported ONNX file is not valid: {one_line(str(error))[:300]}") from error
    session = onnxruntime.InferenceSession(str(file), providers=["CPUExecutionProvider"])
    batches = [(inputs, reference)]
    if dynamic_batch and inputs[0].dim() > 0:
        other = _random_like_with_batch(inputs, 2 if inputs[0].shape[0] != 2 else 3)
        batches.append((other, _torch_outputs(model, other, _OTHER_BATCH_HINT)))
    max_diff = 0.0
    checked = []
    for batch_inputs, expected in batches:
        feeds = {name: x.detach().cpu().numpy() for name, x in zip(input_names, batch_inputs)}
        produced = session.run(None, feeds)
        for got, want in zip(produced, expected):
            if tuple(got.shape) != tuple(want.shape):
                raise CamphiveError(
                    f"onnxruntime output shape {tuple(got.shape)} differs from torch {tuple(want.shape)} "
                    f"at batch size {batch_inputs[0].shape[0]}; export with dynamic_batch=False or fix the model's reshapes"
                )
            max_diff = max(max_diff, float((torch.from_numpy(got).double() - want.double()).abs().max()) if want.numel() else 0.0)
        checked.append(int(batch_inputs[0].shape[0]))
    if not max_diff <= atol:  # also catches NaN
        raise CamphiveError(
            f"onnxruntime output differs from torch by {max_diff:.3g} (> atol {atol:g}) at batch sizes {checked}; "
            "the ONNX file was not written"
        )
    return max_diff, onnxruntime.__version__, checked


def _random_like_with_batch(inputs, batch_size: int) -> tuple[torch.Tensor, ...]:
    """Random inputs shaped like ``inputs`` but with ``batch_size`` rows (fixed seed)."""
    generator = torch.Generator().manual_seed(0)
    batch = []
    for x in inputs:
        shape = (batch_size, *x.shape[1:])
        if x.is_floating_point():
            value = torch.randn(shape, generator=generator).to(x.dtype)
        else:  # integer inputs (indices): stay within the example's range
            low, high = int(x.min()), int(x.max())
            value = torch.randint(low, high + 1, shape, generator=generator).to(x.dtype)
        batch.append(value.to(x.device))
    return tuple(batch)
