"""Pruned models in a compressed file: each pruned weight as a packed bitmask plus its kept values.

One ``.safetensors`` file (nothing in it is executed on load):

- a weight stored sparse is two tensors, ``NAME:bits`` (uint8: the keep mask flattened in
  row-major order and packed eight to a byte by ``np.packbits``, most significant bit first)
  and ``NAME:values`` (the kept entries in that order, in the values dtype);
- every other tensor is stored under its own name as it is (BatchNorm, biases, buffers; a
  weight too dense for the bitmask to pay, in the values dtype).

The header's metadata has one key, the format and its version (``camphive-sparse-1``), whose
value is compact JSON: ``fingerprint`` (the first 16 hex digits of the SHA-256 of every
state-dict name and shape: the architecture), ``tensors`` (shape, dtype and encoding of each
tensor not stored as it is), ``arch`` when the model was made by ``camphive.models.create``,
and the caller's metadata. (A key, not a field, names the format: the header stays smaller
than the dense checkpoint's even for a model of one tensor.)

Each weight takes whichever of dense and bitmask + values is smaller, header entries counted,
so the file is never larger than the dense float32 checkpoint ``save_checkpoint`` writes for
the same model and metadata (measured with :func:`dense_checkpoint_bytes`).
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from camphive.checkpoints import FORMAT as CHECKPOINT_FORMAT
from camphive.checkpoints import Checkpoint, _read_header
from camphive.errors import CheckpointError, ConfigError
from camphive.runs import atomic_write_bytes
from camphive.semi_structured import SemiStructuredResult, to_semi_structured  # noqa: F401  (GPU twin of to_sparse_csr)
from camphive.sparse_csr import CSR_MIN_SPARSITY, CSR_MIN_WEIGHTS, CSRConv1x1, CSRLinear, to_sparse_csr  # noqa: F401

FORMAT_FAMILY = "camphive-sparse-"
FORMAT = FORMAT_FAMILY + "1"
BITS, VALUES = ":bits", ":values"
VALUES_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPE_NAMES = {dtype: str(dtype).removeprefix("torch.") for dtype in (
    torch.float64, torch.float32, torch.float16, torch.bfloat16)}
DTYPES_BY_NAME = {name: dtype for dtype, name in DTYPE_NAMES.items()}
REWRITE = "write it again with camphive export --format sparse"
RESERVED_KEYS = ("fingerprint", "tensors", "arch")
ENTRY_BYTES = 120  # header bytes a bitmask weight adds beyond its record: a second entry, names' suffixes


@dataclass
class SparseFile:
    """What :func:`save_sparse` wrote: sizes in bytes, and how many weights were stored sparse."""

    path: Path
    file_bytes: int
    dense_bytes: int
    values_dtype: str
    sparse_tensors: int

    @property
    def ratio(self) -> float:
        """File size over the dense float32 checkpoint's (0.1 = ten times smaller)."""
        return self.file_bytes / self.dense_bytes

    def to_dict(self) -> dict:
        return {"path": str(self.path), "file_bytes": self.file_bytes, "dense_bytes": self.dense_bytes,
                "ratio": self.ratio, "values_dtype": self.values_dtype, "sparse_tensors": self.sparse_tensors}


def save_sparse(model: nn.Module, path: str | Path, *, masks: dict[str, torch.Tensor] | None = None,
                dtype: str = "float32", metadata: dict | None = None) -> SparseFile:
    """Write ``model`` compressed to ``path``, atomically; return the sizes written.

    Weights (floating parameters of two or more dimensions, and every tensor named in
    ``masks``) are stored as bitmask + values or dense, whichever is smaller. The bitmask is
    ``masks[name]`` (bool, True = kept) when given, else the weight's non-zero entries; the
    weight must be zero wherever its mask is False (apply the masks first). ``dtype``: the
    values' dtype; ``"float32"`` keeps every value exactly as it is, ``"float16"`` or
    ``"bfloat16"`` halves the weights (other tensors stay as they are). Under torchrun only
    rank 0 writes.
    """
    data, sparse = _encode(model, masks, dtype, metadata)
    written = atomic_write_bytes(path, data)
    return SparseFile(path=written, file_bytes=len(data), dense_bytes=dense_checkpoint_bytes(model, metadata),
                      values_dtype=dtype, sparse_tensors=sparse)


