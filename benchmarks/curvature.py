"""Benchmark the curvature engine: HVP cost, eigen-solver products, peak memory.

For each model (untrained, BatchNorm statistics recalibrated on the data so eval mode is
sane), at one calibration batch:

1. Time of one Hessian-vector product / time of one loss+gradient, for every HVP
   implementation, measured side by side, interleaved, median of ``--repeats``.
2. Products needed by power iteration, Lanczos and scipy's eigsh to reach the top
   eigenvalue, and the top 5, within 1 % of a reference (Lanczos run to a tight tol).
3. Peak resident memory of each implementation, each in its own subprocess
   (``VmHWM`` of /proc/self/status, reset after set-up through /proc/self/clear_refs).

Prints Markdown tables and appends them, with the machine and the command, to
``benchmarks/RESULTS.md`` (atomically: other benchmarks append there too).

    PYTHONPATH=src python benchmarks/curvature.py --models resnet20,resnet56 --batch-size 128 --repeats 5
"""
from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from camphive import models
from camphive.curvature import HessianOperator, top_eigenpairs

SOLVER_RUNS = [  # (method, k, tol)
    ("power", 1, 1e-3), ("lanczos", 1, 1e-3), ("eigsh", 1, 1e-3),
    ("power", 5, 1e-3), ("lanczos", 5, 1e-3), ("lanczos", 5, 1e-2), ("eigsh", 5, 1e-3), ("eigsh", 5, 1e-2),
]
IMPLEMENTATIONS = {
    "db": "double backward (textbook: forward + 2 backwards)",
    "for": "forward-over-reverse (torch.func jvp of grad)",
    "cached": "double backward, cached graph (steady state: 2nd backward only)",
    "cached20": "double backward, cached graph, amortized over 20 HVPs (incl. building it)",
    "db_matmat": "matmat k={k}, double backward (first backward shared), per vector",
    "for_matmat": "matmat k={k}, forward-over-reverse (vmap), per vector",
}


def load_batches(data: str, batch_size: int, count: int, seed: int) -> tuple[list, int]:
    """``count`` batches of Fashion-MNIST training images (or CIFAR-shaped noise), and the input channels."""
    if data == "fashion-mnist":
        from camphive import data as datasets

        dataset = datasets.load("fashion-mnist", split="train")
        batches = []
        for batch in datasets.loader(dataset, batch_size=batch_size, train=True, seed=seed):
            batches.append((batch[0], batch[1]))
            if len(batches) == count:
                break
        return batches, 1
    generator = torch.Generator().manual_seed(seed)
    batches = [
        (torch.randn(batch_size, 3, 32, 32, generator=generator), torch.randint(0, 10, (batch_size,), generator=generator))
        for _ in range(count)
    ]
    return batches, 3


def prepare_model(name: str, in_channels: int, batches: list, seed: int) -> torch.nn.Module:
    """An untrained model whose BatchNorm running statistics are those of the data (so that
    eval-mode BN, which curvature uses, normalizes as in training)."""
    torch.manual_seed(seed)
    model = models.create(name, num_classes=10, in_channels=in_channels)
    norms = [module for module in model.modules() if isinstance(module, torch.nn.modules.batchnorm._BatchNorm)]
    for module in norms:
        module.reset_running_stats()
        module.momentum = None  # cumulative average over the recalibration batches
    model.train()
    with torch.no_grad():
        for inputs, _ in batches:
            model(inputs)
    for module in norms:
        module.momentum = 0.1
    return model.eval()


