"""The process group: started from torchrun's environment, one GPU per process, the CLI hook."""
from __future__ import annotations

import atexit
import contextlib
import datetime
import os
import sys
from collections.abc import Iterator

import torch
import torch.distributed as dist

from camphive.devices import gpu_for_each_process, processes_on_this_node
from camphive.errors import ConfigError

BACKEND_VARIABLE = "CAMPHIVE_DIST_BACKEND"  # overrides the backend, e.g. "gloo" on a GPU machine
_OWNS_GPU: bool | None = None  # set when camphive starts the group: whether this process took a GPU


def launched() -> bool:
    """True when the environment describes more than one process (set by torchrun)."""
    return _env_int("WORLD_SIZE", 1) > 1


def is_distributed() -> bool:
    """True when a process group of more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    return _env_int("LOCAL_RANK", 0) if is_distributed() else 0


def is_main_process() -> bool:
    return rank() == 0


def init_from_environment(backend: str | None = None, timeout_minutes: float = 30.0) -> bool:
    """Start the process group described by torchrun's variables; return whether one runs.

    Idempotent: a group already started (by camphive or by the caller) is kept. The backend is
    ``"cpu:gloo,cuda:nccl"`` when CUDA has a GPU for each process of this node (so CPU and GPU
    tensors both work; each process takes the GPU of its local rank), else gloo;
    ``$CAMPHIVE_DIST_BACKEND`` or ``backend`` overrides it.
    """
    if dist.is_available() and dist.is_initialized():
        return is_distributed()
    if not launched():
        return False
    if not dist.is_available():
        raise ConfigError("WORLD_SIZE > 1 but this torch build has no torch.distributed; run one process")
    missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise ConfigError(f"WORLD_SIZE is set but {', '.join(missing)} is not; launch with torchrun --nproc_per_node=N -m camphive ...")
    local = _env_int("LOCAL_RANK", 0)
    global _OWNS_GPU
    # Every process of a node decides alike (same GPU and process counts), so they agree on the backend;
    # with more processes than GPUs they run on the CPU (gloo) and a job asking for CUDA is refused then.
    _OWNS_GPU = gpu_for_each_process() and local < torch.cuda.device_count()
    if _OWNS_GPU:
        torch.cuda.set_device(local)
    chosen = backend or os.environ.get(BACKEND_VARIABLE) or ("cpu:gloo,cuda:nccl" if _OWNS_GPU else "gloo")
    dist.init_process_group(backend=chosen, rank=_env_int("RANK", 0), world_size=_env_int("WORLD_SIZE", 1),
                            timeout=datetime.timedelta(minutes=timeout_minutes))
    atexit.register(shutdown)
    return True


def shutdown(wait_for_others: bool = True) -> None:
    """Destroy the process group (a no-op when none runs).

    ``wait_for_others``: first wait until every process gets here. Rank 0 hosts the
    rendezvous store, and a process still using it when rank 0 tears it down can abort at
    exit (seen with gloo, about one run in three). After an error on this process, pass
    False: the others may never arrive.
    """
    if dist.is_available() and dist.is_initialized():
        try:
            if wait_for_others:
                dist.barrier()
        finally:
            dist.destroy_process_group()


@contextlib.contextmanager
def session() -> Iterator[bool]:
    """The command-line hook: start the group, keep non-zero ranks quiet, destroy it at the end.

    Ranks other than 0 print nothing to stdout and show no progress bars; stderr is left
    alone, so an error on any rank is seen. A group the caller started is left running.
    """
    from camphive import progress

    started_here = not (dist.is_available() and dist.is_initialized())
    active = init_from_environment()
    stdout = sys.stdout
    quiet = active and not is_main_process()
    if quiet:
        progress.set_enabled(False)
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - closed below
    completed = False
    try:
        yield active
        completed = True
    finally:
        if quiet:
            sys.stdout.close()
            sys.stdout = stdout
        if started_here:
            shutdown(wait_for_others=completed)


def describe() -> dict:
    """``{"processes": N, "backend": ...}`` for run configs when distributed, else ``{}``."""
    return {"processes": world_size(), "backend": str(dist.get_backend())} if is_distributed() else {}


def process_device(device: torch.device) -> torch.device:
    """Each process owns the GPU of its local rank: ``cuda``/``cuda:N`` become ``cuda:LOCAL_RANK``."""
    if is_distributed() and device.type == "cuda":
        if _OWNS_GPU is False:
            gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
            raise ConfigError(f"{processes_on_this_node()} processes on this machine but {gpus} GPU(s): each "
                              "process needs a GPU of its own; use --nproc_per_node at most the GPU count, or "
                              "--device cpu")
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError as error:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer; launch with torchrun") from error


