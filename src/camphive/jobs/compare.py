"""``camphive compare``: CAMP-HiVe against the baselines, fair by construction.

Every criterion starts from the same dense weights, reads the same calibration batches,
uses the same seed and gets the same fine-tuning budget (same samples, same order, same
augmentation draws). The run folder holds:

- ``config.yaml``: the resolved settings (with the config file they came from) and the machine;
- ``dense.safetensors``: the dense model (trained here unless ``checkpoint`` is given),
  ``dense_metrics.jsonl`` its training epochs;
- ``logs/<criterion>.jsonl``: each criterion's events (pruned, fine-tune epochs, fine-tuned),
  appended as they happen; ``rows.jsonl``: one line per finished (criterion, target), what
  ``resume`` skips;
- ``spectrum.json`` and ``convergence.png``: the dense model's top Hessian eigenvalues;
- ``results.json``, ``results.csv``, ``report.md``, ``report.html`` (self-contained) and the PNGs.
"""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import yaml

from camphive import data as datasets
from camphive.checkpoints import load_checkpoint, load_training_state, save_checkpoint, save_training_state
from camphive.devices import resolve_device
from camphive.errors import CamphiveError, ConfigError
from camphive.jobs.common import (
    calibration_batches,
    check_input_shape,
    checkpoint_dataset,
    checkpoint_metadata,
    load_splits,
    machine_description,
    model_for,
    seed_everything,
)
from camphive.jobs.compare_options import (
    Scalars,
    check_model,
    check_plan,
    check_tensorboard,
    layer_lists,
    parse_list,
    parse_options,
)
from camphive.jobs.compare_report import write_reports
from camphive.pruning import prune
from camphive.pruning.settings import check_prune_settings
from camphive.report import METHOD
from camphive.runs import RunFolder, atomic_write_text, timestamp
from camphive.training import TrainState, evaluate, finetune, train

DEFAULT_CRITERIA = ("camp-hive", "magnitude", "taylor", "obd", "hutchinson", "random")
# Settings that may change between a run and its resume without changing its results.
RESUMABLE_CHANGES = {"out", "overwrite", "resume", "tensorboard", "device", "num_workers", "config_file"}
DENSE_STATE = "dense_state.pt"


# --------------------------------------------------------------------------- the job


