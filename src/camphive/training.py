"""Train, fine-tune and evaluate: mask-aware loops shared by every command.

Masks (``{parameter name: bool tensor}``) are enforced exactly: gradients of pruned entries
are zeroed before each optimizer step and the weights are masked after it, so momentum and
weight decay can never grow a pruned weight back.

Under torchrun (a process group started, see :mod:`camphive.distributed`) ``train`` wraps the
model in ``DistributedDataParallel`` and each process reads its shard of the data; gradients are
masked after DDP's all-reduce, so every process takes the same step and keeps the same weights.
``evaluate`` sums its counts over the processes, so its metrics equal those of one process.
"""
from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from camphive import distributed as dist_tools
from camphive import progress
from camphive.batches import as_batches
from camphive.devices import resolve_device
from camphive.errors import ConfigError, DataError, NumericalError
from camphive.modules import check_targets, forward_checked
from camphive.pruning.unstructured.masks import apply_masks, check_masks, mask_gradients

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
SCHEDULES = ("cosine", "step", "constant")


@dataclass
class EpochRecord:
    epoch: int
    train_loss: float
    train_accuracy: float
    learning_rate: float
    seconds: float
    test_accuracy: float | None = None
    test_loss: float | None = None


@dataclass
class TrainResult:
    epochs: int
    history: list[EpochRecord] = field(default_factory=list)
    seconds: float = 0.0
    final: dict | None = None

    def to_dict(self) -> dict:
        return {"epochs": self.epochs, "seconds": self.seconds, "final": self.final,
                "history": [asdict(record) for record in self.history]}


@dataclass
class TrainState:
    """Everything needed to continue training exactly where it stopped."""

    epoch: int
    optimizer: dict
    scheduler: dict
    history: list[dict]


def default_loss(label_smoothing: float = 0.0) -> LossFn:
    return nn.CrossEntropyLoss(label_smoothing=label_smoothing)


def make_optimizer(model: nn.Module, lr: float, momentum: float, nesterov: bool, weight_decay: float,
                   decay_norm_and_bias: bool = False) -> torch.optim.Optimizer:
    """SGD; by default BatchNorm parameters and biases get no weight decay (common practice)."""
    if lr <= 0:
        raise ConfigError(f"learning rate must be positive, got {lr}")
    decay, no_decay = [], []
    for parameter in model.parameters():
        if not parameter.requires_grad:
            continue
        (decay if parameter.ndim > 1 or decay_norm_and_bias else no_decay).append(parameter)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0)


def make_scheduler(optimizer, schedule: str, total_steps: int, milestones=None, gamma: float = 0.1,
                   warmup_steps: int = 0):
    """A per-step LambdaLR: cosine to zero, step decay at epoch-fraction milestones, or constant."""
    if schedule not in SCHEDULES:
        raise ConfigError(f"unknown schedule {schedule!r}; use one of {', '.join(SCHEDULES)}")
    milestones = [0.5, 0.75] if milestones is None else list(milestones)

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress_fraction = min(step / max(total_steps, 1), 1.0)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress_fraction))
        if schedule == "step":
            return gamma ** sum(progress_fraction >= m for m in milestones)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _seed_epoch(data, seed: int, epoch: int, rank: int = 0) -> None:
    """Make shuffling and augmentation of an epoch depend only on (seed, epoch), so resume is exact.

    The shuffling generator is the same on every process (their shards partition one order);
    augmentation draws from a stream of each process's own (``rank``; rank 0's is the
    single-process one), so the processes do not apply the same crops to different images.
    """
    torch.manual_seed(seed * 1000003 + epoch + 7_919_993 * rank)
    generator = getattr(data, "generator", None)
    if isinstance(generator, torch.Generator):
        generator.manual_seed(seed * 1000003 + epoch)
    sampler = getattr(data, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)


