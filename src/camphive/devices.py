"""Device selection: ``auto`` uses CUDA when present."""
from __future__ import annotations

import os

import torch

from camphive.errors import ConfigError


def processes_on_this_node() -> int:
    """How many processes torchrun started on this machine (``LOCAL_WORLD_SIZE``; ``WORLD_SIZE``
    when a launcher sets only that; 1 outside torchrun). The same on every process of a node."""
    for name in ("LOCAL_WORLD_SIZE", "WORLD_SIZE"):
        value = os.environ.get(name, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


def gpu_for_each_process() -> bool:
    """Whether CUDA is here with at least one GPU for each process on this node (then each
    process takes the GPU of its local rank; otherwise the processes run on the CPU)."""
    return torch.cuda.is_available() and processes_on_this_node() <= torch.cuda.device_count()


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """Turn ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"`` or a device into a ``torch.device``.

    ``"auto"`` is CUDA when present, unless torchrun started more processes on this machine
    than it has GPUs: then the CPU (say, two CPU processes on a laptop with one GPU).
    """
    if isinstance(device, torch.device):
        return device
    if device is None or device == "auto":
        return torch.device("cuda" if gpu_for_each_process() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ConfigError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for, but CUDA is not available here; use --device cpu or auto")
    return resolved


def cpu_vector_floats() -> int:
    """Float32 values in one vector register as torch dispatches this CPU's kernels: 16 with
    AVX-512, else 8 (AVX2 and the rest). oneDNN convolutions and ONNX Runtime block channels by
    it, so channel counts off its multiples are padded up (``ATEN_CPU_CAPABILITY=avx2`` lowers it)."""
    return 16 if torch.backends.cpu.get_cpu_capability().upper().startswith("AVX512") else 8
