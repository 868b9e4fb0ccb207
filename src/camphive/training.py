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
from camphive.optimizer import make_optimizer, make_scheduler
from camphive.pruning.unstructured.masks import apply_masks, check_masks, mask_gradients

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


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


def train(
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
    device, masks = _place(model, masks, device, distributed)
    batches, steps_per_epoch, step_limit = _epoch_batches(train_data, batch_size, seed, distributed)
    loss_fn = loss_fn or default_loss(label_smoothing)
    optimizer = make_optimizer(model, lr, momentum, nesterov, weight_decay)
    scheduler = make_scheduler(optimizer, schedule, epochs * steps_per_epoch, milestones, gamma,
                               warmup_steps=int(warmup_epochs * steps_per_epoch))
    result = TrainResult(epochs=epochs)
    start_epoch = _resume(state, optimizer, scheduler, result)
    loop = _Loop(model=model, network=dist_tools.wrap_model(model, device) if distributed else model, batches=batches,
                 device=device, masks=masks, loss_fn=loss_fn, optimizer=optimizer, scheduler=scheduler, epochs=epochs,
                 steps_per_epoch=steps_per_epoch, step_limit=step_limit, use_amp=amp and device.type == "cuda",
                 max_grad_norm=max_grad_norm, on_step=on_step)
    started = time.perf_counter()
    for epoch in range(start_epoch, epochs):
        _seed_epoch(batches, seed, epoch, dist_tools.rank() if distributed else 0)
        model.train()
        epoch_start = time.perf_counter()
        record = _epoch_record(loop, epoch, _train_epoch(loop, epoch), epoch_start, distributed)
        if eval_data is not None:
            metrics = evaluate(model, eval_data, loss_fn=loss_fn, device=device, distributed=distributed)
            record.test_accuracy, record.test_loss = metrics["accuracy"], metrics["loss"]
        result.history.append(record)
        if on_epoch_end is not None:
            on_epoch_end(record, _snapshot(loop, epoch, result.history))
    result.seconds = time.perf_counter() - started
    if result.history:
        result.final = asdict(result.history[-1])
    return result


@dataclass
class _Loop:
    """What every training step of one ``train`` call uses; ``masks`` may change (``on_step``)."""

    model: nn.Module
    network: nn.Module  # the model, or its DistributedDataParallel wrapper
    batches: object
    device: torch.device
    masks: Mapping[str, torch.Tensor] | None
    loss_fn: LossFn
    optimizer: torch.optim.Optimizer
    scheduler: object
    epochs: int
    steps_per_epoch: int
    step_limit: int | None  # under DDP: the fewest steps of any process
    use_amp: bool
    max_grad_norm: float | None
    on_step: Callable[[int, int], Mapping[str, torch.Tensor] | None] | None


def _place(model: nn.Module, masks, device, distributed: bool):
    """``model`` moved to the (process's) device with ``masks`` there and applied; the device and the masks."""
    device = resolve_device(device)
    if distributed:
        device = dist_tools.process_device(device)
    model.to(device)
    if masks:
        check_masks(model, masks)
        masks = {name: mask.to(device) for name, mask in masks.items()}
        apply_masks(model, masks)
    return device, masks


def _resume(state: TrainState | None, optimizer, scheduler, result: TrainResult) -> int:
    """Load a resumed run's optimizer, scheduler and history; the epoch to start from (0 for a new run)."""
    if state is None:
        return 0
    optimizer.load_state_dict(state.optimizer)
    scheduler.load_state_dict(state.scheduler)
    result.history = [EpochRecord(**record) for record in state.history]
    return state.epoch


def _snapshot(loop: _Loop, epoch: int, history: list[EpochRecord]) -> TrainState:
    """The state after ``epoch``, copied: state_dict() shares the live momentum buffers."""
    return TrainState(epoch=epoch + 1, optimizer=copy.deepcopy(loop.optimizer.state_dict()),
                      scheduler=copy.deepcopy(loop.scheduler.state_dict()),
                      history=[asdict(record) for record in history])


def _epoch_batches(train_data, batch_size: int, seed: int, distributed: bool):
    """The batches of an epoch (this process's shard under DDP), the steps per epoch and the step limit."""
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
    return batches, steps_per_epoch, step_limit


def _train_epoch(loop: _Loop, epoch: int) -> tuple[float, int, int]:
    """One epoch of training steps; this process's summed loss, correct predictions and samples."""
    total_loss, correct, seen = 0.0, 0, 0
    total_steps = loop.epochs * loop.steps_per_epoch
    for step, (inputs, targets) in enumerate(progress.track(loop.batches, f"epoch {epoch + 1}/{loop.epochs}")):
        if loop.step_limit is not None and step >= loop.step_limit:
            break
        if loop.on_step is not None:
            loop.masks = _step_masks(loop.model, loop.on_step(epoch * loop.steps_per_epoch + step, total_steps),
                                     loop.masks, loop.device)
        inputs, targets = inputs.to(loop.device, non_blocking=True), targets.to(loop.device, non_blocking=True)
        if inputs.shape[0] < 2 and _has_batchnorm(loop.model):
            continue  # BatchNorm cannot normalise a single sample in training mode
        outputs, loss = _train_step(loop, inputs, targets, epoch, step)
        total_loss += loss.item() * inputs.shape[0]
        if outputs.ndim == 2 and not targets.dtype.is_floating_point:
            correct += int((outputs.argmax(1) == targets).sum())
        seen += inputs.shape[0]
    return total_loss, correct, seen


def _train_step(loop: _Loop, inputs: torch.Tensor, targets: torch.Tensor, epoch: int, step: int):
    """Forward, backward and one masked SGD step; the outputs and the loss."""
    network = loop.network
    with torch.autocast(loop.device.type, dtype=torch.bfloat16, enabled=loop.use_amp):
        outputs = forward_checked(network, inputs, f"epoch {epoch + 1} batch {step}") if step == 0 else network(inputs)
        if step == 0:
            check_targets(targets, outputs.shape[-1], "the training data")
        loss = loop.loss_fn(outputs.float(), targets)
    if not torch.isfinite(loss):
        raise NumericalError(
            f"training loss is {loss.item()} at epoch {epoch + 1}, batch {step}; "
            "lower the learning rate (--lr) or check the data for NaN/inf"
        )
    loop.optimizer.zero_grad(set_to_none=True)
    loss.backward()  # under DDP the gradients are all-reduced when this returns
    mask_gradients(loop.model, loop.masks)
    if loop.max_grad_norm:
        nn.utils.clip_grad_norm_(loop.model.parameters(), loop.max_grad_norm)
    loop.optimizer.step()
    apply_masks(loop.model, loop.masks)
    loop.scheduler.step()
    return outputs, loss


def _epoch_record(loop: _Loop, epoch: int, totals: tuple[float, int, int], epoch_start: float,
                  distributed: bool) -> EpochRecord:
    """The epoch's record, its loss and accuracy over all processes."""
    total_loss, correct, seen = totals
    if distributed:
        total_loss, correct, seen = dist_tools.all_reduce_numbers([total_loss, correct, seen])
        correct, seen = int(correct), int(seen)
        # Each process updated its BatchNorm statistics with its own last batch: keep rank 0's,
        # so every process holds the model that rank 0 saves.
        dist_tools.broadcast_buffers(loop.model)
    return EpochRecord(
        epoch=epoch + 1,
        train_loss=total_loss / max(seen, 1),
        train_accuracy=correct / max(seen, 1),
        learning_rate=loop.optimizer.param_groups[0]["lr"],
        seconds=time.perf_counter() - epoch_start,
    )


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
