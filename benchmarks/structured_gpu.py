"""Benchmark structured pruning of resnet56 on Fashion-MNIST on a GPU, with a real training budget.

Issue 6's GPU part: the dense model is trained on all 60 000 training images (augmented,
bfloat16 autocast, data held on the GPU), then every criterion removes channels to each
MACs reduction (``--ratios``, the goal's 2x first) through the same entry
(``prune_structured``, same calibration images, allocation and ``round_to``), and each
pruned model is BatchNorm-recalibrated and fine-tuned with the same budget. Accuracy is on
the full 10 000-image test set. Then latency of the pruned shapes: on the GPU (batch 64
and 1024) and, on this machine's CPU, at batch 64 on one thread (the CPU goal, measured on
another CPU than the 2-core development machine).

The run is budgeted (``--budget-minutes``): rows start only while time is left, each row
is appended to ``OUT/rows.jsonl`` as it finishes and the dense model is saved to
``OUT/dense.safetensors`` (``--dense-checkpoint`` reuses one), so a run cut short keeps
what it measured. A row whose pruning fails with CPU-held calibration batches (what users
pass) is logged with its traceback and retried with the batches on the GPU.

    PYTHONPATH=src python benchmarks/structured_gpu.py --out /tmp/gpu-run
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import traceback
from pathlib import Path

import torch  # noqa: E402
from common import append_results, keep_freed_memory, machine  # noqa: E402  (puts src/ on the path)
from structured import accuracy_verdicts  # noqa: E402

from camphive import data, models  # noqa: E402
from camphive.checkpoints import load_checkpoint, save_checkpoint  # noqa: E402
from camphive.data.transforms import default_transform  # noqa: E402
from camphive.export import fold_batchnorm  # noqa: E402
from camphive.measure import count_macs, count_parameters, measure_latency  # noqa: E402
from camphive.pruning.core.batchnorm import recalibrate_batchnorm  # noqa: E402
from camphive.pruning.structured.prune import prune_structured  # noqa: E402
from camphive.training import evaluate, finetune, train  # noqa: E402

STARTED = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - STARTED:6.0f} s] {message}", file=sys.stderr, flush=True)


def minutes_used() -> float:
    return (time.perf_counter() - STARTED) / 60


class Data:
    """Fashion-MNIST on the device: augmented training loader, full test set, CPU calibration batches."""

    def __init__(self, args, device: torch.device):
        self.device = device
        self.train_set = data.load("fashion-mnist", split="train", transform="auto")
        plain = data.load("fashion-mnist", split="train", transform=default_transform("fashion-mnist", train=False))
        test_set = data.load("fashion-mnist", split="test", transform=default_transform("fashion-mnist", train=False))
        self.calibration = list(data.loader(plain, batch_size=128, seed=args.seed + 1, subset=args.calib_samples,
                                            random_subset=True))
        self.test = data.loader(test_set, batch_size=1000, device=device)
        self.args = args

    def train_loader(self, seed: int):
        subset = self.args.train_subset
        return data.loader(self.train_set, batch_size=self.args.batch_size, train=True, seed=seed, device=self.device,
                           subset=subset, random_subset=subset is not None)

    def accuracy(self, model) -> float:
        return evaluate(model, self.test, device=self.device)["accuracy"]


def dense_model(args, batches: Data):
    if args.dense_checkpoint and Path(args.dense_checkpoint).is_file():
        stored = load_checkpoint(args.dense_checkpoint)
        log(f"dense model read from {args.dense_checkpoint}")
        return stored.model.to(batches.device), stored.metadata
    epochs = args.dense_epochs
    if args.dense_minutes:  # time one epoch of a throwaway model, then train as many epochs as the budget holds
        probe = models.create(args.model, num_classes=10, in_channels=1)
        started = time.perf_counter()
        train(probe, batches.train_loader(args.seed), 1, lr=args.lr, device=batches.device, amp=args.amp)
        per_epoch = time.perf_counter() - started
        epochs = max(1, min(epochs, int(60 * args.dense_minutes / per_epoch)))
        log(f"one dense epoch takes {per_epoch:.1f} s: training {epochs} epochs")
    torch.manual_seed(args.seed)
    model = models.create(args.model, num_classes=10, in_channels=1)
    started = time.perf_counter()
    train(model, batches.train_loader(args.seed), epochs, lr=args.lr, device=batches.device,
          amp=args.amp, seed=args.seed, warmup_epochs=1.0 if epochs > 2 else 0.0)
    seconds = time.perf_counter() - started
    metadata = {"dense_epochs": epochs, "train_seconds": seconds, "device": machine()}
    save_checkpoint(Path(args.out) / "dense.safetensors", model, dataset="fashion-mnist", input_shape=[1, 28, 28],
                    **metadata)
    log(f"dense {args.model}: {epochs} epochs in {seconds:.0f} s")
    return model, metadata


def prune_row(dense, criterion: str, ratio: float, args, batches: Data) -> dict:
    model = copy.deepcopy(dense)
    options = dict(target_macs_ratio=ratio, round_to=args.round_to, criterion=criterion, measure_latency=False,
                   recalibrate_bn=False, seed=args.seed)
    try:
        result = prune_structured(model, batches.calibration, **options)
        calibration_on = "cpu"
    except Exception:  # noqa: BLE001  (a GPU-path bug: record it, then measure with the batches on the GPU)
        log(f"{criterion} {ratio}x failed with CPU calibration batches:\n{traceback.format_exc()}")
        model = copy.deepcopy(dense)
        on_device = [(x.to(batches.device), y.to(batches.device)) for x, y in batches.calibration]
        result = prune_structured(model, on_device, **options)
        calibration_on = "cuda"
    row = {"criterion": criterion, "ratio": ratio, "macs_ratio": result.extra["macs_ratio"],
           "params_ratio": result.extra["params_ratio"], "prune_seconds": result.seconds,
           "calibration_on": calibration_on, "pruned": batches.accuracy(model)}
    recalibrate_batchnorm(model, batches.calibration)
    row["recalibrated"] = batches.accuracy(model)
    started = time.perf_counter()
    finetune(model, batches.train_loader(args.seed + 7), args.finetune_epochs, lr=args.finetune_lr,
             device=batches.device, amp=args.amp, seed=args.seed)
    row["finetune_seconds"] = time.perf_counter() - started
    row["finetuned"] = batches.accuracy(model)
    return row, model


def accuracy_table(rows: list[dict], ratios: list[float]) -> tuple[str, dict, list[float]]:
    """The markdown table, rows by criterion and ratio, and the ratios every criterion reached."""
    table: dict[str, dict[float, dict]] = {}
    for row in rows:
        table.setdefault(row["criterion"], {})[row["ratio"]] = row
    lines = ["| criterion | " + " | ".join(f"{r:g}x" for r in ratios) + " | prune s (2x) |",
             "|---|" + "---|" * (len(ratios) + 1)]
    for criterion, by_ratio in table.items():
        cells = [f"{by_ratio[r]['pruned']:.3f} / {by_ratio[r]['recalibrated']:.3f} / {by_ratio[r]['finetuned']:.3f} "
                 f"({by_ratio[r]['macs_ratio']:.2f}x){' *' if by_ratio[r].get('earlier_run') else ''}"
                 if r in by_ratio else "not run (budget)" for r in ratios]
        seconds = next((f"{row['prune_seconds']:.1f}" for r, row in by_ratio.items() if r == 2.0), "")
        lines.append(f"| {criterion} | " + " | ".join(cells) + f" | {seconds} |")
    finished = [r for r in ratios if table and all(r in by_ratio for by_ratio in table.values())]
    return "\n".join(lines), table, finished


def latency_lines(title: str, candidates: dict, threads: int | None, batch_sizes, seconds: float,
                  layouts=("NCHW",)) -> str:
    example = torch.randn(1, 1, 28, 28)
    macs = {label: count_macs(copy.deepcopy(m).cpu(), example).total for label, m in candidates.items()}
    lines = [title, "", "| model | MACs reduction | layout | " + " | ".join(f"b{b} ms | speed-up | ratio"
                                                                         for b in batch_sizes) + " |",
             "|---|---|---|" + "---|---|---|" * len(batch_sizes)]
    for layout in layouts:
        report = measure_latency(candidates, (1, 28, 28), batch_sizes=batch_sizes, threads=threads,
                                 target_seconds=seconds, min_repeats=15, channels_last=layout == "NHWC")
        baseline = next(iter(candidates))
        for label in candidates:
            reduction = macs[baseline] / macs[label]
            cells = []
            for batch in batch_sizes:
                result = report.get(label, batch)
                cells.append(f"{result.median_ms:.2f} | {result.speedup:.2f} | {result.speedup / reduction:.2f}")
            lines.append(f"| {label} | {reduction:.2f}x | {layout} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet56")
    parser.add_argument("--criteria", default="camp-hive,tp-magnitude,tp-taylor,tp-hessian,magnitude,taylor,random")
    parser.add_argument("--ratios", default="2,3,1.5", help="run in this order (the goal's 2x first)")
    parser.add_argument("--round-to", type=int, default=8)
    parser.add_argument("--dense-epochs", type=int, default=30, help="at most this many (see --dense-minutes)")
    parser.add_argument("--dense-minutes", type=float, default=None,
                        help="fewer epochs if a timed first epoch says --dense-epochs would take longer")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--train-subset", type=int, default=None, help="dry runs: train and fine-tune on N images")
    parser.add_argument("--lr", type=float, default=0.2)
    parser.add_argument("--no-amp", dest="amp", action="store_false")
    parser.add_argument("--calib-samples", type=int, default=1024)
    parser.add_argument("--finetune-epochs", type=int, default=3)
    parser.add_argument("--finetune-lr", type=float, default=0.02)
    parser.add_argument("--budget-minutes", type=float, default=7.0, help="start no row after this")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dense-checkpoint", default=None, help="reuse this dense model instead of training")
    parser.add_argument("--resume-rows", default=None,
                        help="rows.jsonl of an earlier run on the same --dense-checkpoint: measure only what it lacks")
    parser.add_argument("--out", default="runs/structured-gpu", help="folder for rows.jsonl and the dense model")
    parser.add_argument("--results", default=None, help="RESULTS.md to append to (default benchmarks/RESULTS.md)")
    parser.add_argument("--no-write", dest="write", action="store_false")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    allocator = keep_freed_memory()
    batches = Data(args, device)
    dense, dense_info = dense_model(args, batches)
    dense_accuracy = batches.accuracy(dense)
    log(f"dense accuracy {dense_accuracy:.4f}")
    ratios = [float(r) for r in args.ratios.split(",")]
    criteria = [c for c in args.criteria.split(",") if c]
    rows, shapes = [], {}
    rows_file = Path(args.out) / "rows.jsonl"
    if args.resume_rows:  # rows an earlier, cut-short run measured on the same dense checkpoint
        rows = [{**json.loads(line), "earlier_run": True} for line in Path(args.resume_rows).read_text().splitlines()
                if line.strip()]
        log(f"{len(rows)} rows read from {args.resume_rows}")
    done = {(row["criterion"], row["ratio"]) for row in rows}
    for ratio in ratios:
        for criterion in criteria:
            if (criterion, ratio) in done:
                continue
            if minutes_used() > args.budget_minutes:
                log(f"budget spent: {criterion} {ratio}x and later rows not run")
                break
            row, model = prune_row(dense, criterion, ratio, args, batches)
            shapes.setdefault(ratio, model)
            rows.append(row)
            with rows_file.open("a") as stream:
                stream.write(json.dumps(row) + "\n")
            log(f"{criterion} {ratio}x ({row['macs_ratio']:.2f}x): {row['pruned']:.3f} / {row['recalibrated']:.3f} / "
                f"{row['finetuned']:.3f}; prune {row['prune_seconds']:.1f} s, fine-tune {row['finetune_seconds']:.0f} s")

    for ratio in {row["ratio"] for row in rows} - set(shapes):  # resumed rows: the same shapes, pruned again by L1
        shapes[ratio] = copy.deepcopy(dense)
        prune_structured(shapes[ratio], batches.calibration, target_macs_ratio=ratio, round_to=args.round_to,
                         criterion="magnitude", measure_latency=False)
    order = sorted(shapes)
    candidates = {"dense": fold_batchnorm(copy.deepcopy(dense))}
    candidates.update({f"{r:g}x, round_to {args.round_to}": fold_batchnorm(shapes[r]) for r in order})
    gpu = latency_lines(f"GPU latency ({torch.cuda.get_device_name(device) if device.type == 'cuda' else device}, "
                        "float32, BN folded, interleaved medians):", {k: m.to(device) for k, m in candidates.items()},
                        None, (64, 1024), 1.0)
    cpu_models = {k: copy.deepcopy(m).cpu() for k, m in candidates.items()}
    cpu = latency_lines("CPU latency on this machine's processor, 1 thread, BN folded, interleaved medians:", cpu_models,
                        1, (64,), 2.0, layouts=("NCHW", "NHWC"))

    table, by_criterion, finished = accuracy_table(rows, ratios)
    verdicts = accuracy_verdicts(f"{args.model} (GPU budget)", by_criterion, finished)
    images = f"{args.train_subset} of the" if args.train_subset else "all 60 000"
    dense_macs = count_macs(copy.deepcopy(dense).cpu(), torch.randn(1, 1, 28, 28)).total
    trained = f"{dense_info.get('train_seconds', float('nan')):.0f} s" + (
        ", read back from its checkpoint" if args.dense_checkpoint and Path(args.dense_checkpoint).is_file() else "")
    body = (f"{args.model} on Fashion-MNIST: dense {dense_accuracy:.4f} on the 10 000 test images after "
            f"{dense_info.get('dense_epochs', args.dense_epochs)} epochs on {images} training images (batch "
            f"{args.batch_size}, lr {args.lr}, cosine, augmented, bfloat16 autocast: {args.amp}; training {trained}); "
            f"{dense_macs / 1e6:.1f} M MACs, {count_parameters(dense) / 1e3:.0f} k parameters. Every criterion: "
            f"uniform allocation, round_to {args.round_to}, {args.calib_samples} calibration images; accuracy right "
            f"after pruning / after BN recalibration / after {args.finetune_epochs} fine-tune epochs on {images} "
            f"training images (lr {args.finetune_lr}); MACs ratio reached in brackets. Run wall time {minutes_used():.1f} min, "
            f"memory: {allocator}."
            + (" Cells marked * were measured by an earlier run on the same dense checkpoint, calibration images and "
               "fine-tune settings (--resume-rows)." if any(row.get("earlier_run") for row in rows) else "")
            + f"\n\n{table}\n\n" + "\n".join(f"- {v}" for v in verdicts) + f"\n\n{gpu}\n\n{cpu}\n")
    print(body)
    if args.write:
        append_results(f"Structured pruning on a GPU: {args.model} on Fashion-MNIST", body,
                       **({"path": Path(args.results)} if args.results else {}))


if __name__ == "__main__":
    main()
