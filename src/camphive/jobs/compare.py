"""``camphive compare``: CAMP-HiVe against the baselines, fair by construction.

Every criterion starts from the same dense weights, reads the same calibration batches,
uses the same seed and gets the same fine-tuning budget (same samples, same order, same
augmentation draws). The run folder holds:

- ``config.yaml``: the resolved settings (with the config file they came from) and the machine;
- ``dense.safetensors``: the dense model (trained here unless ``checkpoint`` is given),
  ``dense_metrics.jsonl`` its training epochs; its accuracy is reported as trained and, as
  pruning re-estimates BatchNorm statistics on the calibration images, after the same
  re-estimation (the reference the pruned models are read against);
- ``logs/<criterion>.jsonl``: each criterion's events (pruned, fine-tune epochs, fine-tuned),
  appended as they happen; ``rows.jsonl``: one line per finished (criterion, target), what
  ``resume`` skips;
- ``spectrum.json`` and ``convergence.png``: the dense model's top Hessian eigenvalues;
- ``results.json``, ``results.csv``, ``report.md``, ``report.html`` (self-contained) and the PNGs.
"""
from __future__ import annotations

import time
from pathlib import Path

from camphive import data as datasets
from camphive.jobs.common import calibration_batches, machine_description
from camphive.jobs.compare_dense import dense_accuracy, dense_model, dense_size, dense_spectrum
from camphive.jobs.compare_options import Scalars
from camphive.jobs.compare_plan import Plan, check_resume, make_plan
from camphive.jobs.compare_report import write_reports
from camphive.jobs.compare_runs import CriterionRuns
from camphive.runs import RunFolder, timestamp


def compare_job(
    *,
    model: str = "small-cnn",
    dataset: str | None = "fashion-mnist",
    data_root: str | None = None,
    dataset_options=None,
    checkpoint: str | Path | None = None,
    out: str | Path = "runs/compare",
    criteria=None,
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

    ``criteria``: names (None: :data:`~camphive.jobs.compare_options.DEFAULT_CRITERIA` of the mode).
    ``sparsities`` (or, with ``mode="structured"``, ``macs_ratios``): the targets. ``cycles`` and
    ``camp_hive_options`` go to CAMP-HiVe only, ``prune_options`` to every criterion (see
    :func:`camphive.prune`). ``train_subset`` limits dense training and fine-tuning (N random
    training samples), ``finetune_subset`` fine-tuning alone. Returns the results dict written
    to ``results.json``, with ``headline`` and ``files``.
    """
    started = time.perf_counter()
    settings = {key: value for key, value in locals().items() if key != "started"}
    plan = make_plan(settings)
    run = RunFolder.create(out, overwrite=overwrite, resume=resume)
    scalars = Scalars(None)
    try:
        if resume:
            check_resume(run, settings)
        run.write_config({"command": "compare", **settings, "started": timestamp(), "device_used": str(plan.device),
                          "machine": machine_description()})
        scalars = Scalars(run.file("tensorboard") if tensorboard else None)
        results = _run(run, plan, scalars, started)
        run.keep()
        return results
    except BaseException:
        scalars.close()
        run.discard()  # failed before the dense model was trained or a row was done: take back what this call wrote
        raise
    finally:
        scalars.close()
        run.close()


def _run(run: RunFolder, plan: Plan, scalars: Scalars, started: float) -> dict:
    """The dense stage, every (criterion, target), the reports; the results dict."""
    settings, splits, device = plan.settings, plan.splits, plan.device
    log = run.logger()
    test_loader = plan.test_loader
    phase = time.perf_counter()
    model, masks, trained = dense_model(run, plan.stored, settings["model"], splits, settings, log, scalars)
    dense_seconds = time.perf_counter() - phase
    model.to(device)
    calib = calibration_batches(splits.name, settings["data_root"], settings["calib_samples"],
                                settings["calib_batch_size"], settings["seed"], **settings["dataset_options"])
    dense = dense_accuracy(model, test_loader, calib, plan.recalibrate_bn, device, log)
    spectrum_data = dense_spectrum(run, model, calib, settings["spectrum_top_k"], settings["spectrum_max_iter"],
                                   settings["seed"], log)
    samples = settings["finetune_subset"] or settings["train_subset"]
    finetune_loader = datasets.loader(splits.train, batch_size=settings["batch_size"], train=True,
                                      seed=settings["seed"], subset=samples, random_subset=samples is not None,
                                      num_workers=settings["num_workers"], device=device)
    rows = CriterionRuns(run, settings, model, masks, calib, test_loader, finetune_loader, device, scalars,
                         log).all_rows()
    results = {
        "settings": settings, "machine": machine_description(), "device": str(device),
        "data": {"name": splits.name, "num_classes": splits.num_classes, "input_shape": list(splits.input_shape),
                 "train_samples": len(splits.train), "test_samples": len(test_loader.dataset)},
        "dense": {**dense, **dense_size(model, calib), "train": trained, "seconds": dense_seconds},
        "spectrum": spectrum_data, "rows": rows, "seconds": time.perf_counter() - started,
    }
    # The HTML report embeds the plots read back from the run folder: rank 0's job alone.
    results["headline"], results["files"] = write_reports(run, results) if run.writer else (None, None)
    run.write_json("results.json", results)
    log.info("%s", results["headline"])
    return results
