"""Benchmark structured (channel) pruning: accuracy against MACs for every criterion, and real CPU speed.

Sections (``--sections``):

* ``method``: the small-CNN channel-merge measurement (docs/method.md, section 11) on Fashion-MNIST: 50 % / 75 % of the channels
  of conv2, conv3 and fc1 removed by L1 norm, with each merge (none, pair with coupled or
  cyclic partners and activation or weight betas, least squares); accuracy right after
  pruning and after a short fine-tune.
* ``criteria``: for each model (small-cnn, resnet20 on Fashion-MNIST, dense models trained
  here or read from the cache), every criterion at each MACs reduction (``--ratios``):
  accuracy right after pruning, after BatchNorm recalibration on the calibration images, and
  after a short fine-tune; plus CPU latency of the pruned shapes (batch 1 and 64). ``--refit`` adds
  each criterion with the refit flipped from its default (camp-hive refits by default, the peers do not);
  with the refit "right after pruning" is the library's output (BN re-estimated, then the refit).
* ``latency``: the latency part of ``criteria`` alone (L1-pruned shapes, with the same rounding
  levers as ``speed``), for re-timing.
* ``speed``: resnet56 at CIFAR size (3x32x32, untrained: MACs and latency only) at each
  ratio, with exact channel counts, rounded uniformly to multiples of 8 and of the default's
  multiple (16 on AVX-512 CPUs), and as the default rounds (that multiple, latency-aware), with
  and without BatchNorm folding; ``--latency-reach N`` and ``--latency-runtime onnxruntime`` add
  the latency-aware shapes searched with that reach, or with the layers timed in onnxruntime.

Every criterion runs through the same entry (``prune_structured``), with the same
calibration images, allocation (uniform per group), target and fine-tune; only scores
(and CAMP-HiVe's merge) differ. Appends the tables, the goals' verdicts, the machine and
the command to ``benchmarks/RESULTS.md`` (atomically).

    PYTHONPATH=src python benchmarks/structured.py --threads 1
"""
from __future__ import annotations

import argparse
import copy
import itertools
import os
import sys
import tempfile
import time

os.environ.setdefault("CAMPHIVE_CACHE", "/tmp/camphive-cache")
import torch  # noqa: E402
from common import append_results, dense_model, keep_freed_memory  # noqa: E402  (puts src/ on the path)

from camphive import data, models  # noqa: E402
from camphive.data.transforms import default_transform  # noqa: E402
from camphive.devices import cpu_vector_floats  # noqa: E402
from camphive.export import export_onnx, fold_batchnorm  # noqa: E402
from camphive.measure import count_macs, count_parameters, measure_latency, measure_onnx_latency  # noqa: E402
from camphive.measure.layer_timing import RUNTIMES  # noqa: E402
from camphive.pruning.core.batchnorm import recalibrate_batchnorm  # noqa: E402
from camphive.pruning.criteria import is_camp_hive  # noqa: E402
from camphive.pruning.settings import settings_for  # noqa: E402
from camphive.pruning.structured.prune import prune_structured  # noqa: E402
from camphive.training import evaluate, finetune  # noqa: E402

TORCH_PRUNING = ("tp-magnitude", "tp-taylor", "tp-hessian")
METHOD_MERGES = [
    ("none", {"merge": "none"}),
    ("pair, coupled, LS beta (activations)", {"merge": "pair", "pairing": "coupled", "beta_from": "activations"}),
    ("pair, cyclic, LS beta (activations)", {"merge": "pair", "pairing": "cyclic", "beta_from": "activations"}),
    ("pair, coupled, beta from weights", {"merge": "pair", "pairing": "coupled", "beta_from": "weights"}),
    ("least squares", {"merge": "least_squares"}),
]
# (each row with the library's defaults: camp-hive with its refit, the peers without)
ABLATIONS = {"camp-hive, no merge": ("camp-hive", {"merge": "none"}),
             "camp-hive, summed per-weight scores": ("camp-hive", {"channel_score": "summed"}),
             "magnitude + least-squares merge": ("magnitude", {"merge": "least_squares"}),
             "tp-hessian + least-squares merge": ("tp-hessian", {"merge": "least_squares"})}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def fashion(split: str, subset: int | None, train: bool, seed: int = 0, augment: bool = False, batch_size: int = 128):
    transform = "auto" if augment else default_transform("fashion-mnist", train=False)
    dataset = data.load("fashion-mnist", split=split, transform=transform)
    return data.loader(dataset, batch_size=batch_size, train=train, seed=seed, subset=subset,
                       random_subset=subset is not None)


