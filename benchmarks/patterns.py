"""N:M semi-structured pruning (2:4, 4:8) on Fashion-MNIST: CAMP-HiVe against the baselines under the same pattern.

For each model: one dense model (cached, as benchmarks/unstructured.py trains it), one set of
calibration images, one fine-tuning budget; every criterion prunes a copy of the same weights to
the same N:M pattern with its own scores (CAMP-HiVe then folds each unit's pruned weights into its
kept ones by least squares). Every run is checked to hold the pattern exactly in every group of
every patterned layer. Optional reference rows prune the same fraction without a pattern. Reports
accuracy right after pruning and after masked fine-tuning, and writes the tables to RESULTS.md.

    python benchmarks/patterns.py --models small-cnn --patterns 2:4,4:8 --criteria camp-hive,magnitude
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import time

import torch
from common import accuracy, append_results, cache_dir, dense_model, test_batches

from camphive import data
from camphive.layers import prunable_parameters
from camphive.pruning import prune
from camphive.pruning.unstructured.patterns import pattern_layout, pattern_violations
from camphive.report import markdown_table
from camphive.training import finetune

GREEDY_ROW = "camp-hive, forward selection within units"
ABLATION_NOTE = ("; the ablation row chooses each unit's kept weights jointly by forward selection on its Gram, "
                 "the same count in every group, in the last cycle (unit_selection='greedy')")
REFIT_NOTE = ("; the ', refit' rows add refit=True: after the last cycle every layer's kept weights refitted to the "
              "unpruned model's outputs, layer after layer")
# Calibration images and fine-tuning images per model, as benchmarks/unstructured.py's tables use them.
BUDGETS = {"small-cnn": (1024, 20000), "resnet20": (512, 10000)}


def run_one(dense, calib, test, finetune_loader, options: dict, finetune_epochs: int, seed: int) -> dict:
    """Prune a copy of ``dense`` with ``options``; accuracy after pruning and after masked fine-tuning."""
    model = copy.deepcopy(dense)
    started = time.perf_counter()
    result = prune(model, calib, seed=seed, **options)
    row = {"seconds": time.perf_counter() - started, "achieved": result.sparsity, "pruned": accuracy(model, test)}
    if options.get("pattern"):
        layout = pattern_layout(model, prunable_parameters(model), options["pattern"])
        row["violations"] = sum(pattern_violations(result.masks, layout).values())
        row["dense_layers"] = result.extra["dense_layers"]
    if finetune_epochs:
        finetune(model, finetune_loader, finetune_epochs, masks=result.masks, lr=0.01, device="cpu", seed=seed)
        row["finetuned"] = accuracy(model, test)
    return row


def table(results: dict, columns: list[str]) -> str:
    """One row per criterion, one column per setting: 'after pruning / after fine-tuning'."""
    rows = []
    for criterion, cells in results.items():
        row = {"criterion": criterion}
        for column in columns:
            cell = cells.get(column)
            if cell:
                row[column] = " / ".join(f"{cell[key]:.3f}" for key in ("pruned", "finetuned") if key in cell)
        seconds = [cell["seconds"] for cell in cells.values()]
        row["seconds"] = f"{sum(seconds) / len(seconds):.1f}"
        rows.append(row)
    return markdown_table(rows, [("criterion", "criterion"), *[(c, c) for c in columns], ("seconds", "prune s (mean)")])


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="small-cnn")
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--dense-epochs", type=int, default=1)
    parser.add_argument("--patterns", default="2:4,4:8")
    parser.add_argument("--criteria", default="camp-hive,magnitude")
    parser.add_argument("--reference", action="store_true", help="also prune to N/M without a pattern")
    parser.add_argument("--ablation", action="store_true",
                        help="also CAMP-HiVe with unit_selection='greedy' (forward selection within each unit, the "
                             "same count per group) beside its default under a pattern (each group's top scores)")
    parser.add_argument("--refit", action="store_true",
                        help="also every criterion with refit=True (each layer refitted to the unpruned model's "
                             "outputs, layer after layer, after the last cycle)")
    parser.add_argument("--finetune-epochs", type=int, default=1)
    parser.add_argument("--finetune-samples", type=int, default=None, help="default: the model's budget")
    parser.add_argument("--calib-samples", type=int, default=None, help="default: the model's budget")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-write", action="store_true", help="print only; do not write RESULTS.md")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    patterns = [item.strip() for item in args.patterns.split(",") if item.strip()]
    criteria = [item.strip() for item in args.criteria.split(",") if item.strip()]
    for model_name in args.models.split(","):
        calib_samples, finetune_samples = BUDGETS.get(model_name, (1024, 20000))
        calib_samples, finetune_samples = args.calib_samples or calib_samples, args.finetune_samples or finetune_samples
        loads = [os.getloadavg()[0]]
        dense, per_epoch = dense_model(model_name, args.dataset, args.dense_epochs, seed=args.seed)
        test = test_batches(args.dataset)
        dense_accuracy = accuracy(dense, test)
        calib_set = data.load(args.dataset, split="train", transform="eval")
        calib = list(data.loader(calib_set, batch_size=128, subset=calib_samples, random_subset=True, seed=args.seed))
        finetune_loader = data.loader(data.load(args.dataset, split="train"), batch_size=128, train=True,
                                      seed=args.seed, subset=finetune_samples, random_subset=True)
        partial = cache_dir() / f"patterns-{model_name}-partial.json"
        results: dict = {}
        settings = {pattern: {"pattern": pattern} for pattern in patterns}
        if args.reference:  # the same fractions without a pattern, once each
            fractions = sorted({int(n) / int(m) for n, m in (pattern.split(":") for pattern in patterns)})
            settings.update({f"{fraction:g} unstructured": {"sparsity": fraction} for fraction in fractions})
        rows = {criterion: {"criterion": criterion} for criterion in criteria}
        if args.ablation:
            rows[GREEDY_ROW] = {"criterion": "camp-hive", "unit_selection": "greedy"}
        if args.refit:
            rows.update({f"{criterion}, refit": {"criterion": criterion, "refit": True} for criterion in criteria})
        for column, options in settings.items():
            for criterion, row_options in rows.items():
                row = run_one(dense, calib, test, finetune_loader, {**row_options, **options},
                              args.finetune_epochs, args.seed)
                results.setdefault(criterion, {})[column] = row
                loads.append(os.getloadavg()[0])
                print(model_name, criterion, column, json.dumps(row), f"load {loads[-1]:.1f}", flush=True)
                partial.write_text(json.dumps(results))
        checks = [cell for cells in results.values() for cell in cells.values() if "violations" in cell]
        dense_layers = sorted({name for cell in checks for name in cell["dense_layers"]})
        body = (f"{model_name} on {args.dataset}, dense accuracy {dense_accuracy:.4f} after {args.dense_epochs} "
                f"epoch(s) ({per_epoch or 0:.0f} s/epoch); {calib_samples} calibration images; fine-tuning: "
                f"{args.finetune_epochs} epoch(s) on {finetune_samples} images, lr 0.01, masks enforced; seed "
                f"{args.seed}; {args.threads} thread(s). Each criterion with its defaults (CAMP-HiVe: 3 cycles, "
                "least-squares merge, each group's highest scores kept; magnitude, Wanda: 1 cycle, plain removal;"
                " SparseGPT: 1 cycle, its own update of the kept weights), the same pattern for all"
                f"{ABLATION_NOTE if args.ablation else ''}{REFIT_NOTE if args.refit else ''}. Cells: accuracy right after pruning / after fine-tuning.\n\n"
                f"Pattern held exactly in every group of every patterned layer: "
                f"{'yes' if all(cell['violations'] == 0 for cell in checks) else 'NO'} ({len(checks)} runs). "
                f"Left dense (no N:M layout): {', '.join(dense_layers) or 'none'}; the achieved global sparsity "
                f"is {min(cell['achieved'] for cell in checks):.4f} at the lowest. One-minute load average "
                f"before the runs and after each: {min(loads):.1f} to {max(loads):.1f} on {os.cpu_count()} cores "
                f"(a machine shared with other work; 'prune s' is wall time under that load).\n\n"
                f"{table(results, list(settings))}")
        print(body)
        if not args.no_write:
            kind = "N:M semi-structured pruning" + (" with refit" if args.refit else "")
            append_results(f"{kind}: {model_name} on {args.dataset}", body)


if __name__ == "__main__":
    main()
