"""Several processes, one result: the process group, data shards and the collectives camphive uses.

Launch any command with ``torchrun --nproc_per_node=N -m camphive <command> ...`` (multi-node:
add ``--nnodes``, ``--node_rank`` and a rendezvous endpoint). Each process reads ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` from the environment;
:func:`init_from_environment` starts the process group (gloo for CPU tensors, NCCL for CUDA
tensors, with ``torch.cuda.set_device(LOCAL_RANK)``). With no such variables nothing changes:
every function here is then a no-op and the code runs exactly as in one process.

Conventions, the same everywhere in camphive:

* Loaders (``DataLoader``, ``TensorBatchLoader``) and ``Dataset``s given to ``train`` and
  ``evaluate`` are sharded there (:func:`shard_loader`); a list of batches is this process's own.
  ``batch_size`` is per process, so the global batch is ``WORLD_SIZE x batch_size``.
* Curvature (Hessian-vector products, gradients, Fisher and layer covariances) is reduced over
  the processes weighted by their sample counts, so every process sees the single-process
  quantity of the union of the shards (:func:`shard_batches` splits calibration batches).
* Only rank 0 writes files (``RunFolder.writer``); decisions made by every process are checked
  to agree (:func:`check_same_on_all_ranks`).
"""
from camphive.distributed.collectives import (
    all_gather_rows,
    all_reduce_,
    all_reduce_int,
    all_reduce_numbers,
    all_reduce_tensors,
    barrier,
    broadcast_buffers,
    broadcast_object,
    check_same_on_all_ranks,
    collective_device,
    fingerprint,
    on_rank_zero,
    reduce_mean_,
    resolve,
    wrap_model,
)
from camphive.distributed.group import (
    BACKEND_VARIABLE,
    describe,
    init_from_environment,
    is_distributed,
    is_main_process,
    launched,
    local_rank,
    process_device,
    rank,
    session,
    shutdown,
    world_size,
)
from camphive.distributed.shards import (
    PaddingFilter,
    ShardedBatchLoader,
    ShardSampler,
    is_sharded,
    padding_filter,
    shard_batches,
    shard_loader,
)

__all__ = [
    "BACKEND_VARIABLE", "PaddingFilter", "ShardSampler", "ShardedBatchLoader", "all_gather_rows", "all_reduce_",
    "all_reduce_int", "all_reduce_numbers", "all_reduce_tensors", "barrier", "broadcast_buffers", "broadcast_object",
    "check_same_on_all_ranks", "collective_device", "describe", "fingerprint", "init_from_environment", "is_distributed",
    "is_main_process", "is_sharded", "launched", "local_rank", "on_rank_zero", "padding_filter", "process_device",
    "rank", "reduce_mean_", "resolve", "session", "shard_batches", "shard_loader", "shutdown", "world_size",
    "wrap_model",
]
