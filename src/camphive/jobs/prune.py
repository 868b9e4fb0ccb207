"""``camphive prune``: prune a checkpoint, optionally fine-tune, and write the pruned checkpoint.

Resumable: every completed pruning cycle is saved (``cycle.safetensors``: with masks, or for a
structured run the smaller model with the cycle's state in its metadata), then the pruned model
(``pruned.safetensors``), then each fine-tuning epoch (``model.safetensors`` plus
``finetune_state.pt``). ``resume=True`` continues from the last of these and ends with the same
result as an uninterrupted run with the same seed.

``options["schedule"] == "gradual"`` (``--schedule gradual``) prunes during fine-tuning instead
(:func:`camphive.gradual.prune_gradually`): unstructured, one process, not resumable.

Under torchrun every process loads the checkpoint and the same calibration set, takes its
share of it (curvature, Grams and BatchNorm statistics are reduced over the processes, see
``jobs.common.calibration_share``), prunes, checks that all processes reached the same masks
and weights, and fine-tunes with DDP; rank 0 alone writes. Resuming needs ``out`` on a
filesystem every process can read.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from camphive import data as datasets
from camphive import distributed
from camphive.checkpoints import load_checkpoint, load_training_state, save_checkpoint, save_training_state
from camphive.errors import ConfigError
from camphive.gradual import DEFAULT_PRUNING_STEPS, prune_gradually
from camphive.jobs.common import (
    calibration_batches,
    calibration_share,
    check_input_shape,
    checkpoint_dataset,
    machine_description,
    seed_everything,
)
from camphive.pruning import prune
from camphive.pruning.settings import check_prune_settings
from camphive.pruning.structured.groups import resolve_ignored
from camphive.runs import RunFolder, timestamp
from camphive.sparse_format import RESERVED_KEYS, save_sparse
from camphive.training import TrainState, evaluate, finetune

CYCLE_FILE, PRUNED_FILE, STATE_FILE, PROGRESS_FILE = "cycle.safetensors", "pruned.safetensors", "finetune_state.pt", "progress.json"
SPARSE_FILE = "model.sparse.safetensors"  # unstructured runs: the final model as bitmask + values


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
    resume: bool = False,
    options: dict | None = None,
    pruning_steps: int | None = None,
) -> dict:
    """Prune the model stored at ``checkpoint``; write ``model.safetensors`` (with masks) and ``results.json``.

    Unstructured runs also write the final model compressed, ``model.sparse.safetensors``
    (see :func:`camphive.save_sparse`); ``results["sparse_file"]`` has its size and the dense
    float32 checkpoint's, in bytes.

    ``options`` go to :func:`camphive.prune` (score, curvature, pairing, merge, cycles, ...);
    ``schedule="gradual"`` among them prunes in ``pruning_steps`` steps during the
    ``finetune_epochs`` (default 10 steps) instead of before them.
    ``dataset`` defaults to the one the checkpoint records, with the options it was made with.
    Bad settings fail before the run folder is made; a run that fails before its first pruning
    cycle is saved removes what it wrote (see :meth:`RunFolder.discarded_on_error`).
    """
    settings = {key: value for key, value in locals().items()}
    distributed.init_from_environment()
    started = time.perf_counter()
    stored = load_checkpoint(checkpoint)
    dataset, dataset_options = checkpoint_dataset(stored.metadata, dataset, checkpoint)
    if mode == "unstructured" and sparsity is None and target_macs_ratio is None and not (options or {}).get("pattern"):
        raise ConfigError("pass --sparsity (fraction of weights to remove, e.g. 0.9) or --pattern (e.g. 2:4)")
    if mode == "structured" and sparsity is None and target_macs_ratio is None:
        raise ConfigError("pass --sparsity (fraction of channels) or --target-macs-ratio (e.g. 2.0) for structured pruning")
    options = dict(options or {})
    gradual = options.get("schedule") == "gradual"
    if gradual:
        del options["schedule"]
    _check_gradual(gradual, mode, finetune_epochs, pruning_steps, resume, options)
    # Everything that can be checked without running the model is checked before the run folder is made.
    check_prune_settings(mode, criterion, sparsity, target_macs_ratio, options)
    resolve_ignored(stored.model, options.get("ignored_layers"))  # a misspelt name fails before any file is written
    seed_everything(seed)
    calib = calibration_batches(dataset, data_root, calib_samples, calib_batch_size, seed, **dataset_options)
    calib_counts = {"num_batches": len(calib), "num_samples": sum(int(inputs.shape[0]) for inputs, _ in calib)}
    calib = calibration_share(calib)
    test_set = datasets.load(dataset, root=data_root, split="test", **dataset_options)
    check_input_shape(stored.metadata, test_set, checkpoint, dataset)
    test = datasets.loader(test_set, batch_size=512, device=device)
    run = RunFolder.create(out, overwrite=overwrite, resume=resume)
    with run.discarded_on_error():  # until the first pruning cycle is saved, a failure leaves no folder behind
        return _run(run, stored, calib, calib_counts, test, settings, started, dataset=dataset,
                    dataset_options=dataset_options, data_root=data_root, sparsity=sparsity, mode=mode,
                    criterion=criterion, target_macs_ratio=target_macs_ratio, finetune_epochs=finetune_epochs,
                    finetune_lr=finetune_lr, batch_size=batch_size, train_subset=train_subset, device=device,
                    seed=seed, resume=resume, options=options,
                    pruning_steps=(pruning_steps or DEFAULT_PRUNING_STEPS) if gradual else None)


def _check_gradual(gradual: bool, mode: str, finetune_epochs: int, pruning_steps, resume: bool, options: dict) -> None:
    """One line when ``--schedule gradual`` (or ``--pruning-steps``) cannot run as asked."""
    if not gradual:
        if pruning_steps is not None:
            raise ConfigError("--pruning-steps applies to --schedule gradual; drop it or pass --schedule gradual")
        return
    if mode != "unstructured":
        raise ConfigError("--schedule gradual masks single weights while fine-tuning; use --mode unstructured "
                          "(structured runs take --cycles)")
    if not finetune_epochs:
        raise ConfigError("--schedule gradual prunes during fine-tuning; pass --finetune-epochs (e.g. 2)")
    if "cycles" in options:
        raise ConfigError("--schedule gradual prunes one cycle per pruning step; drop --cycles, set --pruning-steps")
    if pruning_steps is not None and pruning_steps < 1:
        raise ConfigError(f"--pruning-steps must be >= 1, got {pruning_steps}")
    if resume:
        raise ConfigError("a --schedule gradual run cannot resume; start it again without --resume")
    if distributed.is_distributed():
        raise ConfigError("--schedule gradual runs in one process; run it without torchrun")


def _run(run, stored, calib, calib_counts, test, settings, started, *, dataset, dataset_options, data_root, sparsity,
         mode, criterion, target_macs_ratio, finetune_epochs, finetune_lr, batch_size, train_subset, device, seed,
         resume, options, pruning_steps) -> dict:
    """The job once its inputs are checked and its run folder made: evaluate, prune, fine-tune, write."""
    log = run.logger()
    if not resume or not distributed.on_rank_zero(run.file("config.yaml").is_file):
        run.write_config({"command": "prune", **settings, "dataset": dataset, "dataset_options": dataset_options,
                          "started": timestamp(), "machine": machine_description(), **distributed.describe()})
    # What a checkpoint pruned before records of its own pruning, this run's replaces.
    metadata = {key: value for key, value in stored.metadata.items()
                if key not in ("format", "arch", "pruning", "cycle", "cycle_records", "structured_state",
                               "finetune_epochs")}
    progress = distributed.on_rank_zero(
        lambda: run.read_json(PROGRESS_FILE) if resume and run.file(PROGRESS_FILE).is_file() else {})
    model = stored.model
    if "dense" not in progress:
        progress["dense"] = evaluate(model, test, device=device)
        run.write_json(PROGRESS_FILE, progress)
    log.info("dense accuracy %.4f", progress["dense"]["accuracy"])

    finetuned = None
    if pruning_steps:
        model, masks, finetuned = _prune_gradually(
            model, stored.masks, calib, _train_loader(dataset, dataset_options, data_root, batch_size, train_subset,
                                                      device, seed),
            test, run, log, metadata, progress, sparsity=sparsity, criterion=criterion, epochs=finetune_epochs,
            lr=finetune_lr, batch_size=batch_size, device=device, seed=seed, pruning_steps=pruning_steps,
            options=options)
    elif resume and distributed.on_rank_zero(run.file(PRUNED_FILE).is_file):
        saved = load_checkpoint(run.file(PRUNED_FILE))
        model, masks = saved.model, saved.masks
        log.info("resuming after pruning")
    else:
        model, masks = _prune(model, stored.masks, calib, run, log, progress, metadata, resume, sparsity=sparsity,
                              mode=mode, criterion=criterion, target_macs_ratio=target_macs_ratio, seed=seed,
                              options=options, calib_counts=calib_counts)
        progress["pruned"] = evaluate(model, test, device=device)
        run.write_json(PROGRESS_FILE, progress)
        run.keep()  # from here on the folder holds a pruned model (kept even if the write below is cut short)
        if run.writer:
            save_checkpoint(run.file(PRUNED_FILE), model, masks, **metadata, pruning=progress["prune"]["config"])
            save_checkpoint(run.file("model.safetensors"), model, masks, **metadata, pruning=progress["prune"]["config"])
        log.info("pruned (%s, sparsity %.4f): accuracy %.4f", criterion, progress["prune"]["sparsity"],
                 progress["pruned"]["accuracy"])
    if finetune_epochs and not pruning_steps:
        finetuned = _finetune(model, masks, dataset, dataset_options, data_root, test, run, log, metadata, progress,
                              resume, epochs=finetune_epochs, lr=finetune_lr, batch_size=batch_size,
                              train_subset=train_subset, device=device, seed=seed)
    sparse_file = None
    if mode == "unstructured":
        final = {**metadata, "pruning": progress["prune"]["config"]}
        if finetune_epochs:
            final["finetune_epochs"] = finetune_epochs
        sparse_file = _save_sparse_file(run, log, model, masks, final)
    results = {"dense": progress["dense"], "pruned": progress.get("pruned"), "finetuned": finetuned,
               "prune": progress["prune"], "checkpoint": str(run.file("model.safetensors")), "sparse_file": sparse_file,
               "seconds": time.perf_counter() - started}
    run.write_json("results.json", results)
    run.close()
    distributed.barrier()  # every process returns once rank 0's files are complete
    return results


def _save_sparse_file(run, log, model, masks, metadata) -> dict:
    """Write the final model as bitmask + values beside its checkpoint; return its size and the dense size (bytes)."""
    metadata = {key: value for key, value in metadata.items() if key not in RESERVED_KEYS}
    written = save_sparse(model, run.file(SPARSE_FILE), masks=masks or None, metadata=metadata)
    log.info("sparse file %s: %d bytes, dense float32 checkpoint %d bytes (%.1fx smaller)", SPARSE_FILE,
             written.file_bytes, written.dense_bytes, 1 / written.ratio)
    return {"path": str(written.path), "bytes": written.file_bytes, "dense_bytes": written.dense_bytes,
            "values_dtype": written.values_dtype}


def _prune(model, masks, calib, run, log, progress, metadata, resume, *, sparsity, mode, criterion,
           target_macs_ratio, seed, options, calib_counts):
    """Run the pruning cycles, saving each completed cycle; resume from the last one saved."""
    extra = dict(options)
    if target_macs_ratio is not None:
        extra["target_macs_ratio"] = target_macs_ratio
    original, records = model, []
    if resume and distributed.on_rank_zero(run.file(CYCLE_FILE).is_file):
        model, masks, records = _resume_cycles(run, mode, extra)
        log.info("resuming after pruning cycle %d", extra["start_cycle"])

    def on_cycle_end(cycle, state, record):
        """Save the model after each cycle: unstructured with its masks, structured with its state (plain numbers)."""
        if mode == "unstructured":
            distributed.check_same_on_all_ranks(state, f"pruning masks after cycle {cycle}")
            cycle_masks, saved_state = state, {}
        else:
            cycle_masks, saved_state = None, {"structured_state": json.loads(json.dumps(state))}
        records.append(json.loads(json.dumps(record, default=str)))
        run.keep()  # a saved cycle is what --resume continues from: never discarded once written
        if run.writer:
            save_checkpoint(run.file(CYCLE_FILE), model, cycle_masks, **metadata, cycle=cycle, cycle_records=records,
                            **saved_state)
        described = f"sparsity {record['sparsity']:.4f}" if "sparsity" in record else f"MACs {record.get('macs')}"
        log.info("cycle %d done: %s", cycle, described)

    if model is not original:
        extra["reference"] = original  # a resumed refit matches the unpruned model, not the one saved mid-run
    result = prune(model, calib, sparsity, mode=mode, criterion=criterion, masks=masks or None, seed=seed,
                   on_cycle_end=on_cycle_end, **extra)
    result.cycles = records  # a resumed run reports the cycles before the interruption too
    if "resume_state" in extra and result.config.get("measure_latency"):
        result.extra["latency"] = _time_before_after(original, model, calib, result.config)
    final_masks = result.masks if mode == "unstructured" else {}
    distributed.check_same_on_all_ranks({**{f"mask.{name}": mask for name, mask in final_masks.items()},
                                         **{f"model.{name}": value for name, value in model.state_dict().items()}},
                                        "pruned models")
    if distributed.is_distributed():  # record the run's calibration set, not this process's share
        result.config.update(calib_counts, processes=distributed.world_size())
    progress["prune"] = json.loads(json.dumps(result.to_dict(), default=str))
    return model, final_masks


def _resume_cycles(run, mode: str, extra: dict):
    """The model, masks and cycle records saved after the last completed cycle; sets where ``prune`` resumes."""
    saved = load_checkpoint(run.file(CYCLE_FILE))
    if ("structured_state" in saved.metadata) != (mode == "structured"):
        saved_mode = "structured" if "structured_state" in saved.metadata else "unstructured"
        raise ConfigError(f"{run.file(CYCLE_FILE)} was saved by {saved_mode} pruning; resume with --mode {saved_mode} "
                          "(the settings it started with), or start again with --overwrite")
    extra["start_cycle"] = saved.metadata["cycle"]
    if mode == "structured":
        extra["resume_state"] = saved.metadata["structured_state"]
    return saved.model, saved.masks, list(saved.metadata.get("cycle_records", []))


def _time_before_after(original, pruned, calib, config: dict) -> dict:
    """Latency of the dense and the pruned model, as a structured run times them (a resumed run cannot itself)."""
    from camphive.pruning.structured.report import latency_before_after

    return latency_before_after(original, pruned, (calib[0][0][:1],), config["latency_batch_sizes"],
                                config["latency_threads"], config["latency_seconds"], config["latency_channels_last"],
                                config["latency_compiled"])


def _finetune(model, masks, dataset, dataset_options, data_root, test, run, log, metadata, progress, resume, *,
              epochs, lr, batch_size, train_subset, device, seed):
    """Masked fine-tuning with a resumable state file after every epoch."""
    state = None
    if resume and distributed.on_rank_zero(run.file(STATE_FILE).is_file):
        saved = load_training_state(run.file(STATE_FILE))
        model.load_state_dict(saved["model"])
        state = TrainState(epoch=saved["epoch"], optimizer=saved["optimizer"], scheduler=saved["scheduler"],
                           history=json.loads(saved["history"]))
        log.info("resuming fine-tuning at epoch %d", state.epoch)
    loader = _train_loader(dataset, dataset_options, data_root, batch_size, train_subset, device, seed)

    def on_epoch_end(record, train_state):
        if not run.writer:
            return
        save_training_state(run.file(STATE_FILE), {
            "model": model.state_dict(), "epoch": train_state.epoch, "optimizer": train_state.optimizer,
            "scheduler": train_state.scheduler, "history": json.dumps(train_state.history)})
        save_checkpoint(run.file("model.safetensors"), model, masks, **metadata, pruning=progress["prune"]["config"],
                        finetune_epochs=record.epoch)
        log.info("fine-tune epoch %d: loss %.4f", record.epoch, record.train_loss)

    finetune(model, loader, epochs, masks=masks or None, lr=lr, device=device, seed=seed, state=state,
             on_epoch_end=on_epoch_end)
    finetuned = evaluate(model, test, device=device)
    log.info("fine-tuned %d epochs: accuracy %.4f", epochs, finetuned["accuracy"])
    return finetuned


def _train_loader(dataset, dataset_options, data_root, batch_size, train_subset, device, seed):
    """The fine-tuning batches: the training split (or ``train_subset`` random samples of it), shuffled."""
    train_set = datasets.load(dataset, root=data_root, split="train", **dataset_options)
    return datasets.loader(train_set, batch_size=batch_size, train=True, seed=seed, subset=train_subset,
                           random_subset=train_subset is not None, device=device)


def _prune_gradually(model, masks, calib, loader, test, run, log, metadata, progress, *, sparsity, criterion, epochs,
                     lr, batch_size, device, seed, pruning_steps, options):
    """Prune while fine-tuning (:func:`camphive.prune_gradually`); return the model, its masks and its accuracy."""

    def on_pruning_step(record):
        log.info("pruning step %d/%d at training step %d of %d: target %.4f, sparsity %.4f", record["cycle"],
                 pruning_steps, record["step"], record["total_steps"], record["target"], record["sparsity"])

    def on_epoch_end(record, _state):
        log.info("fine-tune epoch %d: loss %.4f", record.epoch, record.train_loss)

    result, _ = prune_gradually(model, loader, calib, sparsity, epochs=epochs, pruning_steps=pruning_steps, lr=lr,
                                masks=masks or None, device=device, seed=seed, batch_size=batch_size,
                                criterion=criterion, on_pruning_step=on_pruning_step,
                                train_options={"on_epoch_end": on_epoch_end}, **options)
    progress["prune"] = json.loads(json.dumps(result.to_dict(), default=str))
    finetuned = evaluate(model, test, device=device)
    run.keep()
    if run.writer:
        save_checkpoint(run.file("model.safetensors"), model, result.masks, **metadata,
                        pruning=progress["prune"]["config"], finetune_epochs=epochs)
    log.info("pruned gradually (%s, sparsity %.4f) over %d fine-tuning epochs: accuracy %.4f", criterion,
             result.sparsity, epochs, finetuned["accuracy"])
    return model, result.masks, finetuned