def time_implementations(model, batch, repeats: int, k: int, seed: int) -> dict:
    """Median seconds of a gradient and of one product per implementation, interleaved."""
    data = [batch]
    gradient_op = HessianOperator(model, data, cache_graph=False)
    textbook = HessianOperator(model, data, cache_graph=False)
    forward = HessianOperator(model, data, method="forward_over_reverse")
    generator = torch.Generator().manual_seed(seed)
    vector = torch.randn(textbook.dim, generator=generator)
    block = torch.randn(textbook.dim, k, generator=generator)
    # warm-up: first calls pay one-time costs (kernels, torch.func decompositions)
    gradient_op.gradient(), textbook.matvec(vector), forward.matvec(vector), forward.matmat(block)
    reference = textbook.matvec(vector)
    times = {key: [] for key in ("grad", "db", "for", "cached_first", "cached", "db_matmat", "for_matmat")}
    agreement = {}
    for repeat in range(repeats):
        log(f"timing repeat {repeat + 1}/{repeats}")
        times["grad"].append(_timed(gradient_op.gradient)[1])
        product, seconds = _timed(lambda: textbook.matvec(vector))
        times["db"].append(seconds)
        product, seconds = _timed(lambda: forward.matvec(vector))
        times["for"].append(seconds)
        agreement["for"] = _relative(product, reference)
        cached = HessianOperator(model, data, cache_graph=True)
        times["cached_first"].append(_timed(functools.partial(cached.matvec, vector))[1])
        product, seconds = _timed(functools.partial(cached.matvec, vector))
        times["cached"].append(seconds)
        agreement["cached"] = _relative(product, reference)
        del cached  # frees the cached graph before the next repeat
        product, seconds = _timed(lambda: textbook.matmat(block))
        times["db_matmat"].append(seconds / k)
        product, seconds = _timed(lambda: forward.matmat(block))
        times["for_matmat"].append(seconds / k)
    median = {key: statistics.median(values) for key, values in times.items()}
    median["cached20"] = (median["cached_first"] + 19 * median["cached"]) / 20
    return {"seconds": median, "agreement": agreement, "dim": textbook.dim}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _timed(function):
    start = time.perf_counter()
    result = function()
    return result, time.perf_counter() - start


def _relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).norm() / expected.norm())


def eigen_counts(model, batches, reference_tol: float, reference_iters: int, seed: int) -> dict:
    """Products each solver needs for the top-1 and top-5 eigenvalues, against a tight Lanczos."""
    operator = HessianOperator(model, batches, cache_graph=True)
    reference = top_eigenpairs(operator, k=5, method="lanczos", tol=reference_tol, max_iter=reference_iters, seed=seed + 1)
    truth = reference.eigenvalues.tolist()
    log(f"reference: {reference.num_matvecs} products, eigenvalues {truth}")
    rows = {"reference": {"eigenvalues": truth, "num_matvecs": reference.num_matvecs, "converged": reference.converged}}
    for method, k, tol in SOLVER_RUNS:
        result = top_eigenpairs(operator, k=k, method=method, tol=tol, max_iter=100, seed=seed)
        values = result.eigenvalues.tolist()
        log(f"{method} k={k} tol={tol}: {result.num_matvecs} products")
        errors = [abs(value - true) / abs(true) for value, true in zip(values, truth)]
        rows[f"{method}-{k}-{tol:g}"] = {
            "num_matvecs": result.num_matvecs,
            "max_error": max(errors),
            "first_within_1pct": _first_within(result, truth[:k], 0.01),
            "converged": result.all_converged,
            "eigenvalues": values,
            "seconds": result.wall_time_s,
        }
    return rows


def _first_within(result, truth: list[float], tolerance: float) -> int | None:
    """Products used when every one of the top-k estimates first lies within ``tolerance``
    (from the histories; None for eigsh, which keeps none, or when never reached)."""
    if not all(result.history):
        return None
    reached = []
    for values, counts, true in zip(result.history, result.history_matvecs, truth):
        hits = [count for value, count in zip(values, counts) if abs(value - true) <= tolerance * abs(true)]
        if not hits:
            return None
        reached.append(hits[0])
    if result.method == "power":
        return max(reached)  # deflation: eigenpair j starts after j-1 has stopped
    # Lanczos: the first step from which all k estimates are within tolerance
    for step in range(1, result.num_matvecs + 1):
        current = []
        for values, counts in zip(result.history, result.history_matvecs):
            index = max((i for i, count in enumerate(counts) if count <= step), default=None)
            current.append(None if index is None else values[index])
        if all(value is not None and abs(value - true) <= tolerance * abs(true) for value, true in zip(current, truth)):
            return step
    return None