def compare_job(  # noqa: C901 - one flat plan of checks and runs; split next (see the issue notes)
    *,
    model: str = "small-cnn",
    dataset: str | None = "fashion-mnist",
    data_root: str | None = None,
    dataset_options=None,
    checkpoint: str | Path | None = None,
    out: str | Path = "runs/compare",
    criteria=DEFAULT_CRITERIA,
    sparsities=(0.5, 0.8, 0.9),
    mode: str = "unstructured",
    macs_ratios=None,
    cycles: int | None = None,
    prune_options=None,
    camp_hive_options=None,
    calib_samples: int = 1024,
    calib_batch_size: int = 128,
    dense_epochs: int = 10,
    dense_lr: float = 0.1,
    dense_schedule: str = "cosine",
    dense_warmup_epochs: float = 0.0,
    momentum: float = 0.9,
    nesterov: bool = True,
    weight_decay: float = 5e-4,
    label_smoothing: float = 0.0,
    finetune_epochs: int = 1,
    finetune_lr: float = 0.01,
    finetune_schedule: str = "cosine",
    batch_size: int = 128,
    train_subset: int | None = None,
    finetune_subset: int | None = None,
    test_subset: int | None = None,
    num_workers: int = 0,
    spectrum_top_k: int = 3,
    spectrum_max_iter: int = 50,
    latency: bool = True,
    latency_batch_sizes=(1, 64),
    latency_seconds: float = 1.0,
    latency_channels_last: bool = False,
    latency_compiled: bool = False,
    device: str = "auto",
    amp: bool = False,
    seed: int = 0,
    overwrite: bool = False,
    resume: bool = False,
    tensorboard: bool = False,
    config_file: str | None = None,
) -> dict:
    """Prune one dense model with every criterion at every target; fine-tune, evaluate, report.

    ``sparsities`` (or, with ``mode="structured"``, ``macs_ratios``): the targets. ``cycles`` and
    ``camp_hive_options`` go to CAMP-HiVe only, ``prune_options`` to every criterion (see
    :func:`camphive.prune`). ``train_subset`` limits dense training and fine-tuning (N random
    training samples), ``finetune_subset`` fine-tuning alone. Returns the results dict written
    to ``results.json``, with ``headline`` and ``files``.
    """
    started = time.perf_counter()
    settings = {key: value for key, value in locals().items() if key != "started"}
    criteria, targets, target_kind = check_plan(mode, criteria, sparsities, macs_ratios)
    dataset_options = parse_options(dataset_options, "dataset-options")
    prune_options = layer_lists(parse_options(prune_options, "prune-options"))
    camp_hive_options = layer_lists(parse_options(camp_hive_options, "camp-hive-options"))
    latency_batch_sizes = parse_list(latency_batch_sizes, int, "latency-batch-sizes")
    if mode == "structured" and latency and (not latency_batch_sizes or min(latency_batch_sizes) < 1):
        raise ConfigError(f"--latency-batch-sizes must be positive integers such as 1,64, got {latency_batch_sizes}")
    if tensorboard:
        check_tensorboard()
    if finetune_epochs < 0 or dense_epochs < 0:
        raise ConfigError(f"epochs must be >= 0, got dense {dense_epochs}, fine-tune {finetune_epochs}")
    for criterion in criteria:  # every criterion's options, before any training
        for target in targets:
            options = _prune_options(criterion, mode, target, target_kind, cycles, prune_options, camp_hive_options)
            try:
                check_prune_settings(mode, criterion, options.pop("sparsity", None), options.pop("target_macs_ratio", None),
                                     options)
            except ConfigError as error:
                raise ConfigError(f"{criterion} at {target_kind} {target:g}: {error}") from error
    stored = load_checkpoint(checkpoint) if checkpoint else None
    if stored is not None:
        recorded_name, recorded_options = checkpoint_dataset(stored.metadata, dataset, checkpoint)
        dataset, dataset_options = recorded_name, dataset_options or recorded_options
        model = (stored.metadata.get("arch") or {}).get("name", model)
    dataset = dataset or "fashion-mnist"  # neither --dataset nor a checkpoint names one
    device_used = resolve_device(device)
    seed_everything(seed)
    splits = load_splits(dataset, data_root, **dataset_options)
    if stored is not None:
        check_input_shape(stored.metadata, splits.test, checkpoint, dataset)
    check_model(stored.model if stored is not None else None, model, splits, prune_options, camp_hive_options,
                spectrum_top_k=spectrum_top_k, spectrum_max_iter=spectrum_max_iter)
    test_loader = datasets.loader(splits.test, batch_size=max(batch_size, 256), subset=test_subset,
                                  num_workers=num_workers, device=device_used)
    settings.update(criteria=criteria, targets=targets, target_kind=target_kind, dataset=splits.name, model=model,
                    dataset_options=dataset_options, prune_options=prune_options, camp_hive_options=camp_hive_options,
                    latency_batch_sizes=latency_batch_sizes, sparsities=parse_list(sparsities, float, "sparsities"),
                    macs_ratios=parse_list(macs_ratios, float, "macs-ratios"))
    run = RunFolder.create(out, overwrite=overwrite, resume=resume)
    scalars = Scalars(None)
    try:
        if resume:
            _check_resume(run, settings)
        log = run.logger()
        run.write_config({"command": "compare", **settings, "started": timestamp(), "device_used": str(device_used),
                          "machine": machine_description()})
        scalars = Scalars(run.file("tensorboard") if tensorboard else None)
        phase = time.perf_counter()
        dense_model, dense_masks, dense_train = _dense_model(run, stored, model, splits, settings, log, scalars)
        dense_seconds = time.perf_counter() - phase
        dense_model.to(device_used)
        dense = evaluate(dense_model, test_loader, device=device_used)
        log.info("dense accuracy %.4f", dense["accuracy"])
        calib = calibration_batches(splits.name, data_root, calib_samples, calib_batch_size, seed, **dataset_options)
        spectrum_data = _dense_spectrum(run, dense_model, calib, spectrum_top_k, spectrum_max_iter, seed, log)
        finetune_loader = datasets.loader(splits.train, batch_size=batch_size, train=True, seed=seed,
                                          subset=finetune_subset or train_subset,
                                          random_subset=(finetune_subset or train_subset) is not None,
                                          num_workers=num_workers, device=device_used)
        done = _finished_rows(run) if resume else {}
        rows = []
        for step, target in enumerate(targets):
            pruned_models = {}
            for criterion in criteria:
                if _row_key(criterion, target) in done:
                    rows.append(done[_row_key(criterion, target)])
                    continue
                options = _prune_options(criterion, mode, target, target_kind, cycles, prune_options, camp_hive_options)
                row, pruned_models[criterion] = _run_one(run, dense_model, dense_masks, criterion, target, target_kind,
                                                         options, calib, test_loader, finetune_loader, settings,
                                                         device_used, scalars, step)
                rows.append(row)
                _write_rows(run, rows)
                log.info("%s at %s %g: %.4f after pruning, %s after fine-tuning", criterion, target_kind, target,
                         row["pruned"], "–" if row["finetuned"] is None else f"{row['finetuned']:.4f}")
            if mode == "structured" and latency and pruned_models:
                timings = _time_models(dense_model, pruned_models, tuple(calib[0][0].shape[1:]), latency_batch_sizes,
                                       latency_seconds, latency_channels_last, latency_compiled)
                for row in rows:
                    if row["target"] == target and row["criterion"] in timings:
                        row.update(timings[row["criterion"]])
                _write_rows(run, rows)
        results = {
            "settings": settings, "machine": machine_description(), "device": str(device_used),
            "data": {"name": splits.name, "num_classes": splits.num_classes, "input_shape": list(splits.input_shape),
                     "train_samples": len(splits.train), "test_samples": len(test_loader.dataset)},
            "dense": {**dense, **_dense_size(dense_model, calib), "train": dense_train, "seconds": dense_seconds},
            "spectrum": spectrum_data, "rows": rows, "seconds": time.perf_counter() - started,
        }
        # The HTML report embeds the plots read back from the run folder: rank 0's job alone.
        results["headline"], results["files"] = write_reports(run, results) if run.writer else (None, None)
        run.write_json("results.json", results)
        log.info("%s", results["headline"])
        run.keep()
        return results
    except BaseException:
        scalars.close()
        run.discard()  # failed before the dense model was trained or a row was done: take back what this call wrote
        raise
    finally:
        scalars.close()
        run.close()


