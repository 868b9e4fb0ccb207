"""Checkpoints that rebuild themselves and never execute code on load.

One ``.safetensors`` file holds the weights (``model.*``), the masks (``mask.*``, bool) and,
in its header, JSON metadata: the architecture (as given to ``camphive.models.create``),
classes, input shape, dataset and whatever else the run adds. A structurally pruned model is
rebuilt by creating the architecture and then resizing its layers to the stored shapes.
Training state for resuming (optimizer, scheduler) lives beside it in a ``.pt`` file loaded
with ``weights_only=True``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from camphive.errors import CheckpointError
from camphive.runs import atomic_write_bytes

FORMAT = "camphive-checkpoint-1"
MODEL_PREFIX = "model."
MASK_PREFIX = "mask."


@dataclass
class Checkpoint:
    model: nn.Module
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)


def save_checkpoint(path: str | Path, model: nn.Module, masks: dict | None = None, **metadata) -> Path:
    """Write ``model`` (and ``masks``) atomically to ``path`` with JSON ``metadata``.

    The architecture is taken from ``model.camphive_arch`` when the model was made by
    ``camphive.models.create``; a user's own model is saved too, and reloads with
    ``load_checkpoint(path, model=MyModel())``. Under torchrun only rank 0 writes.
    """
    tensors = {MODEL_PREFIX + name: value.detach().cpu().contiguous().clone()
               for name, value in model.state_dict().items()}
    for name, mask in (masks or {}).items():
        tensors[MASK_PREFIX + name] = mask.detach().cpu().to(torch.bool).contiguous()
    header = {"format": FORMAT, "arch": getattr(model, "camphive_arch", None), **metadata}
    try:
        text = json.dumps(header, default=str)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"checkpoint metadata is not JSON-serialisable: {error}") from error
    data = save_safetensors(tensors, metadata={"camphive": text})
    return atomic_write_bytes(path, data)


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    """Return ``(state_dict, masks, metadata)`` from a checkpoint file, checked."""
    path = Path(path)
    if path.is_dir():
        candidate = path / "model.safetensors"
        if not candidate.is_file():
            raise CheckpointError(f"no checkpoint in folder {path}: expected {candidate.name}; pass the .safetensors file")
        path = candidate
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; pass the model.safetensors written by camphive train or prune")
    data = path.read_bytes()
    try:
        tensors = load_safetensors(data)
        header = _read_header(data)
    except (SafetensorError, ValueError, OSError, RuntimeError) as error:
        raise CheckpointError(
            f"checkpoint {path} is truncated or not a safetensors file ({str(error).splitlines()[0][:120]}); "
            "re-create it with camphive train or prune"
        ) from error
    raw = header.get("__metadata__", {}).get("camphive")
    if raw is None:
        metadata = {}
    else:
        try:
            metadata = json.loads(raw)
        except json.JSONDecodeError as error:
            raise CheckpointError(f"checkpoint {path} has corrupt metadata; re-create it") from error
    state = {name[len(MODEL_PREFIX):]: value for name, value in tensors.items() if name.startswith(MODEL_PREFIX)}
    masks = {name[len(MASK_PREFIX):]: value for name, value in tensors.items() if name.startswith(MASK_PREFIX)}
    if not state and tensors and raw is None:
        state = tensors  # a plain safetensors state dict from elsewhere
    if not state:
        raise CheckpointError(f"checkpoint {path} holds no model weights; pass a checkpoint written by camphive")
    return state, masks, metadata


def _read_header(data: bytes) -> dict:
    if len(data) < 8:
        raise ValueError("file shorter than a safetensors header")
    size = int.from_bytes(data[:8], "little")
    if size > len(data) - 8:
        raise ValueError("header runs past the end of the file")
    return json.loads(data[8 : 8 + size])


def load_checkpoint(path: str | Path, model: nn.Module | None = None, map_location="cpu") -> Checkpoint:
    """Rebuild the model stored at ``path`` (or load into ``model``), with masks and metadata.

    Shapes that differ from the freshly created architecture (channels removed by structured
    pruning) are rebuilt from the stored tensors; nothing stored is ever executed.
    """
    from camphive import models

    state, masks, metadata = read_checkpoint(path)
    if model is None:
        arch = metadata.get("arch")
        if not arch:
            raise CheckpointError(
                f"checkpoint {path} does not record its architecture; load it in Python with "
                "camphive.load_checkpoint(path, model=YourModel())"
            )
        arch = dict(arch)
        try:
            model = models.create(arch.pop("name"), **arch)
        except Exception as error:  # an unknown or changed architecture name
            raise CheckpointError(f"checkpoint {path} records architecture {metadata.get('arch')} that cannot be built: {error}") from error
    classes_before = _output_features(model)
    model = models.rebuild_to_state_dict_shapes(model, state)
    classes_after = _output_features(model)
    if classes_before != classes_after:
        raise CheckpointError(
            f"checkpoint {path} does not fit the model: it was saved with {classes_after} outputs, the model has "
            f"{classes_before}; create the model with num_classes={classes_after}"
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        first = next((line.strip() for line in str(error).splitlines()[1:] if line.strip()), str(error))
        raise CheckpointError(
            f"checkpoint {path} does not fit the model ({first[:160]}); it was saved from another architecture or class count"
        ) from error
    parameters = dict(model.named_parameters())
    for name, mask in masks.items():
        if name not in parameters or parameters[name].shape != mask.shape:
            raise CheckpointError(f"checkpoint {path} has a mask for {name!r} that fits no parameter; the file is inconsistent")
    model.to(map_location)
    return Checkpoint(model=model, masks={name: mask.to(map_location) for name, mask in masks.items()}, metadata=metadata)


def _output_features(model: nn.Module) -> int | None:
    """Outputs of the last linear layer (the classifier; structured pruning never changes it)."""
    linears = [module for module in model.modules() if isinstance(module, nn.Linear)]
    return linears[-1].out_features if linears else None


def save_training_state(path: str | Path, state: dict) -> Path:
    """Write resumable training state (tensors and plain data only) atomically."""
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    return atomic_write_bytes(path, buffer.getvalue())


def load_training_state(path: str | Path) -> dict:
    """Read training state with ``weights_only=True``: nothing in the file is executed."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(
            f"training state {path} cannot be read safely ({str(error).splitlines()[0][:120]}); start the run again without --resume"
        ) from error
