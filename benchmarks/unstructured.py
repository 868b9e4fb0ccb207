"""Unstructured pruning on Fashion-MNIST: every criterion through the same pipeline, and the ablation.

For each model: one dense model (cached), one set of calibration images, one fine-tuning
budget; every criterion and every CAMP-HiVe variant starts from the same weights. Reports
accuracy right after pruning and after masked fine-tuning, and appends the tables to
benchmarks/RESULTS.md.

    python benchmarks/unstructured.py --models small-cnn --dense-epochs 1 --ablation
"""
from __future__ import annotations

import argparse
import copy
import json
import time

import torch
from common import accuracy, append_results, cache_dir, dense_model, test_batches

from camphive import data
from camphive.pruning import prune
from camphive.report import markdown_table
from camphive.training import finetune

# The classic baselines, then the one-shot peers (Wanda; SparseGPT and OBC solve whole layers), each with its own
# defaults (Wanda: per-unit selection, no merge; SparseGPT, OBC: uniform per layer, sequential, their own update).
CRITERIA = ["camp-hive", "magnitude", "random", "taylor", "obd", "hutchinson", "wanda", "sparsegpt", "obc"]

# name -> prune() options; the ablation of docs/method.md section 11 and beyond (scores x pairing x merge x cycles).
# The w²G_jj rows without (γ/σ)² set loss_weighting="none" explicitly: the default became "batchnorm".
ABLATION = {
    "magnitude, no merge": dict(criterion="magnitude", merge="none"),
    "magnitude, cyclic pairs": dict(criterion="magnitude", merge="curvature", pairing="cyclic"),
    "magnitude, coupled pairs": dict(criterion="magnitude", merge="curvature", pairing="coupled"),
    "magnitude, half merge": dict(criterion="magnitude", merge="half", pairing="cyclic"),
    "magnitude, least squares": dict(criterion="magnitude", merge="least_squares"),
    "w²G_jj, no merge": dict(criterion="camp-hive", loss_weighting="none", score="diagonal", merge="none"),
    "w²G_jj, cyclic pairs": dict(criterion="camp-hive", loss_weighting="none", score="diagonal", merge="curvature", pairing="cyclic"),
    "w²G_jj, coupled pairs": dict(criterion="camp-hive", loss_weighting="none", score="diagonal", merge="curvature", pairing="coupled"),
    "w²G_jj, least squares": dict(criterion="camp-hive", loss_weighting="none", score="diagonal", merge="least_squares"),
    "w²G_jj, least squares, 3 cycles": dict(criterion="camp-hive", loss_weighting="none", score="diagonal", merge="least_squares", cycles=3),
    "w²G_jj, coupled pairs, 3 cycles": dict(criterion="camp-hive", loss_weighting="none", score="diagonal", merge="curvature", pairing="coupled", cycles=3),
    "w²G_jj, least squares, per-layer": dict(criterion="camp-hive", loss_weighting="none", score="diagonal", merge="least_squares", selection="layer"),
    "w²G_jj·A_rr (Fisher), least squares": dict(criterion="camp-hive", loss_weighting="unit", merge="least_squares"),
    "w²G_jj·A_l (Fisher), least squares": dict(criterion="camp-hive", loss_weighting="layer", merge="least_squares"),
    "OBS saliency, least squares": dict(criterion="camp-hive", loss_weighting="none", score="obs", merge="least_squares"),
    "OBS saliency, coupled pairs": dict(criterion="camp-hive", loss_weighting="none", score="obs", merge="curvature", pairing="coupled"),
    "diag_lowrank (top-20, loss), no merge": dict(criterion="camp-hive", score="diag_lowrank", top_k=20, merge="none"),
    "hv_product (loss), no merge": dict(criterion="camp-hive", score="hv_product", top_k=1, merge="none"),
    "w²G_jj, loss-curvature pairs (top-20)": dict(criterion="camp-hive", score="diagonal", curvature="loss", top_k=20,
                                                  merge="curvature", pairing="coupled"),
    "w²G_jj, least squares, BN recalibrated": dict(criterion="camp-hive", loss_weighting="none", merge="least_squares", recalibrate_bn=True),
    "w²G_jj·(γ/σ)², least squares": dict(criterion="camp-hive", loss_weighting="batchnorm", merge="least_squares"),
    "w²G_jj·(γ/σ)², least squares, BN recalibrated": dict(criterion="camp-hive", loss_weighting="batchnorm",
                                                          merge="least_squares", recalibrate_bn=True),
    "w²G_jj·(γ/σ)², least squares, 3 cycles": dict(criterion="camp-hive", loss_weighting="batchnorm",
                                                   merge="least_squares", cycles=3),
    "magnitude, BN recalibrated": dict(criterion="magnitude", recalibrate_bn=True),
    "taylor, BN recalibrated": dict(criterion="taylor", recalibrate_bn=True),
    "obd, BN recalibrated": dict(criterion="obd", recalibrate_bn=True),
    "hutchinson, BN recalibrated": dict(criterion="hutchinson", recalibrate_bn=True),
    "w²G_jj·(γ/σ)², least squares, 3 cycles, BN recalibrated": dict(criterion="camp-hive", loss_weighting="batchnorm",
                                                                    merge="least_squares", cycles=3,
                                                                    recalibrate_bn=True),
    # The peers with CAMP-HiVe's allocation instead of their uniform one: layer counts from its global selection
    # (SparseGPT, OBC), or Wanda's scores compared over all layers.
    "sparsegpt, global counts": dict(criterion="sparsegpt", selection="global"),
    # CAMP-HiVe's default before 2026-12-01: each unit keeps its highest-scoring weights (no forward selection).
    "camp-hive, units keep their top scores": dict(criterion="camp-hive", unit_selection="scores"),
    "obc, global counts": dict(criterion="obc", selection="global"),
    # How the least-squares merge is solved: the default "auto" (direct up to 128 wide, conjugate gradients above)
    # against a direct factorisation for every unit (the default before 2026-12-01's second session) and CG for all.
    "camp-hive, merge solved directly": dict(criterion="camp-hive", merge_solver="direct"),
    "camp-hive, merge by conjugate gradients": dict(criterion="camp-hive", merge_solver="cg"),
    # The layer-by-layer refit to the unpruned model's outputs after the last cycle (refit=True), for the peers, which
    # do without it by default; CAMP-HiVe's default since 2026-12-02 is one cycle with it, after three without it.
    **{f"{name}, refit": dict(criterion=name, refit=True) for name in ("magnitude", "obd", "wanda", "sparsegpt")},
    "camp-hive, refit": dict(criterion="camp-hive", cycles=3, refit=True),  # three cycles, as measured before then
    "camp-hive, 1 cycle, refit": dict(criterion="camp-hive", cycles=1, refit=True),
    "camp-hive, 3 cycles, no refit": dict(criterion="camp-hive", cycles=3, refit=False),
    "wanda, global selection": dict(criterion="wanda", selection="global"),
    "wanda, per-layer selection": dict(criterion="wanda", selection="layer"),
}