def memory_child(args) -> None:
    """Run in a subprocess: peak resident memory of one implementation above the set-up."""
    batches, channels = load_batches(args.data, args.batch_size, 4, args.seed)
    model = prepare_model(args.memory_child[0], channels, batches, args.seed)
    data = batches[:1]
    implementation = args.memory_child[1]
    method = "forward_over_reverse" if implementation.startswith("for") else "double_backward"
    cache = implementation == "cached"
    operator = HessianOperator(model, data, method=method, cache_graph=cache)
    vector = torch.randn(operator.dim)
    block = torch.randn(operator.dim, args.matmat_k)
    _reset_peak()
    baseline = _status_kb("VmRSS")
    if implementation == "grad":
        operator.gradient()
    elif implementation.endswith("matmat"):
        operator.matmat(block)
    else:
        operator.matvec(vector)
        operator.matvec(vector)
    print(json.dumps({"peak_mb": (_status_kb("VmHWM") - baseline) / 1024, "cached_mb": operator.cached_bytes / 2**20}))


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    except OSError:
        pass


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def measure_memory(args, name: str) -> dict:
    results = {}
    for implementation in ("grad", "db", "for", "cached", "db_matmat", "for_matmat"):
        command = [sys.executable, __file__, "--memory-child", name, implementation, "--data", args.data,
                   "--batch-size", str(args.batch_size), "--matmat-k", str(args.matmat_k), "--seed", str(args.seed)]
        if args.threads:
            command += ["--threads", str(args.threads)]
        log(f"memory {name} {implementation}")
        done = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy())
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        results[implementation] = json.loads(lines[-1]) if lines else {"error": done.stderr.strip().splitlines()[-1:]}
    return results


def _timing_table(args, timings: dict) -> str:
    names = list(timings)
    out = [f"HVP cost, batch {args.batch_size}, CPU, {torch.get_num_threads()} threads, median of {args.repeats} "
           "interleaved repeats (ratio = one HVP / one loss+gradient):\n"]
    out.append("| implementation | " + " | ".join(f"{name} s | {name} ratio" for name in names) + " |")
    out.append("|---|" + "---|---|" * len(names))
    out.append("| loss + gradient | " + " | ".join(f"{timings[n]['seconds']['grad']:.3f} | 1.00" for n in names) + " |")
    for key, label in IMPLEMENTATIONS.items():
        cells = []
        for name in names:
            seconds = timings[name]["seconds"]
            cells.append(f"{seconds[key]:.3f} | {seconds[key] / seconds['grad']:.2f}")
        out.append(f"| {label.format(k=args.matmat_k)} | " + " | ".join(cells) + " |")
    out.append("")
    for name in names:
        agreement = ", ".join(f"{key} {value:.1e}" for key, value in timings[name]["agreement"].items())
        out.append(f"- {name}: dim {timings[name]['dim']:,}; relative difference to the textbook product: {agreement}")
    return "\n".join(out)


