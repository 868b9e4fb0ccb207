"""``camphive train``: dense training of a model on a dataset, resumable.

Under ``torchrun --nproc_per_node=N -m camphive train ...`` every process trains its shard of
the data with DistributedDataParallel (``batch_size`` per process) and only rank 0 writes.
"""
from __future__ import annotations

import json
from pathlib import Path

from camphive import distributed
from camphive.checkpoints import load_training_state, save_checkpoint, save_training_state
from camphive.errors import ConfigError
from camphive.jobs.common import (
    checkpoint_metadata,
    load_splits,
    loaders,
    machine_description,
    model_for,
    seed_everything,
)
from camphive.jobs.compare_options import parse_options
from camphive.runs import RunFolder, atomic_write_text, timestamp
from camphive.training import TrainState, evaluate, train

STATE_FILE = "train_state.pt"


def train_job(
    *,
    model: str = "small-cnn",
    dataset: str = "fashion-mnist",
    data_root: str | None = None,
    dataset_options=None,
    out: str | Path = "runs/train",
    epochs: int = 10,
    batch_size: int = 128,
    lr: float = 0.1,
    momentum: float = 0.9,
    nesterov: bool = True,
    weight_decay: float = 5e-4,
    schedule: str = "cosine",
    warmup_epochs: float = 0.0,
    label_smoothing: float = 0.0,
    train_subset: int | None = None,
    test_subset: int | None = None,
    num_workers: int = 0,
    amp: bool = False,
    device: str = "auto",
    seed: int = 0,
    overwrite: bool = False,
    resume: bool = False,
    config: dict | None = None,
) -> dict:
    """Train ``model`` on ``dataset`` and write a run folder; return the final metrics.

    Each epoch ends with an atomic checkpoint (``model.safetensors``) and resumable state;
    ``resume=True`` continues a stopped run in ``out`` to the same result. ``dataset_options``
    (``"num_classes=20,shape=3x16x16"`` or a dict) go to the dataset and are recorded in the
    checkpoint, so that evaluate and prune load the same data. A run that fails before its first
    epoch is saved removes what it wrote.
    """
    settings = {key: value for key, value in locals().items() if key != "config"}
    distributed.init_from_environment()
    # Everything that can fail on bad input happens before the run folder is made.
    settings["dataset_options"] = dataset_options = parse_options(dataset_options, "dataset-options")
    seed_everything(seed)
    splits = load_splits(dataset, data_root, **dataset_options)
    train_loader, test_loader = loaders(splits, batch_size, seed, train_subset, test_subset, num_workers, device)
    network = model_for(model, splits)
    run = RunFolder.create(out, overwrite=overwrite, resume=resume)
    with run.discarded_on_error():
        return _run(run, network, splits, train_loader, test_loader, settings, config, epochs=epochs, lr=lr,
                    momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, schedule=schedule,
                    warmup_epochs=warmup_epochs, label_smoothing=label_smoothing, amp=amp, device=device, seed=seed,
                    resume=resume)


def _run(run, network, splits, train_loader, test_loader, settings, config, *, epochs, lr, momentum, nesterov,
         weight_decay, schedule, warmup_epochs, label_smoothing, amp, device, seed, resume) -> dict:
    """Training once the data, the model and the run folder are there."""
    log = run.logger()
    state = None
    if resume:
        state_path = run.file(STATE_FILE)
        if not distributed.on_rank_zero(state_path.is_file):
            raise ConfigError(f"nothing to resume in {run.path}: {STATE_FILE} is missing; start the run without --resume")
        saved = load_training_state(state_path)  # every process loads it (the run folder must be shared)
        network.load_state_dict(saved["model"])
        state = TrainState(epoch=saved["epoch"], optimizer=saved["optimizer"], scheduler=saved["scheduler"],
                           history=json.loads(saved["history"]))
        log.info("resuming at epoch %d", state.epoch)
    run.write_config({"command": "train", **settings, **(config or {}), "started": timestamp(),
                      "machine": machine_description(), **distributed.describe()})
    metadata = checkpoint_metadata(splits, seed=seed)

    def on_epoch_end(record, train_state: TrainState) -> None:
        if not run.writer:
            return
        run.keep()  # a saved epoch is what --resume continues from: never discarded once written
        # The state file carries the weights too, so it alone decides where a resume starts.
        save_training_state(run.file(STATE_FILE), {
            "model": network.state_dict(), "epoch": train_state.epoch, "optimizer": train_state.optimizer,
            "scheduler": train_state.scheduler, "history": json.dumps(train_state.history),
        })
        save_checkpoint(run.file("model.safetensors"), network, epoch=record.epoch, **metadata)
        atomic_write_text(run.file("metrics.jsonl"), "".join(json.dumps(row) + "\n" for row in train_state.history))
        log.info("epoch %d: loss %.4f train acc %.4f test acc %s (%.1fs)", record.epoch, record.train_loss,
                 record.train_accuracy, record.test_accuracy, record.seconds)

    result = train(network, train_loader, epochs, lr=lr, momentum=momentum, nesterov=nesterov,
                   weight_decay=weight_decay, schedule=schedule, warmup_epochs=warmup_epochs,
                   label_smoothing=label_smoothing, eval_data=test_loader, device=device, seed=seed,
                   amp=amp, state=state, on_epoch_end=on_epoch_end)
    final = evaluate(network, test_loader, device=device)
    if run.writer:
        save_checkpoint(run.file("model.safetensors"), network, epoch=epochs, test=final, **metadata)
    metrics = {"test": final, "train": result.to_dict(), "checkpoint": str(run.file("model.safetensors"))}
    run.write_json("metrics.json", metrics)
    log.info("done: test accuracy %.4f", final["accuracy"])
    run.close()
    distributed.barrier()  # every process returns once rank 0's files are complete
    return metrics