def sparse_file_bytes(model: nn.Module, *, masks: dict[str, torch.Tensor] | None = None,
                      dtype: str = "float32") -> int:
    """Size in bytes of the file :func:`save_sparse` would write for ``model`` (nothing is written)."""
    return len(_encode(model, masks, dtype, None)[0])


def _encode(model: nn.Module, masks: dict | None, dtype: str, metadata: dict | None) -> tuple[bytes, int]:
    """The sparse file's bytes, and how many weights it stores as bitmask + values."""
    if dtype not in VALUES_DTYPES:
        raise ConfigError(f"values dtype {dtype!r} is not supported; choose one of {', '.join(VALUES_DTYPES)}")
    metadata = dict(metadata or {})
    reserved = sorted(set(metadata) & set(RESERVED_KEYS))
    if reserved:
        raise ConfigError(f"sparse file metadata may not set {', '.join(reserved)}; camphive records those itself")
    state = {name: value.detach().cpu() for name, value in model.state_dict().items()}
    clashing = [name for name in state if name.endswith((BITS, VALUES))]
    if clashing:
        raise ConfigError(f"tensor name {clashing[0]!r} ends like the sparse format's own entries; rename it to "
                          "save sparse")
    weight_masks = _weight_masks(model, state, masks)
    tensors, records = {}, {}
    for name, value in state.items():
        if name in weight_masks:
            entries, record = _encode_weight(name, value, weight_masks[name], VALUES_DTYPES[dtype])
        else:
            entries, record = {name: value.contiguous().clone()}, None  # clone: tied weights share storage
        tensors.update(entries)
        if record is not None:
            records[name] = record
    header = {"fingerprint": _fingerprint({name: value.shape for name, value in state.items()})}
    if records:
        header["tensors"] = records
    arch = getattr(model, "camphive_arch", None)
    if arch is not None:
        header["arch"] = arch
    data = save_safetensors(tensors, metadata={FORMAT: _compact_json({**header, **metadata})})
    return data, sum(1 for record in records.values() if record["encoding"] == "bitmask")


def dense_checkpoint_bytes(model: nn.Module, metadata: dict | None = None) -> int:
    """Size in bytes of the checkpoint ``save_checkpoint(path, model, **metadata)`` writes (no masks)."""
    tensors = {"model." + name: value.detach().cpu().contiguous() for name, value in model.state_dict().items()}
    header = {"format": CHECKPOINT_FORMAT, "arch": getattr(model, "camphive_arch", None), **(metadata or {})}
    return len(save_safetensors(tensors, metadata={"camphive": json.dumps(header, default=str)}))


def read_sparse(path_or_file) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    """Return ``(state_dict, masks, metadata)`` from a sparse file: a path or a binary file object.

    ``masks`` holds the keep mask (bool, True = kept) of every weight stored as bitmask +
    values; a weight pruned too little for the bitmask to pay was stored dense and has none
    (its pruned entries are still zeros). Pruned entries come back as +0.0. Tensors come
    back in the dtype they were saved from. Anything truncated, corrupt or not written by
    :func:`save_sparse` is a one-line :class:`CheckpointError`.
    """
    label, data = _read_bytes(path_or_file)
    corrupt = f"sparse file {label} is truncated or corrupt"
    try:
        header = _read_header(data)
        tensors = load_safetensors(data)
    except (SafetensorError, ValueError, OSError, RuntimeError) as error:
        raise CheckpointError(f"{corrupt} ({_first_line(error)}); {REWRITE}") from error
    metadata = _camphive_metadata(header, label)
    try:
        state, masks = _decode(tensors, metadata.get("tensors", {}))
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as error:
        raise CheckpointError(f"{corrupt} ({_first_line(error)}); {REWRITE}") from error
    if _fingerprint({name: value.shape for name, value in state.items()}) != metadata.get("fingerprint"):
        raise CheckpointError(f"{corrupt}: its tensors do not match the architecture fingerprint it records; {REWRITE}")
    return state, masks, {key: value for key, value in metadata.items() if key not in ("fingerprint", "tensors")}