def _check_resume(run: RunFolder, settings: dict) -> None:
    path = run.file("config.yaml")
    if not path.is_file():
        return
    before = yaml.safe_load(path.read_text()) or {}
    now = yaml.safe_load(yaml.safe_dump(_jsonable(settings)))
    changed = sorted(key for key in now if key not in RESUMABLE_CHANGES and key in before and before[key] != now[key])
    if changed:
        raise ConfigError(f"--resume in {run.path} with different settings ({', '.join(changed)}: "
                          f"{before[changed[0]]!r} before, {now[changed[0]]!r} now); use the same settings or a new --out")


def _jsonable(value):
    return json.loads(json.dumps(value, default=lambda item: item.item() if hasattr(item, "item") else str(item)))


def _row_key(criterion: str, target: float) -> str:
    return f"{criterion}@{float(target):.6g}"


def _finished_rows(run: RunFolder) -> dict:
    path = run.file("rows.jsonl")
    if not path.is_file():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {_row_key(row["criterion"], row["target"]): row for row in rows}


def _dense_model(run: RunFolder, stored, model_name: str, splits, settings: dict, log, scalars: Scalars):
    """The dense model every criterion starts from: the checkpoint's, the one this run already
    trained (``resume``), or one trained now, resumably (state saved each epoch)."""
    dense_path = run.file("dense.safetensors")
    if stored is not None:
        save_checkpoint(dense_path, stored.model, stored.masks or None,
                        **{key: value for key, value in stored.metadata.items() if key not in ("format", "arch")})
        return stored.model, stored.masks or {}, {"checkpoint": str(settings["checkpoint"])}
    done_path = run.file("dense_train.json")
    if settings["resume"] and dense_path.is_file() and done_path.is_file():
        log.info("reusing the dense model trained by this run")
        return load_checkpoint(dense_path).model, {}, json.loads(done_path.read_text())
    seed_everything(settings["seed"])
    network = model_for(model_name, splits)
    loader = datasets.loader(splits.train, batch_size=settings["batch_size"], train=True, seed=settings["seed"],
                             subset=settings["train_subset"], random_subset=settings["train_subset"] is not None,
                             num_workers=settings["num_workers"], device=settings["device"])
    metadata = checkpoint_metadata(splits, seed=settings["seed"])
    state = None
    if settings["resume"] and run.file(DENSE_STATE).is_file():
        saved = load_training_state(run.file(DENSE_STATE))
        network.load_state_dict(saved["model"])
        state = TrainState(epoch=saved["epoch"], optimizer=saved["optimizer"], scheduler=saved["scheduler"],
                           history=json.loads(saved["history"]))
        log.info("resuming dense training at epoch %d", state.epoch)

    def on_epoch_end(record, train_state: TrainState) -> None:
        run.keep()  # a trained epoch is what --resume continues from: never discarded once written
        save_training_state(run.file(DENSE_STATE), {
            "model": network.state_dict(), "epoch": train_state.epoch, "optimizer": train_state.optimizer,
            "scheduler": train_state.scheduler, "history": json.dumps(train_state.history)})
        atomic_write_text(run.file("dense_metrics.jsonl"), "".join(json.dumps(row) + "\n" for row in train_state.history))
        scalars.add("dense/train_loss", record.train_loss, record.epoch)
        scalars.add("dense/train_accuracy", record.train_accuracy, record.epoch)
        log.info("dense epoch %d: loss %.4f train acc %.4f (%.1fs)", record.epoch, record.train_loss,
                 record.train_accuracy, record.seconds)

    result = train(network, loader, settings["dense_epochs"], lr=settings["dense_lr"], momentum=settings["momentum"],
                   nesterov=settings["nesterov"], weight_decay=settings["weight_decay"],
                   schedule=settings["dense_schedule"], warmup_epochs=settings["dense_warmup_epochs"],
                   label_smoothing=settings["label_smoothing"], device=settings["device"], seed=settings["seed"],
                   amp=settings["amp"], state=state, on_epoch_end=on_epoch_end)
    summary = result.to_dict()
    save_checkpoint(dense_path, network, epoch=settings["dense_epochs"], train=summary, **metadata)
    atomic_write_text(done_path, json.dumps(summary))
    return network, {}, summary