def tables(args, timings: dict, eigen: dict, memory: dict) -> str:
    out = []
    names = list(timings)
    if names:
        out.append(_timing_table(args, timings))
    if eigen:
        out.append("\nEigen-solvers, one calibration batch, max_iter 100 (power: per eigenpair); HVPs = products used "
                   "by the stopping rule; error = max relative error of the top-k against the reference; 'HVPs to 1 %' = "
                   "products when all top-k estimates first lay within 1 %, read from the histories:\n")
        out.append("| model | solver | k | tol | HVPs | max error | HVPs to 1 % | converged |")
        out.append("|---|---|---|---|---|---|---|---|")
        for name, rows in eigen.items():
            ref = rows["reference"]
            values = ", ".join(f"{value:.4g}" for value in ref["eigenvalues"])
            out.append(f"| {name} | reference: Lanczos | 5 | {args.reference_tol:g} | {ref['num_matvecs']} | eigenvalues {values} | | {all(ref['converged'])} |")
            for key, row in rows.items():
                if key == "reference":
                    continue
                method, k, tol = key.split("-", 2)
                first = "n/a (no history)" if method == "eigsh" else (row["first_within_1pct"] or "never")
                out.append(f"| {name} | {method} | {k} | {tol} | {row['num_matvecs']} | {row['max_error']:.1e} | {first} | {row['converged']} |")
    if memory:
        out.append("\nPeak resident memory above the set-up (MB; VmHWM in a fresh subprocess per implementation; "
                   "two products, or one matmat / gradient):\n")
        keys = ["grad", "db", "for", "cached", "db_matmat", "for_matmat"]
        out.append("| model | " + " | ".join(keys) + " | cached graph estimate |")
        out.append("|---|" + "---|" * (len(keys) + 1))
        for name, rows in memory.items():
            cells = [f"{rows[key]['peak_mb']:.0f}" if "peak_mb" in rows[key] else "error" for key in keys]
            estimate = rows["cached"].get("cached_mb", float("nan"))
            out.append(f"| {name} | " + " | ".join(cells) + f" | {estimate:.0f} |")
    return "\n".join(out)


def append_results(path: Path, section: str) -> None:
    """Append ``section`` to the results file, atomically (read, append, write a temp file, replace)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    existing = path.read_text() if path.exists() else "# Benchmark results\n"
    text = existing.rstrip("\n") + "\n\n" + section.rstrip("\n") + "\n"
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".results-", suffix=".md")
    with os.fdopen(handle, "w") as stream:
        stream.write(text)
    os.replace(temporary, path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet20,resnet56")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--data", choices=["fashion-mnist", "synthetic"], default="fashion-mnist")
    parser.add_argument("--matmat-k", type=int, default=4)
    parser.add_argument("--reference-tol", type=float, default=1e-6)
    parser.add_argument("--reference-iters", type=int, default=150)
    parser.add_argument("--skip", default="", help="comma list of parts to skip: timing,eigen,memory")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/RESULTS.md")
    parser.add_argument("--memory-child", nargs=2, metavar=("MODEL", "IMPLEMENTATION"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args)
        return
    skip = set(filter(None, args.skip.split(",")))
    started = time.perf_counter()
    load_before = os.getloadavg()
    timings, eigen, memory = {}, {}, {}
    for name in filter(None, args.models.split(",")):
        batches, channels = load_batches(args.data, args.batch_size, 4, args.seed)
        model = prepare_model(name, channels, batches, args.seed)
        log(f"{name}: prepared")
        if "timing" not in skip:
            timings[name] = time_implementations(model, batches[0], args.repeats, args.matmat_k, args.seed)
        if "eigen" not in skip:
            eigen[name] = eigen_counts(model, batches[:1], args.reference_tol, args.reference_iters, args.seed)
        if "memory" not in skip:
            memory[name] = measure_memory(args, name)
    body = tables(args, timings, eigen, memory)
    command = "PYTHONPATH=src python " + " ".join(shlex.quote(part) for part in [sys.argv[0], *(argv or sys.argv[1:])])
    header = (
        f"## Curvature engine ({dt.datetime.now().strftime('%Y-%m-%d %H:%M')})\n\n"
        f"- machine: {platform.platform()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads)\n"
        f"- command: `{command}`\n"
        f"- data: {'Fashion-MNIST training images (1x28x28)' if args.data == 'fashion-mnist' else 'synthetic randn (3x32x32)'}, "
        f"untrained models with BatchNorm statistics recalibrated on 4 batches; one calibration batch\n"
        f"- load average before/after: {load_before[0]:.1f} / {os.getloadavg()[0]:.1f} "
        f"(shared machine); wall time {time.perf_counter() - started:.0f} s\n"
    )
    section = header + "\n" + body
    print(section)
    append_results(Path(args.out), section)


if __name__ == "__main__":
    main()