def train(  # noqa: C901 - the training loop with DDP, AMP, resume and masks; split next
    model: nn.Module,
    train_data,
    epochs: int,
    *,
    lr: float = 0.1,
    momentum: float = 0.9,
    nesterov: bool = True,
    weight_decay: float = 5e-4,
    schedule: str = "cosine",
    milestones=None,
    gamma: float = 0.1,
    warmup_epochs: float = 0.0,
    label_smoothing: float = 0.0,
    batch_size: int = 128,
    loss_fn: LossFn | None = None,
    masks: Mapping[str, torch.Tensor] | None = None,
    eval_data=None,
    device="auto",
    seed: int = 0,
    max_grad_norm: float | None = None,
    amp: bool = False,
    state: TrainState | None = None,
    on_epoch_end: Callable[[EpochRecord, TrainState], None] | None = None,
    distributed: bool | None = None,
    on_step: Callable[[int, int], Mapping[str, torch.Tensor] | None] | None = None,
) -> TrainResult:
    """Train ``model`` in place with SGD and return the per-epoch history.

    ``train_data`` is a DataLoader, a Dataset (batched with ``batch_size``, shuffled) or a
    list of ``(inputs, targets)`` batches. ``masks`` keeps pruned weights exactly zero.
    ``state`` resumes from a :class:`TrainState` given to ``on_epoch_end`` by an earlier
    run with the same arguments; the result is then the same as an uninterrupted run.

    ``distributed`` (``None``: whenever a process group runs): every process calls ``train``
    with the same arguments; loaders and datasets are sharded here (padded, so all processes
    take the same number of steps), a list of batches is taken as this process's own (steps
    per epoch: the fewest of any process). ``batch_size`` is per process; the reported
    losses and accuracies are over all processes.

    ``on_step(step, total_steps)`` is called before every training step (``step`` counts from 0
    over all epochs, ``total_steps = epochs * steps per epoch``); when it returns masks, they
    replace ``masks`` from that step on (gradual pruning, :func:`camphive.gradual.prune_gradually`).
    """
    if epochs < 0:
        raise ConfigError(f"epochs must be >= 0, got {epochs}")
    distributed = dist_tools.resolve(distributed)
    device = resolve_device(device)
    if distributed:
        device = dist_tools.process_device(device)
    model.to(device)
    if masks:
        check_masks(model, masks)
        masks = {name: mask.to(device) for name, mask in masks.items()}
        apply_masks(model, masks)
    batches = as_batches(train_data, batch_size=batch_size, shuffle=True, seed=seed)
    step_limit = None
    if distributed:
        batches = dist_tools.shard_loader(batches, pad=True, seed=seed)
    try:
        steps_per_epoch = len(batches)  # type: ignore[arg-type]
        if distributed:  # DDP needs the same number of steps on every process
            steps_per_epoch = step_limit = dist_tools.all_reduce_int(steps_per_epoch, "min")
    except TypeError:
        steps_per_epoch = 1
    if steps_per_epoch == 0:
        raise DataError("the training data is empty; pass at least one (inputs, targets) batch")
    loss_fn = loss_fn or default_loss(label_smoothing)
    optimizer = make_optimizer(model, lr, momentum, nesterov, weight_decay)
    scheduler = make_scheduler(optimizer, schedule, epochs * steps_per_epoch, milestones, gamma,
                               warmup_steps=int(warmup_epochs * steps_per_epoch))
    result = TrainResult(epochs=epochs)
    start_epoch = 0
    if state is not None:
        optimizer.load_state_dict(state.optimizer)
        scheduler.load_state_dict(state.scheduler)
        start_epoch = state.epoch
        result.history = [EpochRecord(**record) for record in state.history]
    use_amp = amp and device.type == "cuda"
    network = dist_tools.wrap_model(model, device) if distributed else model
    started = time.perf_counter()
    for epoch in range(start_epoch, epochs):
        _seed_epoch(batches, seed, epoch, dist_tools.rank() if distributed else 0)
        model.train()
        epoch_start = time.perf_counter()
        total_loss, correct, seen = 0.0, 0, 0
        for step, (inputs, targets) in enumerate(progress.track(batches, f"epoch {epoch + 1}/{epochs}")):
            if step_limit is not None and step >= step_limit:
                break
            if on_step is not None:
                masks = _step_masks(model, on_step(epoch * steps_per_epoch + step, epochs * steps_per_epoch), masks,
                                    device)
            inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            if inputs.shape[0] < 2 and _has_batchnorm(model):
                continue  # BatchNorm cannot normalise a single sample in training mode
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                outputs = forward_checked(network, inputs, f"epoch {epoch + 1} batch {step}") if step == 0 else network(inputs)
                if step == 0:
                    check_targets(targets, outputs.shape[-1], "the training data")
                loss = loss_fn(outputs.float(), targets)
            if not torch.isfinite(loss):
                raise NumericalError(
                    f"training loss is {loss.item()} at epoch {epoch + 1}, batch {step}; "
                    "lower the learning rate (--lr) or check the data for NaN/inf"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # under DDP the gradients are all-reduced when this returns
            mask_gradients(model, masks)
            if max_grad_norm:
                nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
            optimizer.step()
            apply_masks(model, masks)
            scheduler.step()
            total_loss += loss.item() * inputs.shape[0]
            if outputs.ndim == 2 and not targets.dtype.is_floating_point:
                correct += int((outputs.argmax(1) == targets).sum())
            seen += inputs.shape[0]
        if distributed:
            total_loss, correct, seen = dist_tools.all_reduce_numbers([total_loss, correct, seen])
            correct, seen = int(correct), int(seen)
            # Each process updated its BatchNorm statistics with its own last batch: keep rank 0's,
            # so every process holds the model that rank 0 saves.
            dist_tools.broadcast_buffers(model)
        record = EpochRecord(
            epoch=epoch + 1,
            train_loss=total_loss / max(seen, 1),
            train_accuracy=correct / max(seen, 1),
            learning_rate=optimizer.param_groups[0]["lr"],
            seconds=time.perf_counter() - epoch_start,
        )
        if eval_data is not None:
            metrics = evaluate(model, eval_data, loss_fn=loss_fn, device=device, distributed=distributed)
            record.test_accuracy, record.test_loss = metrics["accuracy"], metrics["loss"]
        result.history.append(record)
        if on_epoch_end is not None:
            # A snapshot: state_dict() shares the live momentum buffers.
            on_epoch_end(record, TrainState(epoch=epoch + 1, optimizer=copy.deepcopy(optimizer.state_dict()),
                                            scheduler=copy.deepcopy(scheduler.state_dict()),
                                            history=[asdict(r) for r in result.history]))
    result.seconds = time.perf_counter() - started
    if result.history:
        result.final = asdict(result.history[-1])
    return result


def finetune(model: nn.Module, train_data, epochs: int, masks: Mapping[str, torch.Tensor] | None = None,
             *, lr: float = 0.01, **options) -> TrainResult:
    """Fine-tune a pruned model with masks enforced (a lower default learning rate than ``train``)."""
    return train(model, train_data, epochs, lr=lr, masks=masks, **options)


def _step_masks(model: nn.Module, returned, masks, device):
    """The masks enforced after an ``on_step`` call: those it returned (checked, applied), else the current ones."""
    if returned is None:
        return masks
    check_masks(model, returned)
    masks = {name: mask.to(device) for name, mask in returned.items()}
    apply_masks(model, masks)
    return masks


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(module, nn.modules.batchnorm._BatchNorm) for module in model.modules())