def run_one(dense, calib, test, finetune_loader, sparsity, options, finetune_epochs, seed, spectrum_top_k=1):
    model = copy.deepcopy(dense)
    started = time.perf_counter()
    result = prune(model, calib, sparsity, seed=seed, spectrum_top_k=spectrum_top_k, **options)
    seconds = time.perf_counter() - started
    row = {"sparsity": sparsity, "pruned": accuracy(model, test), "seconds": seconds, "num_hvps": result.num_hvps,
           "achieved": result.sparsity}
    if finetune_epochs:
        finetune(model, finetune_loader, finetune_epochs, masks=result.masks, lr=0.01, device="cpu", seed=seed)
        row["finetuned"] = accuracy(model, test)
    return row


def grid_table(results: dict, sparsities, stage_keys=("pruned", "finetuned")) -> str:
    columns = [("name", "method")] + [(f"{s}", f"{s}") for s in sparsities] + [("seconds", "prune s (mean)")]
    rows = []
    for name, cells in results.items():
        row = {"name": name, "seconds": sum(c["seconds"] for c in cells.values()) / max(len(cells), 1)}
        for s in sparsities:
            cell = cells.get(str(s))
            if cell:
                row[f"{s}"] = " / ".join(f"{cell[k]:.3f}" for k in stage_keys if k in cell)
        rows.append(row)
    return markdown_table(rows, columns)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="small-cnn")
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--dense-epochs", type=int, default=1)
    parser.add_argument("--dense-subset", type=int, default=None)
    parser.add_argument("--sparsities", default="0.5,0.8,0.9,0.95,0.98")
    parser.add_argument("--criteria", default=",".join(CRITERIA))
    parser.add_argument("--ablation", action="store_true", help="also run the CAMP-HiVe ablation")
    parser.add_argument("--ablation-sparsities", default="0.9,0.95,0.98")
    parser.add_argument("--only", default=None, help="ablation names to run, separated by semicolons")
    parser.add_argument("--finetune-epochs", type=int, default=1)
    parser.add_argument("--finetune-samples", type=int, default=None, help="fine-tune on N random training images")
    parser.add_argument("--calib-samples", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--spectrum-top-k", type=int, default=1,
                        help="prune()'s sharpness measurement (two Lanczos runs, counted in 'prune s'); 0 skips it")
    parser.add_argument("--no-write", action="store_true", help="print only; do not append to RESULTS.md")
    parser.add_argument("--title", default=None, help="RESULTS.md section title before ': <model> on <dataset>' "
                        "(default: 'Unstructured pruning', or '..., ablation only'); a new title keeps other runs")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sparsities = [float(s) for s in args.sparsities.split(",")]
    for model_name in args.models.split(","):
        dense, per_epoch = dense_model(model_name, args.dataset, args.dense_epochs, seed=args.seed,
                                       train_subset=args.dense_subset)
        test = test_batches(args.dataset)
        dense_accuracy = accuracy(dense, test)
        train_set = data.load(args.dataset, split="train")
        calib_set = data.load(args.dataset, split="train", transform="eval")
        calib = list(data.loader(calib_set, batch_size=128, subset=args.calib_samples, random_subset=True, seed=args.seed))
        finetune_loader = data.loader(train_set, batch_size=128, train=True, seed=args.seed, subset=args.finetune_samples,
                                      random_subset=args.finetune_samples is not None)
        partial = cache_dir() / f"unstructured-{model_name}-partial.json"
        results: dict = {}
        for criterion in [name for name in args.criteria.split(",") if name]:
            results[criterion] = {}
            for s in sparsities:
                results[criterion][str(s)] = run_one(dense, calib, test, finetune_loader, s, {"criterion": criterion},
                                                     args.finetune_epochs, args.seed, args.spectrum_top_k)
                print(model_name, criterion, s, json.dumps(results[criterion][str(s)]), flush=True)
                partial.write_text(json.dumps(results))
        ablation: dict = {}
        if args.ablation:
            names = [name.strip() for name in args.only.split(";")] if args.only else list(ABLATION)
            ablation_sparsities = [float(s) for s in args.ablation_sparsities.split(",")]
            for name in names:
                ablation[name] = {}
                for s in ablation_sparsities:
                    ablation[name][str(s)] = run_one(dense, calib, test, finetune_loader, s, ABLATION[name],
                                                     args.finetune_epochs, args.seed, args.spectrum_top_k)
                    print(model_name, name, s, json.dumps(ablation[name][str(s)]), flush=True)
                    partial.write_text(json.dumps({"criteria": results, "ablation": ablation}))
        budget = (f"fine-tuning: {args.finetune_epochs} epoch(s) on "
                  f"{args.finetune_samples or len(train_set)} images, lr 0.01, masks enforced")
        body = (f"{model_name} on {args.dataset}, dense accuracy {dense_accuracy:.4f} after {args.dense_epochs} epoch(s) "
                f"({per_epoch or 0:.0f} s/epoch); {args.calib_samples} calibration images; {budget}; 'prune s' "
                f"{'includes' if args.spectrum_top_k else 'excludes'} the sharpness measurement (spectrum_top_k="
                f"{args.spectrum_top_k}). "
                f"Cells: accuracy right after pruning / after fine-tuning.\n")
        if results:
            body += f"\n### Criteria (defaults of each)\n\n{grid_table(results, sparsities)}"
        if ablation:
            body += f"\n### Ablation\n\n{grid_table(ablation, [float(s) for s in args.ablation_sparsities.split(',')])}"
        print(body)
        if not args.no_write:
            kind = args.title or ("Unstructured pruning" if results else "Unstructured pruning, ablation only")
            append_results(f"{kind}: {model_name} on {args.dataset}", body)


if __name__ == "__main__":
    main()