class Evaluation:
    """Calibration, fine-tune and test data for one run, and the steps every configuration takes."""

    def __init__(self, args):
        self.args = args
        self.calibration = list(fashion("train", args.calib_samples, train=False, seed=args.seed + 1))
        self.test = list(fashion("test", args.test_subset, train=False, batch_size=500))
        self.finetune_data = fashion("train", args.finetune_subset, train=True, seed=args.seed, augment=True)

    def accuracy(self, model) -> float:
        return evaluate(model, self.test, device="cpu")["accuracy"]

    def prune_and_measure(self, dense, criterion: str, options: dict, finetune_epochs: int) -> dict:
        model = copy.deepcopy(dense)
        # "right after pruning" is without BN re-estimation, except with the refit (camp-hive's default): that row
        # is the library's own order (BN re-estimated after the cycle, then the refit), which the refit depends on
        refit = settings_for("structured", criterion=criterion, **options).refit
        options = {"recalibrate_bn": refit, **options}
        result = prune_structured(model, self.calibration, criterion=criterion, measure_latency=False,
                                  seed=self.args.seed, **options)
        row = {"pruned": self.accuracy(model), "macs_ratio": result.extra["macs_ratio"],
               "params_ratio": result.extra["params_ratio"], "seconds": result.seconds}
        recalibrate_batchnorm(model, self.calibration)
        row["recalibrated"] = self.accuracy(model)
        if finetune_epochs:
            finetune(model, self.finetune_data, epochs=finetune_epochs, lr=self.args.finetune_lr, device="cpu",
                     seed=self.args.seed)
            row["finetuned"] = self.accuracy(model)
        row["model"] = model
        return row