def _dense_size(model, calib) -> dict:
    from camphive.measure import model_summary

    summary = model_summary(model, calib[0][0][:1].to(next(model.parameters()).device))
    return {"parameters": summary["parameters"], "macs": summary["macs"], "macs_conv_linear": summary["macs_conv_linear"]}


def _dense_spectrum(run: RunFolder, model, calib, top_k: int, max_iter: int, seed: int, log) -> dict | None:
    """Top ``top_k`` loss-Hessian eigenvalues of the dense model on the calibration batches."""
    if top_k < 1:
        return None
    if run.file("spectrum.json").is_file() and run.file("convergence.png").is_file():
        return run.read_json("spectrum.json")
    from camphive.curvature import plot_convergence, spectrum

    result = spectrum(model, calib, top_k=top_k, per_layer=False, trace_probes=0, max_iter=max_iter, seed=seed)
    plot_convergence(result, run.file("convergence.png"))
    data = result.to_dict()
    run.write_json("spectrum.json", data)
    log.info("dense spectrum: %s (%d products, %.1fs)", data["global"].get("eigenvalues"), data["num_matvecs"],
             data["wall_time_s"])
    return data


def _prune_options(criterion, mode, target, target_kind, cycles, prune_options, camp_hive_options) -> dict:
    # The dense model's spectrum is measured once for all criteria (spectrum.json); the sharpness of every
    # pruned model costs two eigen-solves per run, so it is measured only when asked (spectrum_top_k=1,
    # unstructured; prune()'s default is 0).
    options = dict(prune_options)
    if criterion == METHOD:
        options.update(camp_hive_options)
        if cycles:
            options["cycles"] = cycles
    if target_kind == "macs_ratio":
        options["target_macs_ratio"] = target
    else:
        options["sparsity"] = target
    if mode == "structured":
        options["measure_latency"] = False  # timed here, every criterion of a target with the dense model at once
    return options


