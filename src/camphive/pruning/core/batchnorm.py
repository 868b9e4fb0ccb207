"""BatchNorm statistics re-estimated on the calibration batches after weights or channels change."""
from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches, reduce_over_processes: bool = False) -> None:
    """Re-estimate BatchNorm running statistics on ``batches`` (cumulative average), in place.

    ``reduce_over_processes``: under torchrun, where each process holds its own share of the
    calibration batches, average the statistics over the processes (weighted by batch counts),
    so every process ends with the same ones: those of all the batches when the shares are
    whole batches.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return
    training = [(m, m.training) for m in model.modules()]
    momenta = [(m, m.momentum) for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    model.train()
    device = next(model.parameters()).device
    used = 0
    try:
        for inputs, _ in batches:
            if inputs.shape[0] > 1:
                model(inputs.to(device))
                used += 1
    finally:
        for module, flag in training:
            module.training = flag
        for norm, momentum in momenta:
            norm.momentum = momentum
    if reduce_over_processes:
        _average_statistics_over_processes(norms, used)


@torch.no_grad()
def _average_statistics_over_processes(norms: list, used: int) -> None:
    from camphive import distributed

    if not distributed.is_distributed():
        return
    total = distributed.all_reduce_int(used)
    if total == 0:
        return
    statistics = [buffer for norm in norms for buffer in (norm.running_mean, norm.running_var)]
    averaged = distributed.all_reduce_tensors([buffer.double() * (used / total) for buffer in statistics])
    for buffer, value in zip(statistics, averaged):
        buffer.copy_(value)
    for norm in norms:
        norm.num_batches_tracked.fill_(total)
