"""``camphive prune``: prune a checkpoint, optionally fine-tune, and write the pruned checkpoint."""
from __future__ import annotations

import time
from pathlib import Path

from camphive import data as datasets
from camphive.checkpoints import load_checkpoint, save_checkpoint
from camphive.errors import ConfigError
from camphive.jobs.common import calibration_batches, machine_description, seed_everything
from camphive.pruning import prune
from camphive.runs import RunFolder, timestamp
from camphive.training import evaluate, finetune


def prune_job(
    *,
    checkpoint: str | Path,
    out: str | Path,
    sparsity: float | None = None,
    mode: str = "unstructured",
    criterion: str = "camp-hive",
    target_macs_ratio: float | None = None,
    dataset: str | None = None,
    data_root: str | None = None,
    calib_samples: int = 1024,
    calib_batch_size: int = 128,
    finetune_epochs: int = 0,
    finetune_lr: float = 0.01,
    batch_size: int = 128,
    train_subset: int | None = None,
    device: str = "auto",
    seed: int = 0,
    overwrite: bool = False,
    options: dict | None = None,
) -> dict:
    """Prune the model stored at ``checkpoint``; write ``model.safetensors`` (with masks) and ``results.json``.

    ``options`` go to :func:`camphive.prune` (score, curvature, pairing, merge, cycles, ...).
    """
    settings = {key: value for key, value in locals().items()}
    started = time.perf_counter()
    stored = load_checkpoint(checkpoint)
    dataset = dataset or stored.metadata.get("dataset")
    if not dataset:
        raise ConfigError(f"checkpoint {checkpoint} does not record its dataset; pass --dataset")
    if mode == "unstructured" and sparsity is None:
        raise ConfigError("pass --sparsity (fraction of weights to remove, e.g. 0.9)")
    if mode == "structured" and sparsity is None and target_macs_ratio is None:
        raise ConfigError("pass --sparsity (fraction of channels) or --target-macs-ratio (e.g. 2.0) for structured pruning")
    seed_everything(seed)
    model = stored.model
    calib = calibration_batches(dataset, data_root, calib_samples, calib_batch_size, seed)
    test = datasets.loader(datasets.load(dataset, root=data_root, split="test"), batch_size=512)
    run = RunFolder.create(out, overwrite=overwrite)
    log = run.logger()
    run.write_config({"command": "prune", **settings, "dataset": dataset, "started": timestamp(),
                      "machine": machine_description()})
    dense = evaluate(model, test, device=device)
    log.info("dense accuracy %.4f", dense["accuracy"])
    extra = dict(options or {})
    if target_macs_ratio is not None:
        extra["target_macs_ratio"] = target_macs_ratio
    result = prune(model, calib, sparsity, mode=mode, criterion=criterion, masks=stored.masks or None,
                   seed=seed, **extra)
    pruned = evaluate(model, test, device=device)
    log.info("pruned (%s, sparsity %.4f): accuracy %.4f", criterion, result.sparsity, pruned["accuracy"])
    metadata = {key: value for key, value in stored.metadata.items() if key not in ("format", "arch")}
    masks = result.masks if mode == "unstructured" else {}
    save_checkpoint(run.file("model.safetensors"), model, masks, **metadata, pruning=result.config)
    finetuned = None
    if finetune_epochs:
        train_set = datasets.load(dataset, root=data_root, split="train")
        loader = datasets.loader(train_set, batch_size=batch_size, train=True, seed=seed, subset=train_subset,
                                 random_subset=train_subset is not None)
        finetune(model, loader, finetune_epochs, masks=masks or None, lr=finetune_lr, device=device, seed=seed)
        finetuned = evaluate(model, test, device=device)
        log.info("fine-tuned %d epochs: accuracy %.4f", finetune_epochs, finetuned["accuracy"])
        save_checkpoint(run.file("model.safetensors"), model, masks, **metadata, pruning=result.config,
                        finetune_epochs=finetune_epochs)
    results = {"dense": dense, "pruned": pruned, "finetuned": finetuned, "prune": result.to_dict(),
               "checkpoint": str(run.file("model.safetensors")), "seconds": time.perf_counter() - started}
    run.write_json("results.json", results)
    run.close()
    return results
