"""``camphive export``: a checkpoint to ONNX, checked against torch in onnxruntime."""
from __future__ import annotations

from pathlib import Path

import torch

from camphive import distributed
from camphive.checkpoints import load_checkpoint
from camphive.errors import ConfigError
from camphive.export import export_onnx


def export_job(*, checkpoint: str | Path, onnx: str | Path, input_shape: tuple[int, ...] | None = None,
               fold_batchnorm: bool = True, opset: int = 17, seed: int = 0) -> dict | None:
    """Export the model at ``checkpoint``; the input shape defaults to the one it records.

    Under torchrun rank 0 exports and checks; the other processes only load the checkpoint
    and return ``None``.
    """
    stored = load_checkpoint(checkpoint)
    shape = tuple(input_shape) if input_shape else tuple(stored.metadata.get("input_shape") or ())
    if not shape:
        raise ConfigError(f"checkpoint {checkpoint} does not record its input shape; pass --input-shape C,H,W")
    example = torch.randn((1, *shape), generator=torch.Generator().manual_seed(seed))
    if not distributed.is_main_process():
        return None
    result = export_onnx(stored.model, onnx, example, opset=opset, fold_batchnorm=fold_batchnorm)
    return result.to_dict()