def method_section(args, evaluation: Evaluation) -> str:
    dense, _ = dense_model("small-cnn", "fashion-mnist", args.small_epochs, lr=0.05, seed=args.seed, log=log)
    lines = [f"Small CNN on Fashion-MNIST (dense {evaluation.accuracy(dense):.4f}); conv2, conv3 and fc1 lose the same "
             "fraction of channels (conv1 ignored), chosen by L1 norm (criterion magnitude); accuracy right after "
             f"pruning / after BN recalibration / after {args.finetune_epochs} fine-tune epoch(s) on "
             f"{args.finetune_subset or 60000} training images:\n",
             "| merge | 50 %: pruned | recal. | fine-tuned | 75 %: pruned | recal. | fine-tuned |",
             "|---|---|---|---|---|---|---|"]
    for label, options in METHOD_MERGES:
        cells = []
        for sparsity in (0.5, 0.75):
            row = evaluation.prune_and_measure(dense, "magnitude", {"sparsity": sparsity, "ignored_layers": ["conv1"],
                                                                    **options}, args.finetune_epochs)
            cells += [f"{row['pruned']:.3f}", f"{row['recalibrated']:.3f}", f"{row.get('finetuned', float('nan')):.3f}"]
            log(f"method {label} {sparsity}: {cells[-3:]}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


LAYOUTS = ("NCHW", "NHWC", "onnxruntime", "NHWC compiled")


def latency_rows(models_by_name: dict, input_shape, args, layout: str, folder: str) -> dict:
    """Interleaved medians at batch 1 and 64 in one layout: PyTorch NCHW, PyTorch NHWC (channels_last),
    the exported ONNX file in onnxruntime (which folds BatchNorm itself, so unfolded models only), or
    NHWC compiled by torch.compile (TorchInductor; BN-folded models only, to keep compile time down)."""
    options = dict(batch_sizes=(1, 64), threads=args.threads, target_seconds=args.latency_seconds, min_repeats=15)
    if layout == "onnxruntime":
        files = {}
        for label, model in models_by_name.items():
            files[label] = os.path.join(folder, f"{len(files)}.onnx")
            export_onnx(model, files[label], torch.randn(1, *input_shape))  # checked against PyTorch (1e-4)
        report = measure_onnx_latency(files, input_shape, **options)
    else:
        report = measure_latency(models_by_name, input_shape, channels_last=layout.startswith("NHWC"),
                                 compiled=layout.endswith("compiled"), **options)
    return {(r.model, r.batch_size): r for r in report.results}


def criteria_section(args, evaluation: Evaluation) -> tuple[str, list[str]]:
    lines, verdicts = [], []
    ratios = [float(r) for r in args.ratios.split(",")]
    criteria = [c for c in args.criteria.split(",") if c]
    for name in [m for m in args.models.split(",") if m]:
        epochs, subset = (args.small_epochs, None) if name == "small-cnn" else (args.resnet_epochs, args.resnet_subset)
        dense, _ = dense_model(name, "fashion-mnist", epochs, lr=0.05, seed=args.seed, train_subset=subset, log=log)
        dense_accuracy = evaluation.accuracy(dense)
        table: dict[str, dict[float, dict]] = {}
        shapes: dict[float, torch.nn.Module] = {}
        rows = [(c, c, {}, ratios) for c in criteria]
        if args.refit:  # the other side of each criterion's default: camp-hive refits by default, the peers do not
            rows += [(f"{c}, no refit", c, {"refit": False}, ratios) if is_camp_hive(c) else
                     (f"{c}, refit", c, {"refit": True}, ratios) for c in criteria]
        if args.ablations:  # ablations at the goal's ratio only (2x), to keep the budget
            goal_ratio = [r for r in ratios if r == 2.0] or ratios[:1]
            rows += [(label, c, o, goal_ratio) for label, (c, o) in ABLATIONS.items()]
        for label, criterion, options, row_ratios in rows:
            for ratio in row_ratios:
                row = evaluation.prune_and_measure(dense, criterion, {"target_macs_ratio": ratio, "round_to": args.round_to,
                                                                      **latency_aware(args), **options},
                                                   args.finetune_epochs)
                shapes.setdefault(ratio, row.pop("model"))
                table.setdefault(label, {})[ratio] = row
                log(f"{name} {label} {ratio}x: {row['pruned']:.3f} / {row['recalibrated']:.3f} / "
                    f"{row.get('finetuned', float('nan')):.3f} ({row['seconds']:.1f} s)")
        dense_macs = count_macs(dense, torch.randn(1, 1, 28, 28)).total
        lines.append(f"\n### {name} on Fashion-MNIST (dense {dense_accuracy:.4f}, {dense_macs / 1e6:.2f} M MACs, "
                     f"{count_parameters(dense) / 1e3:.0f} k parameters)\n")
        lines.append("Accuracy right after pruning / after BN recalibration on the calibration images / after "
                     f"{args.finetune_epochs} fine-tune epoch(s) on {args.finetune_subset} images; uniform allocation"
                     f"{rounding_note(args.round_to)}{latency_note(args)}; "
                     "MACs ratio achieved in brackets:\n")
        header = "| criterion | " + " | ".join(f"{r:g}x" for r in ratios) + " |"
        lines += [header, "|---|" + "---|" * len(ratios)]
        for label, by_ratio in table.items():
            cells = [f"{by_ratio[r]['pruned']:.3f} / {by_ratio[r]['recalibrated']:.3f} / "
                     f"{by_ratio[r].get('finetuned', float('nan')):.3f} ({by_ratio[r]['macs_ratio']:.2f}x)"
                     if r in by_ratio else "" for r in ratios]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        verdicts += accuracy_verdicts(name, table, ratios)
        if not args.criteria_latency:
            continue
        rounding = f", round_to {args.round_to}" if args.round_to > 1 else ""
        shapes = {f"{ratio:g}x{rounding}": model for ratio, model in shapes.items()}
        body, found = latency_table(name, dense, shapes, ratios, evaluation.calibration[:1], args,
                                    "all criteria give the same shapes under uniform allocation",
                                    add_rounded=args.round_to <= 1)
        lines.append(body)
        verdicts += found
    return "\n".join(lines), verdicts


def accuracy_verdicts(name: str, table: dict, ratios: list[float]) -> list[str]:
    verdicts = []
    if "camp-hive" not in table:
        return verdicts
    for ratio in ratios:
        ours = table["camp-hive"][ratio]
        for stage in ("pruned", "recalibrated", "finetuned"):
            rivals = {c: table[c][ratio][stage] for c in TORCH_PRUNING if c in table and stage in table[c][ratio]}
            if not rivals or stage not in ours:
                continue
            best = max(rivals, key=rivals.get)
            verdict = "met" if ours[stage] > rivals[best] else "NOT met"
            verdicts.append(f"{name} {ratio:g}x, {stage}: camp-hive {ours[stage]:.3f} vs best Torch-Pruning "
                            f"importance {best} {rivals[best]:.3f} ({verdict})")
    return verdicts


def latency_aware(args) -> dict:
    """The prune options of ``--latency-aware`` (the default; timed at the benchmark's threads)."""
    return {"latency_aware": args.latency_aware, "latency_threads": args.threads, "latency_reach": args.latency_reach}


def latency_note(args) -> str:
    if args.round_to <= 1:
        return ""
    reach = f", up to {args.latency_reach} more multiple(s) either way" if args.latency_reach else ""
    return f", latency-aware (each group rounded up or down by timed layers{reach})" if args.latency_aware else (
        ", rounded as uniformly as the multiples allow")


def rounding_note(round_to: int) -> str:
    """How ``--round-to`` rounded the channel counts, for the table's caption."""
    if round_to <= 1:
        return ""
    narrow = f" ({round_to // 2} in groups of fewer than {2 * round_to} channels)" if round_to >= 16 else ""
    return f", channel counts rounded to multiples of {round_to}{narrow}"


def latency_table(name: str, dense, shapes: dict, ratios, calibration, args, note: str,
                  add_rounded: bool = True) -> tuple[str, list[str]]:
    """Latency of ``dense`` and the pruned ``shapes``, plus the levers: shapes rounded to multiples of 8 and
    of the default's multiple (:func:`camphive.devices.cpu_vector_floats`, in groups of >= 16) for the
    same targets, BatchNorm folding of every model, the NHWC layout, onnxruntime on the exported file,
    and torch.compile (NHWC, folded models).
    Each speed-up is against the dense model in the same layout (folded against folded)."""
    candidates = {"dense": dense}
    for label, model in shapes.items():
        candidates[label] = model
    multiples = sorted({8, cpu_vector_floats()})  # the rounding levers: multiples of 8 and the default's
    levers = [(multiple, False, 0, "torch") for multiple in multiples] + [(cpu_vector_floats(), True, 0, "torch")]
    if args.latency_reach:
        levers.append((cpu_vector_floats(), True, args.latency_reach, "torch"))
    if args.latency_runtime != "torch":
        levers.append((cpu_vector_floats(), True, 0, args.latency_runtime))
    for ratio, (multiple, aware, reach, runtime) in itertools.product(ratios if add_rounded else (), levers):
        rounded = copy.deepcopy(dense)  # every lever at the same target
        prune_structured(rounded, calibration, target_macs_ratio=ratio, criterion="magnitude", round_to=multiple,
                         round_min_group=16, measure_latency=False, latency_aware=aware,
                         latency_threads=args.threads, latency_reach=reach, latency_runtime=runtime)
        how = (f", latency-aware, latency_reach {reach}" if reach else f", latency-aware, layers timed in {runtime}"
               if runtime != "torch" else ", latency-aware (the default here)" if aware else ", uniform")
        candidates[f"{ratio:g}x, round_to {multiple}{how}"] = rounded
    unfolded = dict(candidates)
    folded = {f"{label}, BN folded": fold_batchnorm(model) for label, model in candidates.items()}
    candidates.update(folded)
    example = calibration[0][0][:1]
    input_shape = tuple(example.shape[1:])
    macs = {label: count_macs(model, example).total for label, model in candidates.items()}
    timed = {}
    with tempfile.TemporaryDirectory() as folder:
        for layout in LAYOUTS:
            chosen = {"onnxruntime": unfolded, "NHWC compiled": folded}.get(layout, candidates)
            log(f"{name}: timing {len(chosen)} models, {layout}")
            timed[layout] = latency_rows(chosen, input_shape, args, layout, folder)
    columns = " | ".join(f"{layout} b1 ms | b64 ms | speed-up | ratio" for layout in LAYOUTS)
    lines = [f"\nCPU latency of {name} ({note}), {args.threads} thread(s), interleaved medians at batch 1 (b1) and "
             "64 (b64). Layouts: PyTorch eager NCHW, PyTorch eager NHWC (channels_last), the exported ONNX file "
             "in onnxruntime (which folds BatchNorm itself: unfolded models only), and PyTorch NHWC compiled by "
             "torch.compile (TorchInductor, BN-folded models only). 'speed-up' is at batch 64 against "
             "the dense model in the same layout (BN-folded against BN-folded, whose MACs the reduction also uses); "
             "'ratio' is speed-up / MACs reduction (goal: >= 0.8):\n",
             f"| model | MACs reduction | {columns} |", "|---|---|" + "---|---|---|---|" * len(LAYOUTS)]
    verdicts = []
    for label in candidates:
        folded = label.endswith("BN folded")
        baseline = "dense, BN folded" if folded else "dense"
        reduction = macs[baseline] / macs[label]
        cells, speedups = [], {}
        for layout in LAYOUTS:
            if (label, 64) not in timed[layout]:
                cells.append(" |  |  | ")
                continue
            one, many = timed[layout][(label, 1)], timed[layout][(label, 64)]
            speedups[layout] = timed[layout][(baseline, 64)].median_ms / many.median_ms
            cells.append(f"{one.median_ms:.2f} | {many.median_ms:.1f} | {speedups[layout]:.2f} | "
                         f"{speedups[layout] / reduction:.2f}")
        lines.append(f"| {label} | {reduction:.2f}x | " + " | ".join(cells) + " |")
        if label.startswith("dense"):
            continue
        for layout, speedup in speedups.items():
            verdict = "meets" if speedup >= 0.8 * reduction else "misses"
            verdicts.append(f"{name} {label}, {layout}: batch-64 speed-up {speedup:.2f}x for {reduction:.2f}x fewer "
                            f"MACs = {speedup / reduction:.2f} of it ({verdict} the 0.8 goal)")
    return "\n".join(lines), verdicts


def latency_section(args) -> tuple[str, list[str]]:
    """Latency only, for the Fashion-MNIST models (shapes from L1 pruning; weights do not matter)."""
    ratios = [float(r) for r in args.ratios.split(",")]
    parts, verdicts = [], []
    calibration = list(fashion("train", 64, train=False, seed=args.seed + 1))
    for name in [m for m in args.models.split(",") if m]:
        epochs, subset = (args.small_epochs, None) if name == "small-cnn" else (args.resnet_epochs, args.resnet_subset)
        dense, _ = dense_model(name, "fashion-mnist", epochs, lr=0.05, seed=args.seed, train_subset=subset, log=log)
        shapes = {}
        for ratio in ratios:
            model = copy.deepcopy(dense)
            prune_structured(model, calibration, target_macs_ratio=ratio, criterion="magnitude", measure_latency=False,
                         round_to=1)  # exact counts: the rounded shapes are the levers compared
            shapes[f"{ratio:g}x"] = model
        body, found = latency_table(name, dense, shapes, ratios, calibration, args, "1x28x28 Fashion-MNIST input")
        parts.append(body)
        verdicts += found
    return "\n".join(parts), verdicts


def speed_section(args) -> tuple[str, list[str]]:
    """resnet56 at CIFAR size, untrained (BN statistics from random images): MACs and latency only."""
    torch.manual_seed(args.seed)
    dense = models.create("resnet56", num_classes=10).eval()
    calibration = [(torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))) for _ in range(2)]
    recalibrate_batchnorm(dense, calibration)
    ratios = [float(r) for r in args.ratios.split(",")]
    shapes = {}
    for ratio in ratios:
        model = copy.deepcopy(dense)
        prune_structured(model, calibration, target_macs_ratio=ratio, criterion="magnitude", measure_latency=False,
                         round_to=1)  # exact counts: the rounded shapes are the levers compared
        shapes[f"{ratio:g}x"] = model
    macs = count_macs(dense, calibration[0][0][:1]).total
    return latency_table("resnet56", dense, shapes, ratios, calibration, args,
                         f"3x32x32 input, {macs / 1e6:.1f} M MACs dense: conv, linear, BN and additions")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default="method,criteria,speed")
    parser.add_argument("--models", default="small-cnn,resnet20")
    parser.add_argument("--criteria", default="camp-hive,magnitude,taylor,random,tp-magnitude,tp-taylor,tp-hessian")
    parser.add_argument("--ratios", default="1.5,2,3")
    parser.add_argument("--no-ablations", dest="ablations", action="store_false")
    parser.add_argument("--calib-samples", type=int, default=1024)
    parser.add_argument("--test-subset", type=int, default=5000)
    parser.add_argument("--finetune-subset", type=int, default=10000)
    parser.add_argument("--finetune-epochs", type=int, default=1)
    parser.add_argument("--finetune-lr", type=float, default=0.01)
    parser.add_argument("--small-epochs", type=int, default=2)
    parser.add_argument("--resnet-epochs", type=int, default=3)
    parser.add_argument("--resnet-subset", type=int, default=20000)
    parser.add_argument("--latency-seconds", type=float, default=3.0)
    parser.add_argument("--round-to", type=int, default=1,
                        help="criteria: round every criterion's channel counts (1: exact counts; prune's own default "
                             "is the CPU's vector width, 16 with AVX-512 else 8, in groups of 16 or more)")
    parser.add_argument("--no-criteria-latency", dest="criteria_latency", action="store_false",
                        help="criteria: accuracy only (time the shapes with --sections latency)")
    parser.add_argument("--latency-aware", action=argparse.BooleanOptionalAction, default=True,
                        help="criteria, with --round-to > 1: round each group up or down by timed layers (prune's "
                             "default; --no-latency-aware: as uniformly as the multiples allow)")
    parser.add_argument("--latency-reach", type=int, default=0,
                        help="criteria: prune's latency_reach (0, the default: one multiple either side); latency: "
                             "also time the latency-aware shapes with this reach")
    parser.add_argument("--latency-runtime", default="torch", choices=RUNTIMES,
                        help="latency: also time the latency-aware shapes whose search timed the layers in this "
                             "runtime (prune's latency_runtime)")
    parser.add_argument("--refit", action="store_true",
                        help="criteria: add each criterion with the refit flipped from its default: 'camp-hive, no "
                             "refit', '<peer>, refit' (refit=True: BN re-estimated, then every layer refitted to the "
                             "dense model's outputs; its 'right after pruning' is after both)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-write", dest="write", action="store_false", help="print only, leave RESULTS.md alone")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    allocator = keep_freed_memory()
    sections = set(args.sections.split(","))
    started, load_before = time.perf_counter(), os.getloadavg()[0]
    parts, verdicts = [], []
    evaluation = Evaluation(args) if sections & {"method", "criteria"} else None
    if "method" in sections:
        parts.append("### The small-CNN channel-merge measurement\n\n" + method_section(args, evaluation))
    if "criteria" in sections:
        body, found = criteria_section(args, evaluation)
        parts.append("### Accuracy against MACs reduction, every criterion" + body)
        verdicts += found
    if "latency" in sections:
        body, found = latency_section(args)
        parts.append("### Latency against MACs reduction, Fashion-MNIST models" + body)
        verdicts += found
    if "speed" in sections:
        body, found = speed_section(args)
        parts.append("### Latency against MACs reduction, resnet56" + body)
        verdicts += found
    header = (f"Calibration: {args.calib_samples} Fashion-MNIST training images (no augmentation); test: "
              f"{args.test_subset} test images; load average before/after {load_before:.1f} / {os.getloadavg()[0]:.1f} "
              f"(shared 2-core machine); wall time {time.perf_counter() - started:.0f} s; memory: {allocator}.\n")
    goals = "### Goals\n\n" + "\n".join(f"- {v}" for v in verdicts)
    text = header + "\n" + "\n\n".join(parts) + "\n\n" + goals
    print(text)
    if args.write:
        refit = f", refit: {args.models} on fashion-mnist" if args.refit else ""  # one section per model set
        append_results("Structured (channel) pruning" + refit, text)


if __name__ == "__main__":
    main()
