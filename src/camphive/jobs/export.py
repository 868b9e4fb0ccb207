"""``camphive export``: a checkpoint to ONNX (checked against torch in onnxruntime) or to a compressed sparse file."""
from __future__ import annotations

from pathlib import Path

import torch

from camphive import distributed
from camphive.checkpoints import load_checkpoint
from camphive.errors import ConfigError
from camphive.export import ExampleInputsError, export_onnx
from camphive.sparse_format import RESERVED_KEYS, VALUES_DTYPES, read_sparse, save_sparse

FORMATS = ("onnx", "sparse")


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


def export_target(checkpoint: str | Path, output_format: str | None, onnx: str | Path | None, sparse: str | Path | None,
                  values_dtype: str = "float32") -> tuple[str, Path]:
    """``(format, file to write)`` from the export options, checked before anything is read or written.

    The format defaults to ``sparse`` when only ``sparse`` is given, else ``onnx``; the sparse
    file defaults to ``NAME.sparse.safetensors`` beside the checkpoint.
    """
    if output_format is None:
        output_format = "sparse" if sparse is not None and onnx is None else "onnx"
    if output_format not in FORMATS:
        raise ConfigError(f"--format {output_format!r} is not known; choose onnx or sparse")
    if values_dtype not in VALUES_DTYPES:
        raise ConfigError(f"--values-dtype {values_dtype!r} is not supported; choose one of {', '.join(VALUES_DTYPES)}")
    if output_format == "onnx":
        if sparse is not None or values_dtype != "float32":
            raise ConfigError("--sparse and --values-dtype apply to --format sparse; leave them out for ONNX")
        if onnx is None:
            raise ConfigError("pass --onnx PATH (the ONNX file to write), or --format sparse for a compressed "
                              "checkpoint")
        return output_format, Path(onnx)
    if onnx is not None:
        raise ConfigError("--onnx applies to --format onnx; pass --sparse PATH for the sparse file")
    checkpoint = Path(checkpoint)
    if sparse is not None:
        target = Path(sparse)
    elif checkpoint.is_dir():
        target = checkpoint / "model.sparse.safetensors"
    else:
        target = checkpoint.with_name(checkpoint.name.removesuffix(".safetensors") + ".sparse.safetensors")
    if target.resolve() == checkpoint.resolve():
        raise ConfigError(f"--sparse {target} is the checkpoint itself; choose another file so the checkpoint is kept")
    return output_format, target


def export_sparse_job(*, checkpoint: str | Path, sparse: str | Path, values_dtype: str = "float32") -> dict | None:
    """Write the model at ``checkpoint`` (with its masks and metadata) as a sparse file, and read it back.

    Returns the sizes (``file_bytes``, ``dense_bytes`` of the dense float32 checkpoint,
    ``ratio``) and ``max_abs_diff``, the largest difference between the weights read back
    and the checkpoint's (0 with float32 values). Under torchrun rank 0 writes and checks;
    the other processes return ``None``.
    """
    stored = load_checkpoint(checkpoint)
    if not distributed.is_main_process():
        return None
    metadata = {key: value for key, value in stored.metadata.items() if key not in ("format", *RESERVED_KEYS)}
    written = save_sparse(stored.model, sparse, masks=stored.masks or None, dtype=values_dtype, metadata=metadata)
    state, _, _ = read_sparse(written.path)
    original = {name: value.detach().cpu() for name, value in stored.model.state_dict().items()
                if value.numel() and value.is_floating_point()}
    difference = max((float((state[name].float() - value.float()).abs().max()) for name, value in original.items()),
                     default=0.0)
    return {**written.to_dict(), "max_abs_diff": difference}
