"""``camphive demo``: the main job, end to end on Fashion-MNIST.

Trains the default small CNN (or reuses the cached dense model trained with the same
settings), evaluates it, and writes ``report.md`` and ``results.json`` in the run folder.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from camphive.checkpoints import load_checkpoint, save_checkpoint
from camphive.jobs.common import checkpoint_metadata, load_splits, loaders, machine_description, model_for, seed_everything
from camphive.runs import RunFolder, atomic_write_text, timestamp
from camphive.training import evaluate, train

DEMO_MODEL = "small-cnn"
DEMO_DATASET = "fashion-mnist"


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
    train_loader, _ = loaders(splits, batch_size=128, seed=seed)
    result = train(model, train_loader, epochs, lr=0.05, weight_decay=5e-4, schedule="cosine",
                   device=device, seed=seed)
    summary = result.to_dict()
    save_checkpoint(cached, model, train=summary, **checkpoint_metadata(splits, seed=seed))
    return model, summary, False


def demo_job(*, out: str | Path | None = None, data_root: str | None = None, epochs: int = 4,
             device: str = "auto", seed: int = 0, overwrite: bool = False) -> dict:
    started = time.perf_counter()
    out = Path(out) if out is not None else Path("runs") / f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    run = RunFolder.create(out, overwrite=overwrite)
    log = run.logger()
    run.write_config({"command": "demo", "out": str(out), "data_root": data_root, "epochs": epochs,
                      "device": device, "seed": seed, "model": DEMO_MODEL, "dataset": DEMO_DATASET,
                      "started": timestamp(), "machine": machine_description()})
    splits = load_splits(DEMO_DATASET, data_root)
    _, test_loader = loaders(splits, batch_size=256, seed=seed)
    model, train_summary, from_cache = dense_model(splits, epochs, seed, device, log)
    dense = evaluate(model, test_loader, device=device)
    save_checkpoint(run.file("model.safetensors"), model, **checkpoint_metadata(splits, seed=seed))
    results = {"dense": dense, "train": train_summary, "dense_from_cache": from_cache,
               "seconds": time.perf_counter() - started}
    run.write_json("results.json", results)
    summary = (f"dense {DEMO_MODEL} on {DEMO_DATASET}: test accuracy {dense['accuracy']:.4f}"
               f" ({'cached' if from_cache else f'trained {epochs} epochs'}); report: {run.file('report.md')}")
    atomic_write_text(run.file("report.md"), f"# camphive demo\n\n{summary}\n")
    run.close()
    return {"summary": summary, **results}