@torch.no_grad()
def evaluate(model: nn.Module, data, *, loss_fn: LossFn | None = None, device="auto",
             batch_size: int = 256, max_batches: int | None = None, distributed: bool | None = None) -> dict:
    """Return ``{"accuracy", "top5", "loss", "num_samples"}`` of ``model`` on ``data``.

    ``top5`` is ``None`` when the model has 5 outputs or fewer. The model's training flag
    is restored afterwards.

    ``distributed`` (``None``: whenever a process group runs): every process calls ``evaluate``;
    a loader or dataset is sharded here without padding (the padding of a ``DistributedSampler``
    is skipped), a list of batches is this process's own, and the counts are summed over the
    processes, so the metrics are those of one process evaluating all the data.
    ``max_batches`` then counts per process.
    """
    distributed = dist_tools.resolve(distributed)
    device = resolve_device(device)
    if distributed:
        device = dist_tools.process_device(device)
    model.to(device)
    was_training = model.training
    model.eval()
    loss_fn = loss_fn or default_loss()
    total_loss, correct, correct5, seen = 0.0, 0, 0, 0
    num_outputs = None
    batches = as_batches(data, batch_size=batch_size)
    padding = None
    if distributed:
        batches = dist_tools.shard_loader(batches, pad=False)
        padding = dist_tools.padding_filter(batches)
    try:
        for step, (inputs, targets) in enumerate(batches):
            if max_batches is not None and step >= max_batches:
                break
            if padding is not None:
                keep = padding.keep(inputs.shape[0])
                if not bool(keep.all()):
                    inputs, targets = inputs[keep], targets[keep]
                if inputs.shape[0] == 0:
                    continue
            inputs, targets = inputs.to(device), targets.to(device)
            outputs = forward_checked(model, inputs, f"batch {step}") if step == 0 else model(inputs)
            num_outputs = outputs.shape[-1]
            check_targets(targets, num_outputs, "the evaluation data")
            total_loss += loss_fn(outputs.float(), targets).item() * inputs.shape[0]
            if not targets.dtype.is_floating_point:
                correct += int((outputs.argmax(1) == targets).sum())
                if num_outputs > 5:
                    top5 = outputs.topk(5, dim=1).indices
                    correct5 += int((top5 == targets[:, None]).any(1).sum())
            seen += inputs.shape[0]
    finally:
        model.train(was_training)
    if distributed:
        total_loss, correct, correct5, seen = dist_tools.all_reduce_numbers([total_loss, correct, correct5, seen])
        correct, correct5, seen = int(correct), int(correct5), int(seen)
        num_outputs = dist_tools.all_reduce_int(num_outputs or 0, "max") or None  # a process may have no samples
    if seen == 0:
        raise DataError("the evaluation data is empty; pass at least one (inputs, targets) batch")
    return {
        "accuracy": correct / seen,
        "top5": (correct5 / seen) if num_outputs and num_outputs > 5 else None,
        "loss": total_loss / seen,
        "num_samples": seen,
    }