def _write_rows(run: RunFolder, rows: list[dict]) -> None:
    run.keep()  # finished rows are what --resume skips: never discarded once written
    atomic_write_text(run.file("rows.jsonl"), "".join(json.dumps(_jsonable(row)) + "\n" for row in rows))


def _time_models(dense_model, pruned: dict, input_shape, batch_sizes, seconds, channels_last, compiled) -> dict:
    """CPU latency of the dense model and every pruned one, measured interleaved in one run so
    machine noise falls on all alike; ``{criterion: row fields}``."""
    from camphive.measure import measure_latency

    def on_cpu(model):
        return model if all(p.device.type == "cpu" for p in model.parameters()) else copy.deepcopy(model).cpu()

    models = {"dense": on_cpu(dense_model), **{name: on_cpu(model) for name, model in pruned.items()}}
    report = measure_latency(models, input_shape, batch_sizes=tuple(batch_sizes), target_seconds=seconds,
                             channels_last=channels_last, compiled=compiled)
    timings = {}
    for name in pruned:
        per_batch = {f"batch_{size}": {"dense_ms": report.get("dense", size).median_ms,
                                       "pruned_ms": report.get(name, size).median_ms,
                                       "speedup": report.get(name, size).speedup,
                                       "dense_iqr_ms": report.get("dense", size).iqr_ms,
                                       "pruned_iqr_ms": report.get(name, size).iqr_ms,
                                       "repeats": report.get(name, size).repeats} for size in batch_sizes}
        first = per_batch[f"batch_{batch_sizes[0]}"]
        timings[name] = {"latency_batch": int(batch_sizes[0]), "dense_latency_ms": first["dense_ms"],
                         "latency_ms": first["pruned_ms"], "dense_latency_iqr_ms": first["dense_iqr_ms"],
                         "latency_iqr_ms": first["pruned_iqr_ms"], "speedup": first["speedup"],
                         "latency": {"device": report.device, "threads": report.threads,
                                     "channels_last": report.channels_last, "compiled": report.compiled,
                                     "load_average": report.load_average, **per_batch}}
    return timings


