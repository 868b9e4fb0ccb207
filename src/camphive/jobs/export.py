"""``camphive export``: a checkpoint to ONNX, checked against torch in onnxruntime."""
from __future__ import annotations

from pathlib import Path

import torch

from camphive import distributed
from camphive.checkpoints import load_checkpoint
from camphive.errors import ConfigError
from camphive.export import ExampleInputsError, export_onnx


def export_job(*, checkpoint: str | Path, onnx: str | Path, input_shape: tuple[int, ...] | None = None,
               fold_batchnorm: bool = True, opset: int = 17, seed: int = 0) -> dict | None:
    """Export the model at ``checkpoint``; the input shape defaults to the one it records.

    ``input_shape`` is one sample's shape (``C,H,W``), without the batch dimension. A shape
    the model cannot take is a one-line :class:`ConfigError` naming the shape given and the
    one the checkpoint records, and no file is written. Under torchrun rank 0 exports and
    checks; the other processes only load the checkpoint and return ``None``.
    """
    stored = load_checkpoint(checkpoint)
    recorded = tuple(stored.metadata.get("input_shape") or ())
    shape = tuple(input_shape) if input_shape else recorded
    if not shape:
        raise ConfigError(f"checkpoint {checkpoint} does not record its input shape; pass --input-shape C,H,W")
    if any(size < 1 for size in shape):
        example = _as_option(recorded) if recorded else "3,32,32"
        raise ConfigError(f"--input-shape {_as_option(shape)} has a size below 1; pass positive sizes C,H,W, e.g. {example}")
    example = torch.randn((1, *shape), generator=torch.Generator().manual_seed(seed))
    if not distributed.is_main_process():
        return None
    try:
        result = export_onnx(stored.model, onnx, example, opset=opset, fold_batchnorm=fold_batchnorm)
    except ExampleInputsError as error:
        raise ConfigError(_shape_message(checkpoint, shape, recorded, given=bool(input_shape), cause=error)) from error
    return result.to_dict()


def _as_option(shape: tuple[int, ...]) -> str:
    return ",".join(str(size) for size in shape)


def _shape_message(checkpoint, shape, recorded, *, given: bool, cause: ExampleInputsError) -> str:
    detail = cause.detail
    if not given:
        return (f"checkpoint {checkpoint} records input shape {_as_option(shape)}, which its model does not accept "
                f"({detail}); pass --input-shape C,H,W with the shape the model was trained on")
    if recorded and tuple(recorded) != tuple(shape):
        fix = f"pass --input-shape {_as_option(recorded)} (recorded in the checkpoint) or leave it out"
    else:
        fix = "pass --input-shape C,H,W with the shape the model was trained on"
    return f"--input-shape {_as_option(shape)} does not fit the model in {checkpoint} ({detail}); {fix}"