def load_sparse(path_or_file, model: nn.Module | None = None) -> Checkpoint:
    """Load a sparse file into ``model`` (same architecture), or into the architecture it records.

    Returns a :class:`camphive.checkpoints.Checkpoint` (``model``, ``masks``, ``metadata``);
    the model keeps its device. A model whose state-dict names or shapes differ from the
    file's is refused with a one-line :class:`CheckpointError` naming the first difference.
    Structurally pruned architectures are rebuilt to the stored shapes when ``model`` is None.
    """
    from camphive import models

    state, masks, metadata = read_sparse(path_or_file)
    label = _label(path_or_file)
    if model is None:
        arch = metadata.get("arch")
        if not arch:
            raise CheckpointError(f"sparse file {label} records no architecture; load it with "
                                  "camphive.load_sparse(path, model=YourModel())")
        try:
            model = models.from_arch(arch)
        except Exception as error:  # an unknown or changed architecture name
            raise CheckpointError(f"sparse file {label} records architecture {arch} that cannot be built: "
                                  f"{_first_line(error)}") from error
        model = models.rebuild_to_state_dict_shapes(model, state)
    expected = {name: tuple(value.shape) for name, value in model.state_dict().items()}
    difference = _first_difference({name: tuple(value.shape) for name, value in state.items()}, expected)
    if difference:
        raise CheckpointError(f"sparse file {label} does not fit the model: {difference}; load it into the "
                              "architecture it was saved from")
    model.load_state_dict(state, strict=True)
    return Checkpoint(model=model, masks=masks, metadata=metadata)


def _weight_masks(model: nn.Module, state: dict, masks: dict | None) -> dict[str, torch.Tensor]:
    """The keep mask of every weight to store sparse: from ``masks``, else the non-zero entries."""
    masks = dict(masks or {})
    for name, mask in masks.items():
        if name not in state or state[name].dtype not in DTYPE_NAMES:
            raise ConfigError(f"mask for {name!r} names no floating tensor of the model; keys must come from "
                              "model.named_parameters()")
        if tuple(mask.shape) != tuple(state[name].shape) or mask.dtype != torch.bool:
            raise ConfigError(f"mask for {name!r} must be a bool tensor of shape {tuple(state[name].shape)}, got "
                              f"{mask.dtype} {tuple(mask.shape)}")
        if bool((state[name][~mask.cpu()] != 0).any()):
            raise ConfigError(f"{name} is non-zero where its mask is False; apply the masks to the model before saving")
    weights = {name for name, parameter in model.named_parameters()
               if parameter.dim() >= 2 and parameter.dtype in DTYPE_NAMES}
    return {name: masks[name].cpu() if name in masks else state[name] != 0
            for name in state if name in masks or name in weights}


def _encode_weight(name: str, value: torch.Tensor, mask: torch.Tensor, values_dtype: torch.dtype):
    """``(safetensors entries, header record or None)`` for one weight: the smallest storage, header bytes counted.

    The choices: as it is (no record), dense in the values dtype, or bitmask + values.
    """
    # float32 keeps every value as it is (float64 too); a half dtype halves wider weights only.
    halve = values_dtype != torch.float32 and value.element_size() > values_dtype.itemsize
    stored_dtype = values_dtype if halve else value.dtype
    flat_mask = mask.reshape(-1)
    dense_record = {"encoding": "dense", "shape": list(value.shape), "dtype": DTYPE_NAMES[value.dtype]}
    sparse_record = {**dense_record, "encoding": "bitmask"}
    # Header bytes of a record: escaping can double its characters inside the safetensors header's JSON.
    costs = {"as is": value.numel() * value.element_size(),
             "bitmask": (math.ceil(flat_mask.numel() / 8) + int(flat_mask.sum()) * stored_dtype.itemsize
                         + 2 * len(_compact_json({name: sparse_record})) + ENTRY_BYTES + len(name))}
    if halve:
        costs["dense"] = value.numel() * stored_dtype.itemsize + 2 * len(_compact_json({name: dense_record}))
    choice = min(costs, key=costs.get)  # ties keep the first: as it is
    if choice == "bitmask":
        bits = torch.from_numpy(np.packbits(flat_mask.numpy()))
        values = value.reshape(-1)[flat_mask].to(stored_dtype).contiguous()
        return {name + BITS: bits, name + VALUES: values}, sparse_record
    if choice == "dense":
        return {name: value.to(stored_dtype).contiguous()}, dense_record
    return {name: value.contiguous().clone()}, None  # clone: tied weights share storage