def _run_one(run, dense_model, dense_masks, criterion, target, target_kind, options, calib, test_loader,
             finetune_loader, settings, device, scalars: Scalars, step: int) -> tuple[dict, object]:
    """Prune a copy of the dense model with one criterion, evaluate, fine-tune, evaluate: (row, pruned model)."""
    log_path = run.file(f"logs/{criterion}.jsonl")
    if run.writer:
        log_path.parent.mkdir(exist_ok=True)

    def event(kind: str, **values) -> None:
        if not run.writer:
            return
        with log_path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(_jsonable({"event": kind, "criterion": criterion, "target": target,
                                               "time": timestamp(), **values})) + "\n")

    seed = settings["seed"]
    seed_everything(seed)
    model = copy.deepcopy(dense_model)
    sparsity = options.pop("sparsity", None)
    try:
        # The example (for MACs and tracing) on the model's device: MACs are counted by running the model on it.
        result = prune(model, calib, sparsity, mode=settings["mode"], criterion=criterion, seed=seed,
                       masks=dense_masks or None, example_inputs=calib[0][0][:1].to(device), **options)
    except CamphiveError as error:
        raise type(error)(f"{criterion} at {target_kind} {target:g}: {error}") from error
    pruned = evaluate(model, test_loader, device=device)
    event("pruned", accuracy=pruned["accuracy"], top5=pruned["top5"], sparsity=result.sparsity,
          seconds=result.seconds, num_hvps=result.num_hvps)
    scalars.add(f"{criterion}/pruned_accuracy", pruned["accuracy"], step)
    finetuned, history, finetune_seconds = None, [], 0.0
    if settings["finetune_epochs"]:
        def on_epoch_end(record, _state) -> None:
            event("finetune_epoch", epoch=record.epoch, train_loss=record.train_loss,
                  train_accuracy=record.train_accuracy, test_accuracy=record.test_accuracy, seconds=record.seconds)

        seed_everything(seed)
        trained = finetune(model, finetune_loader, settings["finetune_epochs"], masks=result.masks or None,
                           lr=settings["finetune_lr"], momentum=settings["momentum"], nesterov=settings["nesterov"],
                           weight_decay=settings["weight_decay"], schedule=settings["finetune_schedule"],
                           eval_data=test_loader if settings["finetune_epochs"] > 1 else None, device=device,
                           seed=seed, amp=settings["amp"], on_epoch_end=on_epoch_end)
        history, finetune_seconds = trained.to_dict()["history"], trained.seconds
        finetuned = evaluate(model, test_loader, device=device)
        event("finetuned", accuracy=finetuned["accuracy"], top5=finetuned["top5"], seconds=finetune_seconds)
        scalars.add(f"{criterion}/finetuned_accuracy", finetuned["accuracy"], step)
    return _row(criterion, target, result, pruned, finetuned, history, finetune_seconds), model


def _row(criterion, target, result, pruned, finetuned, history, finetune_seconds) -> dict:
    before, after = result.before, result.after
    structured = result.mode == "structured"
    macs_after = after["macs"] if structured else after["macs_nonzero"]
    details = result.to_dict()
    details.pop("layer_sparsity", None)
    return {
        "criterion": criterion, "target": float(target), "sparsity": result.sparsity,
        "parameters": after["parameters"] if structured else after["nonzero_parameters"],
        "macs": macs_after, "macs_ratio": before["macs"] / max(macs_after, 1),
        "pruned": pruned["accuracy"], "pruned_top5": pruned["top5"], "pruned_loss": pruned["loss"],
        "finetuned": finetuned["accuracy"] if finetuned else None,
        "finetuned_top5": finetuned["top5"] if finetuned else None,
        "finetuned_loss": finetuned["loss"] if finetuned else None,
        "latency_batch": None, "dense_latency_ms": None, "latency_ms": None, "dense_latency_iqr_ms": None,
        "latency_iqr_ms": None, "speedup": None,
        "sharpness_after": (result.extra.get("sharpness", {}).get("after") or [None])[0],
        "num_hvps": result.num_hvps, "curvature_seconds": result.curvature_seconds, "prune_seconds": result.seconds,
        "finetune_seconds": finetune_seconds,
        "layer_sparsity": result.layer_sparsity, "finetune_history": history, "prune": details,
    }
