"""Gradual pruning during fine-tuning against one-shot pruning then fine-tuning, at equal epochs.

One dense model (cached), one set of calibration images, one fine-tuning budget (the same
epochs, images, learning rate and seed) for every row. Gradual rows prune on the cubic schedule
in ``--pruning-steps`` steps over the first 80 % of the fine-tuning steps
(:func:`camphive.prune_gradually`); one-shot rows prune with the criterion's defaults, then
fine-tune with masks for the same epochs. Writes the table to benchmarks/RESULTS.md.

    python benchmarks/gradual.py --sparsities 0.95,0.98 --epochs 2 --finetune-samples 20000
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import time

import torch
from common import accuracy, append_results, cache_dir, dense_model, machine, test_batches

from camphive import data
from camphive.gradual import prune_gradually
from camphive.pruning import prune
from camphive.report import markdown_table
from camphive.training import finetune

METHODS = {
    "CAMP-HiVe, gradual": ("gradual", "camp-hive"),
    "magnitude, gradual": ("gradual", "magnitude"),
    "CAMP-HiVe, one-shot then fine-tune": ("one-shot", "camp-hive"),
    "magnitude, one-shot then fine-tune": ("one-shot", "magnitude"),
}


def run_one(dense, calib, test, loader, sparsity, schedule, criterion, args) -> dict:
    """One row's cell: accuracy right after pruning (one-shot only) and after the fine-tuning epochs."""
    model = copy.deepcopy(dense)
    started = time.perf_counter()
    if schedule == "gradual":
        result, _ = prune_gradually(model, loader, calib, sparsity, epochs=args.epochs, pruning_steps=args.pruning_steps,
                                    lr=args.lr, device="cpu", seed=args.seed, criterion=criterion)
        row = {"pruned": None, "prune_seconds": result.seconds}
    else:
        result = prune(model, calib, sparsity, criterion=criterion, seed=args.seed)
        row = {"pruned": accuracy(model, test), "prune_seconds": result.seconds}
        finetune(model, loader, args.epochs, masks=result.masks, lr=args.lr, device="cpu", seed=args.seed)
    row.update(finetuned=accuracy(model, test), sparsity=result.sparsity, wall_seconds=time.perf_counter() - started)
    return row


def table(results: dict, sparsities) -> str:
    columns = [("method", "method")] + [(str(s), str(s)) for s in sparsities] + [
        ("prune", "pruning s (mean)"), ("wall", "wall s (mean)")]
    rows = []
    for name, cells in results.items():
        row = {"method": name}
        for s in sparsities:
            cell = cells.get(str(s))
            if cell is not None:
                pruned = "—" if cell["pruned"] is None else f"{cell['pruned']:.4f}"
                row[str(s)] = f"{pruned} / {cell['finetuned']:.4f}"
        done = list(cells.values())
        row["prune"] = f"{sum(c['prune_seconds'] for c in done) / max(len(done), 1):.1f}"
        row["wall"] = f"{sum(c['wall_seconds'] for c in done) / max(len(done), 1):.0f}"
        rows.append(row)
    return markdown_table(rows, columns)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small-cnn")
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--dense-epochs", type=int, default=1)
    parser.add_argument("--sparsities", default="0.95,0.98")
    parser.add_argument("--methods", default=";".join(METHODS), help="row names, separated by semicolons")
    parser.add_argument("--epochs", type=int, default=2, help="fine-tuning epochs, the same for every row")
    parser.add_argument("--pruning-steps", type=int, default=10)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--finetune-samples", type=int, default=20000, help="fine-tune on N random training images")
    parser.add_argument("--calib-samples", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-write", action="store_true", help="print only; do not write to RESULTS.md")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    sparsities = [float(s) for s in args.sparsities.split(",")]
    dense, per_epoch = dense_model(args.model, args.dataset, args.dense_epochs, seed=args.seed)
    test = test_batches(args.dataset)
    dense_accuracy = accuracy(dense, test)
    train_set = data.load(args.dataset, split="train")
    calib_set = data.load(args.dataset, split="train", transform="eval")
    calib = list(data.loader(calib_set, batch_size=128, subset=args.calib_samples, random_subset=True, seed=args.seed))
    loader = data.loader(train_set, batch_size=128, train=True, seed=args.seed, subset=args.finetune_samples,
                         random_subset=args.finetune_samples is not None)
    partial = cache_dir() / f"gradual-{args.model}-partial.json"
    results: dict = {}
    for name in [name.strip() for name in args.methods.split(";") if name.strip()]:
        schedule, criterion = METHODS[name]
        results[name] = {}
        for s in sparsities:
            results[name][str(s)] = run_one(dense, calib, test, loader, s, schedule, criterion, args)
            print(name, s, json.dumps(results[name][str(s)]), flush=True)
            partial.write_text(json.dumps(results))
    load_after = os.getloadavg()
    body = (f"{args.model} on {args.dataset}, dense accuracy {dense_accuracy:.4f} after {args.dense_epochs} epoch(s) "
            f"({per_epoch or 0:.0f} s/epoch); {args.calib_samples} calibration images; every row fine-tunes "
            f"{args.epochs} epoch(s) on {args.finetune_samples or len(train_set)} images (lr {args.lr}, cosine, "
            f"masks enforced, seed {args.seed}). Gradual rows prune in {args.pruning_steps} steps on the cubic "
            "schedule over the first 80 % of the fine-tuning steps (one cycle per step, BatchNorm recalibrated); "
            "one-shot rows prune with the criterion's defaults (CAMP-HiVe: 3 cycles, least-squares merge; "
            "magnitude: 1 cycle, no merge), then fine-tune. Cells: accuracy right after pruning (— for gradual "
            "runs, which have no such point) / after the fine-tuning epochs. 'pruning s': seconds spent pruning "
            f"(all steps); 'wall s': the whole row. Load average (1 min) {load_before[0]:.1f} at the start, "
            f"{load_after[0]:.1f} at the end ({os.cpu_count()} cores, shared).\n\n{table(results, sparsities)}")
    print(body)
    print(machine())
    if not args.no_write:
        append_results(f"Gradual pruning during fine-tuning: {args.model} on {args.dataset}", body)


if __name__ == "__main__":
    main()
