"""Collectives camphive needs: sums and means over processes, rank-0 decisions shared, agreement checks.

Every function is a no-op (or returns its input) when no group of more than one process runs.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
import torch.distributed as dist

from camphive.distributed.group import is_distributed, is_main_process, rank, world_size
from camphive.errors import CamphiveError, ConfigError, NumericalError


def collective_device() -> torch.device:
    """Where tensors must be to be reduced: the CPU under gloo, the process's GPU under NCCL alone."""
    backend = str(dist.get_backend()).lower()
    if "gloo" in backend or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Reduce ``tensor`` in place over all processes (``op``: sum, max, min); returns it."""
    if is_distributed():
        dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op])
    return tensor


def all_reduce_tensors(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Sum each tensor over all processes in one collective (one dtype and device); new tensors, same shapes."""
    tensors = list(tensors)
    if not is_distributed() or not tensors:
        return tensors
    flat = all_reduce_(torch.cat([tensor.reshape(-1) for tensor in tensors]))
    return [piece.view_as(tensor) for piece, tensor in zip(torch.split(flat, [t.numel() for t in tensors]), tensors)]


def all_reduce_numbers(values: Sequence[float], op: str = "sum", dtype: torch.dtype = torch.float64) -> list[float]:
    """Reduce a few Python numbers in one collective (counts stay exact below 2**53)."""
    if not is_distributed():
        return list(values)
    tensor = torch.tensor(list(values), dtype=dtype, device=collective_device())
    return all_reduce_(tensor, op).tolist()


def all_reduce_int(value: int, op: str = "sum") -> int:
    return int(all_reduce_numbers([value], op, torch.int64)[0])


def reduce_mean_(tensor: torch.Tensor, local_count: int, total_count: int) -> torch.Tensor:
    """Turn this process's mean over ``local_count`` samples into the mean over all ``total_count``, in place."""
    if is_distributed():
        tensor.mul_(local_count / total_count)
        all_reduce_(tensor)
    return tensor


def resolve(distributed: bool | None) -> bool:
    """The ``distributed=`` option of the API: ``None`` = reduce when a group runs; ``True`` requires one."""
    if distributed is None:
        return is_distributed()
    if distributed and not is_distributed():
        raise ConfigError("distributed=True but no process group of more than one process runs; launch with torchrun "
                          "and call camphive.distributed.init_from_environment(), or pass distributed=None")
    return bool(distributed)


def broadcast_object(value=None, src: int = 0):
    """Rank ``src``'s ``value`` on every process (pickled)."""
    if not is_distributed():
        return value
    box = [value if rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def on_rank_zero(function: Callable[[], object]):
    """Run ``function`` on rank 0 only and give its result to every process.

    A :class:`CamphiveError` raised there is raised on every process, so all of them stop
    with the same one-line message instead of waiting forever for rank 0.
    """
    if not is_distributed():
        return function()
    outcome = None
    if is_main_process():
        try:
            outcome = ("ok", function())
        except CamphiveError as error:
            outcome = ("error", error)
        except Exception as error:  # anything else: tell the others, then fail with the traceback here
            broadcast_object(("error", CamphiveError(f"rank 0 failed: {type(error).__name__}: {error}")))
            raise
    kind, value = broadcast_object(outcome)
    if kind == "error":
        raise value
    return value


def all_gather_rows(tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Concatenate every process's ``tensor`` along ``dim`` in rank order (sizes along ``dim`` may differ)."""
    if not is_distributed():
        return tensor
    sizes = [int(size) for size in all_gather_numbers(tensor.shape[dim])]
    padded_shape = list(tensor.shape)
    padded_shape[dim] = max(sizes)
    padded = tensor.new_zeros(padded_shape)
    padded.narrow(dim, 0, tensor.shape[dim]).copy_(tensor)
    pieces = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(pieces, padded.contiguous())
    return torch.cat([piece.narrow(dim, 0, size) for piece, size in zip(pieces, sizes)], dim=dim)


def all_gather_numbers(value: float) -> list[float]:
    if not is_distributed():
        return [value]
    pieces = [torch.zeros(1, dtype=torch.float64, device=collective_device()) for _ in range(world_size())]
    dist.all_gather(pieces, torch.tensor([float(value)], dtype=torch.float64, device=collective_device()))
    return [float(piece) for piece in pieces]


def fingerprint(tensor: torch.Tensor) -> torch.Tensor:
    """``(3,)`` float64: size, sum and a position-weighted sum; equal tensors give equal fingerprints."""
    values = tensor.detach().reshape(-1).to(torch.float64)
    weights = torch.arange(values.numel(), device=values.device, dtype=torch.int64).remainder_(9973).add_(1).to(torch.float64)
    return torch.stack([torch.tensor(float(values.numel()), dtype=torch.float64, device=values.device),
                        values.sum(), (values * weights).sum()])


def check_same_on_all_ranks(tensors: Mapping[str, torch.Tensor], what: str) -> None:
    """Raise :class:`NumericalError` naming the first tensor that differs between processes.

    Two collectives of ``3 x len(tensors)`` numbers (no tensor is sent): processes that should
    have made the same decision from the same reduced quantities are checked to have done so.
    """
    if not is_distributed():
        return
    names = list(tensors)
    counts = all_reduce_numbers([len(names), -len(names)], "max")
    if counts[0] != -counts[1]:
        raise NumericalError(f"{what}: the processes hold different numbers of tensors ({-counts[1]:.0f} to {counts[0]:.0f})")
    if not names:
        return
    prints = torch.stack([fingerprint(tensors[name]).cpu() for name in names]).to(collective_device())
    high, low = all_reduce_(prints.clone(), "max"), -all_reduce_(-prints, "max")
    differing = [name for name, same in zip(names, (high == low).all(dim=1).tolist()) if not same]
    if differing:
        raise NumericalError(
            f"{what} differ between processes for {differing[0]!r} ({len(differing)} tensor(s)); the processes did not "
            "start from the same model and data: use the same checkpoint, seed and calibration data on every rank"
        )


def broadcast_buffers(model: torch.nn.Module, src: int = 0) -> None:
    """Give every process rank ``src``'s buffers (BatchNorm running statistics), in place."""
    if is_distributed():
        for buffer in model.buffers():
            dist.broadcast(buffer.data, src=src)


def wrap_model(model: torch.nn.Module, device: torch.device):
    """``DistributedDataParallel`` around ``model`` (which keeps its own name for state dicts)."""
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, output_device=device.index if ids else None)