def _decode(tensors: dict[str, torch.Tensor], records: dict) -> tuple[dict, dict]:
    """Rebuild the state dict (and the bitmask weights' masks) from the stored tensors and records."""
    state = {name: value for name, value in tensors.items()
             if name not in records and not name.endswith((BITS, VALUES))}
    masks = {}
    for name, record in records.items():
        dtype = DTYPES_BY_NAME[record["dtype"]]
        shape = [int(size) for size in record["shape"]]
        if record["encoding"] == "dense":
            if list(tensors[name].shape) != shape:
                raise ValueError(f"{name} has shape {list(tensors[name].shape)}, its record says {shape}")
            state[name] = tensors[name].to(dtype)
            continue
        bits, values, count = tensors[name + BITS], tensors[name + VALUES], math.prod(shape)
        if bits.dtype != torch.uint8 or bits.numel() != math.ceil(count / 8) or not values.is_floating_point():
            raise ValueError(f"{name} has a bitmask or values of the wrong kind")
        mask = torch.from_numpy(np.unpackbits(bits.numpy(), count=count).astype(bool))
        if int(mask.sum()) != values.numel():
            raise ValueError(f"{name} keeps {int(mask.sum())} entries but stores {values.numel()} values")
        dense = torch.zeros(count, dtype=dtype)
        dense[mask] = values.to(dtype)
        state[name], masks[name] = dense.reshape(shape), mask.reshape(shape)
    return state, masks


def _read_bytes(path_or_file) -> tuple[str, bytes]:
    label = _label(path_or_file)
    if hasattr(path_or_file, "read"):
        return label, path_or_file.read()
    path = Path(path_or_file)
    if not path.is_file():
        raise CheckpointError(f"sparse file {path} does not exist; write one with camphive export --format sparse")
    return label, path.read_bytes()


def _camphive_metadata(header: dict, label: str) -> dict:
    """The JSON metadata of a file written by :func:`save_sparse`, checked."""
    stored = header.get("__metadata__") or {}
    if FORMAT not in stored:
        newer = sorted(key for key in stored if key.startswith(FORMAT_FAMILY))
        if newer:
            raise CheckpointError(f"sparse file {label} has format {newer[0]}, this camphive reads {FORMAT}; "
                                  "upgrade camphive to read it")
        if _checkpoint_format(stored.get("camphive")) == CHECKPOINT_FORMAT:
            raise CheckpointError(f"{label} is a dense camphive checkpoint, not a sparse file; load it with "
                                  "camphive.load_checkpoint or compress it with camphive export --format sparse")
        raise CheckpointError(f"{label} is not a camphive sparse file (no {FORMAT} metadata); write one with "
                              "camphive export --format sparse")
    try:
        metadata = json.loads(stored[FORMAT])
    except json.JSONDecodeError:
        metadata = None
    if not isinstance(metadata, dict):
        raise CheckpointError(f"sparse file {label} has corrupt metadata; {REWRITE}")
    return metadata


def _checkpoint_format(raw) -> str | None:
    try:
        return json.loads(raw).get("format")
    except (TypeError, ValueError, AttributeError):
        return None


def _fingerprint(shapes: dict) -> str:
    """The architecture as state-dict names and shapes, hashed (16 hex digits)."""
    text = _compact_json(sorted([name, list(shape)] for name, shape in shapes.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _first_difference(stored: dict[str, tuple], expected: dict[str, tuple]) -> str | None:
    """The first name or shape that differs between the file's state dict and the model's, in words."""
    differing = [name for name in expected if name in stored and stored[name] != expected[name]]  # in model order
    missing = [name for name in expected if name not in stored]
    unexpected = [name for name in stored if name not in expected]
    count = len(differing) + len(missing) + len(unexpected)
    more = f" (and {count - 1} more differences)" if count > 1 else ""
    if differing:
        name = differing[0]
        return f"{name} has shape {list(stored[name])} in the file and {list(expected[name])} in the model{more}"
    if missing:
        return f"the model's {missing[0]} is not in the file{more}"
    if unexpected:
        return f"the file's {unexpected[0]} is not in the model{more}"
    return None


def _compact_json(value) -> str:
    try:
        return json.dumps(value, separators=(",", ":"), default=str)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"sparse file metadata is not JSON-serialisable: {error}") from error


def _label(path_or_file) -> str:
    if hasattr(path_or_file, "read"):
        return str(getattr(path_or_file, "name", "<file object>"))
    return str(path_or_file)


def _first_line(error: BaseException) -> str:
    return (str(error).splitlines() or [type(error).__name__])[0][:120]
