"""Benchmark distributed Hessian-vector products: 1 process against 2 (torchrun, gloo, CPU).

The same total calibration set (``--batches`` batches of ``--batch-size`` synthetic 3x32x32
images) and the same model (resnet20, untrained, seeded) in every configuration:

* ``1 process x 1 thread``: the single-process baseline;
* ``2 processes x 1 thread``: ``torchrun --nproc_per_node=2``, each process takes every other
  batch (``camphive.distributed.shard_batches``) and the products are all-reduced;
* ``1 process x 2 threads``: the same two cores used by intra-op threads instead.

Each configuration runs in fresh processes, the configurations interleaved for ``--rounds``
rounds; the table reports medians. Per configuration: an uncached product (forward and two
backwards per batch), building the cached graphs (first product), the steady-state cached
product (second backward only), the all-reduce of one product alone, and the relative
difference of the product to the single-process one (the distributed operator must be the
same operator). Appends the table to benchmarks/RESULTS.md.

    PYTHONPATH=src python benchmarks/distributed.py --rounds 2
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, append_results  # noqa: E402

CONFIGS = [  # (label, processes, threads per process)
    ("1 process x 1 thread", 1, 1),
    ("2 processes x 1 thread", 2, 1),
    ("1 process x 2 threads", 1, 2),
]


def worker(args) -> None:
    """One configuration's measurements, in this process (and its torchrun peers)."""
    from camphive import data, distributed, models
    from camphive.curvature import HessianOperator

    torch.set_num_threads(args.threads)
    distributed.init_from_environment()
    dataset = data.load("synthetic", split="train", num_samples=args.batches * args.batch_size)
    batches = list(data.loader(dataset, batch_size=args.batch_size))
    share = distributed.shard_batches(batches)
    torch.manual_seed(0)
    model = models.create(args.model, num_classes=10, in_channels=3)
    vector = None

    def timed(function):
        distributed.barrier()
        started = time.perf_counter()
        result = function()
        distributed.barrier()
        return result, time.perf_counter() - started

    uncached = HessianOperator(model, share, cache_graph=False)
    vector = torch.randn(uncached.dim, generator=torch.Generator().manual_seed(1))
    product, uncached_s = timed(lambda: uncached.matvec(vector))
    cached = HessianOperator(model, share, cache_graph=True)
    _, build_s = timed(lambda: cached.matvec(vector))
    steady = [timed(lambda: cached.matvec(vector))[1] for _ in range(args.repeats)]
    reduce_s = []
    for _ in range(5):
        buffer = product.clone()
        reduce_s.append(timed(lambda: distributed.all_reduce_(buffer))[1])
    if distributed.is_main_process():
        torch.save(product, args.out_json + ".product.pt")
        Path(args.out_json).write_text(json.dumps({
            "uncached_s": uncached_s, "build_s": build_s, "steady_s": statistics.median(steady),
            "all_reduce_s": statistics.median(reduce_s) if distributed.is_distributed() else 0.0,
            "batches_per_process": len(share), "samples": cached.num_samples, "dim": cached.dim,
        }))
    distributed.shutdown()


def run_config(args, processes: int, threads: int, folder: Path, name: str) -> dict:
    out = folder / f"{name}.json"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT / "src")}
    script = [str(Path(__file__).resolve()), "--worker", "--threads", str(threads), "--out-json", str(out),
              "--model", args.model, "--batches", str(args.batches), "--batch-size", str(args.batch_size),
              "--repeats", str(args.repeats)]
    if processes == 1:
        command = [sys.executable, *script]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", *script]
    completed = subprocess.run(command, env=env, capture_output=True, text=True)
    if completed.returncode:
        raise SystemExit(f"{name} failed:\n{completed.stderr[-3000:]}")
    result = json.loads(out.read_text())
    result["product"] = torch.load(str(out) + ".product.pt")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="steady-state products per run")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of all configurations")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--out-json", help=argparse.SUPPRESS)
    parser.add_argument("--no-write", action="store_true", help="print the table without appending to RESULTS.md")
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    runs: dict[str, list[dict]] = {label: [] for label, _, _ in CONFIGS}
    with tempfile.TemporaryDirectory() as folder:
        for round_ in range(args.rounds):
            for index, (label, processes, threads) in enumerate(CONFIGS):
                runs[label].append(run_config(args, processes, threads, Path(folder), f"r{round_}c{index}"))
                print(f"round {round_ + 1}: {label}: steady {runs[label][-1]['steady_s']:.2f} s", flush=True)
    reference = runs[CONFIGS[0][0]][0]["product"]
    base = statistics.median(run["steady_s"] for run in runs[CONFIGS[0][0]])
    base_uncached = statistics.median(run["uncached_s"] for run in runs[CONFIGS[0][0]])
    rows = []
    for label, _processes, _threads in CONFIGS:
        group = runs[label]
        steady = statistics.median(run["steady_s"] for run in group)
        uncached = statistics.median(run["uncached_s"] for run in group)
        build = statistics.median(run["build_s"] for run in group)
        reduce_ms = 1000 * statistics.median(run["all_reduce_s"] for run in group)
        difference = max(float((run["product"] - reference).norm() / reference.norm()) for run in group)
        rows.append(f"| {label} | {group[0]['batches_per_process']} | {uncached:.2f} | {base_uncached / uncached:.2f} | "
                    f"{build:.2f} | {steady:.2f} | {1 / steady:.3f} | {base / steady:.2f} | {reduce_ms:.1f} | {difference:.1e} |")
    first = runs[CONFIGS[0][0]][0]
    body = (
        f"HVP throughput, {args.model} (dim {first['dim']:,}), {first['samples']} calibration samples in "
        f"{args.batches} batches of {args.batch_size} (synthetic 3x32x32), CPU, gloo; median of {args.rounds} "
        f"interleaved rounds, {args.repeats} steady-state products per round. Seconds are per product over the whole "
        "calibration set; 'speed-up' is against 1 process x 1 thread; 'diff' is the relative difference of the product "
        "to the single-process one.\n\n"
        "| configuration | batches per process | uncached HVP s | speed-up | first cached HVP s (builds graphs) | "
        "cached HVP s | cached HVP/s | speed-up | all-reduce ms | diff |\n|---|---|---|---|---|---|---|---|---|---|\n"
        + "\n".join(rows)
        + f"\n\nLoad average before / after: {load_before:.1f} / {os.getloadavg()[0]:.1f} on a shared machine with "
        f"{os.cpu_count()} cores; wall time {time.perf_counter() - started:.0f} s."
    )
    print(body)
    if not args.no_write:
        append_results("Distributed curvature: HVP throughput, 1 vs 2 processes", body)


if __name__ == "__main__":
    main()
