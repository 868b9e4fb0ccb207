"""``camphive demo``: the main job, end to end on Fashion-MNIST.

Trains the default small CNN (or reuses the cached dense model trained with the same
settings), prunes a copy with CAMP-HiVe and with magnitude pruning at several sparsities
from the same calibration batches, fine-tunes each briefly with masks enforced, and writes
``report.md``, ``results.json`` and ``accuracy.png`` in the run folder.
"""
from __future__ import annotations

import copy
import os
import time
from pathlib import Path

from camphive import data as datasets
from camphive.checkpoints import load_checkpoint, save_checkpoint
from camphive.jobs.common import (
    calibration_batches,
    checkpoint_metadata,
    load_splits,
    loaders,
    machine_description,
    model_for,
    seed_everything,
)
from camphive.pruning import prune
from camphive.report import accuracy_plot, markdown_table
from camphive.runs import RunFolder, atomic_write_text, timestamp
from camphive.training import evaluate, finetune, train

DEMO_MODEL = "small-cnn"
DEMO_DATASET = "fashion-mnist"
SPARSITIES = (0.5, 0.8, 0.9, 0.95)
CRITERIA = ("camp-hive", "magnitude")


def cache_dir() -> Path:
    return Path(os.environ.get("CAMPHIVE_CACHE", Path.home() / ".cache" / "camphive"))


def dense_model(splits, epochs: int, seed: int, device: str, log) -> tuple:
    """Train the dense demo model, or load it from the cache when trained with the same settings."""
    cached = cache_dir() / f"dense-{DEMO_MODEL}-{DEMO_DATASET}-e{epochs}-s{seed}.safetensors"
    if cached.is_file():
        try:
            stored = load_checkpoint(cached)
            log.info("reusing cached dense model %s", cached)
            return stored.model, stored.metadata.get("train", {}), True
        except Exception as error:  # a stale or damaged cache is rebuilt, never trusted
            log.info("cache %s unusable (%s); training again", cached, error)
    seed_everything(seed)
    model = model_for(DEMO_MODEL, splits)
    train_loader, _ = loaders(splits, batch_size=128, seed=seed, device=device)
    result = train(model, train_loader, epochs, lr=0.05, weight_decay=5e-4, schedule="cosine", device=device, seed=seed)
    summary = result.to_dict()
    save_checkpoint(cached, model, train=summary, **checkpoint_metadata(splits, seed=seed))
    return model, summary, False


def demo_job(*, out: str | Path | None = None, data_root: str | None = None, epochs: int = 4,
             sparsities=SPARSITIES, criteria=CRITERIA, finetune_samples: int = 12000, calib_samples: int = 1024,
             device: str = "auto", seed: int = 0, overwrite: bool = False) -> dict:
    started = time.perf_counter()
    splits = load_splits(DEMO_DATASET, data_root)
    out = Path(out) if out is not None else Path("runs") / f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    run = RunFolder.create(out, overwrite=overwrite)
    log = run.logger()
    run.write_config({"command": "demo", "out": str(out), "data_root": data_root, "epochs": epochs,
                      "sparsities": list(sparsities), "criteria": list(criteria), "finetune_samples": finetune_samples,
                      "calib_samples": calib_samples, "device": device, "seed": seed, "model": DEMO_MODEL,
                      "dataset": DEMO_DATASET, "started": timestamp(), "machine": machine_description()})
    _, test_loader = loaders(splits, batch_size=512, seed=seed, device=device)
    model, train_summary, from_cache = dense_model(splits, epochs, seed, device, log)
    dense = evaluate(model, test_loader, device=device)
    log.info("dense accuracy %.4f", dense["accuracy"])
    save_checkpoint(run.file("dense.safetensors"), model, **checkpoint_metadata(splits, seed=seed))
    calib = calibration_batches(DEMO_DATASET, data_root, calib_samples, 128, seed)
    finetune_loader = datasets.loader(splits.train, batch_size=128, train=True, seed=seed,
                                      subset=finetune_samples, random_subset=True, device=device)
    rows = []
    for sparsity in sparsities:
        for criterion in criteria:
            pruned_model = copy.deepcopy(model)
            # No sharpness (top loss-Hessian eigenvalue before/after): the demo reports accuracy,
            # and the two Lanczos runs per model took about half of its time (measured).
            result = prune(pruned_model, calib, sparsity, criterion=criterion, seed=seed, spectrum_top_k=0)
            after_prune = evaluate(pruned_model, test_loader, device=device)
            finetune(pruned_model, finetune_loader, 1, masks=result.masks, lr=0.01, device=device, seed=seed)
            after_finetune = evaluate(pruned_model, test_loader, device=device)
            rows.append({"criterion": criterion, "sparsity": sparsity, "pruned": after_prune["accuracy"],
                         "finetuned": after_finetune["accuracy"], "nonzero_weights": result.after["prunable_nonzero"],
                         "macs_nonzero": result.after["macs_nonzero"], "prune_seconds": result.seconds,
                         "config": result.config})
            log.info("%s at %.2f: %.4f after pruning, %.4f after fine-tuning", criterion, sparsity,
                     after_prune["accuracy"], after_finetune["accuracy"])
    accuracy_plot(rows, run.file("accuracy.png"), dense=dense["accuracy"],
                  title=f"{DEMO_MODEL} on {DEMO_DATASET}: accuracy vs sparsity")
    seconds = time.perf_counter() - started
    results = {"dense": dense, "train": train_summary, "dense_from_cache": from_cache, "rows": rows, "seconds": seconds}
    run.write_json("results.json", results)
    table = markdown_table(rows, [("sparsity", "sparsity"), ("criterion", "criterion"),
                                  ("pruned", "accuracy after pruning"), ("finetuned", "after fine-tuning"),
                                  ("nonzero_weights", "non-zero weights"), ("macs_nonzero", "non-zero MACs")])
    report = (f"# camphive demo\n\n{DEMO_MODEL} on {DEMO_DATASET}; dense test accuracy {dense['accuracy']:.4f} "
              f"({'cached model' if from_cache else f'trained {epochs} epochs'}). Each pruned model starts from the "
              f"same dense weights and the same {calib_samples} calibration images, and is fine-tuned for one pass "
              f"over {finetune_samples} training images with masks enforced.\n\n{table}\n"
              f"![accuracy vs sparsity](accuracy.png)\n\nTotal time {seconds:.0f} s.\n")
    atomic_write_text(run.file("report.md"), report)
    run.close()
    best = {criterion: max((row["finetuned"] for row in rows if row["criterion"] == criterion and row["sparsity"] == max(sparsities)),
                           default=None) for criterion in criteria}
    summary = (f"dense {DEMO_MODEL} on {DEMO_DATASET}: {dense['accuracy']:.4f}; at sparsity {max(sparsities)} after "
               f"fine-tuning: " + ", ".join(f"{name} {value:.4f}" for name, value in best.items()) +
               f"\nreport: {run.file('report.md')} ({seconds:.0f} s)")
    return {"summary": summary, **results}
