"""A few masked SGD steps on the calibration batches between cycles (``recovery_steps``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from camphive.pruning.unstructured.masks import apply_masks, mask_gradients


def recover(model: nn.Module, batches: list, masks, steps: int, lr: float, loss_fn=None) -> None:
    """``steps`` SGD steps (momentum 0.9, Nesterov, no weight decay) on the first calibration batches,
    BatchNorm in training mode; pruned weights get no gradient and stay exactly zero."""
    steps = min(steps, len(batches))
    if not steps:
        return
    loss_fn = loss_fn or F.cross_entropy
    device = next(model.parameters()).device
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=0.9,
                                nesterov=True)
    was_training = model.training
    model.train()
    try:
        for inputs, targets in batches[:steps]:
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model(inputs.to(device)), targets.to(device)).backward()
            mask_gradients(model, masks)
            optimizer.step()
            apply_masks(model, masks)
    finally:
        model.train(was_training)
