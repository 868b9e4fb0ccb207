"""What pruning costs at ImageNet scale: wall seconds and peak memory per stage of ``camphive.prune``.

Prunes ImageNet-shaped models on synthetic 3x224x224 images (seeded normal noise, random labels:
the cost of pruning does not depend on what the images show) with the defaults a new user gets:
CAMP-HiVe unstructured at sparsity 0.9 (``camphive.prune(model, calib, sparsity=0.9)``), SparseGPT
at the same sparsity (``criterion="sparsegpt"``, the strongest one-shot peer, for scale) and
CAMP-HiVe structured at 2x fewer MACs (``mode="structured", target_macs_ratio=2.0``), both with the refit
after the last cycle (their default since 2026-12-02); ``unstructured-no-refit`` and ``structured-no-refit``
without it (the defaults before), ``refit-per-layer`` and ``structured-refit-per-layer`` the defaults with the
refit reading the layers by forwards stopped at each one (as it does for models that do not trace). For each model
and calibration set one summary table puts them side by side with one no-grad forward pass over the
same images: seconds, seconds in forward passes, ratio to SparseGPT and peak memory. Each key function of the pipeline runs inside a :class:`camphive.profiling.StageProfile`
stage (wrapped where it is looked up, so the table follows the code wherever it lives; a stage
called inside another is shown under it), and cProfile's cumulative seconds for the same function
are printed beside them as a cross-check. Every time is also given in units of ONE no-grad forward
pass over the same calibration images (timed just before the run, in eval mode).

Peak memory is the process's resident set size (RSS) while the run was going (sampled every
20 ms; exact when the run set a new process peak). Runs share one process, in the order of
``--modes``: the first run's peak is its own, a later run's peak may include memory the allocator
kept from the runs before it (an upper bound).

    python benchmarks/imagenet_cost.py --models resnet18-imagenet --sizes 128,256
    python benchmarks/imagenet_cost.py --models resnet50-imagenet --sizes 256 --modes unstructured,sparsegpt

The machine may be shared: the load average before and after each run is printed with it.
"""
from __future__ import annotations

import argparse
import cProfile
import functools
import importlib
import json
import os
import pkgutil
import pstats
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import publish

import camphive  # noqa: E402  (common.py puts src/ on the path)
from camphive import models  # noqa: E402
from camphive.profiling import StageProfile, max_rss_bytes  # noqa: E402
from camphive.pruning.unstructured import refit as refit_module  # noqa: E402

# Module-level functions and methods timed as stages, by name (found in every camphive module).
KEY_FUNCTIONS = (
    "layer_input_covariances", "scores", "channel_scores", "select_to_prune", "least_squares_merge", "pair_merge",
    "recalibrate_batchnorm", "model_summary", "count_macs", "top_loss_eigenvalues", "build_dependency_graph",
    "channel_groups", "consumer_grams", "merge_group", "remove_channels", "latency_before_after", "solve_layers",
    "choose_within_units", "conjugate_gradient_merge", "_solve_directly", "latency_aware_kept", "refit_layers",
    "frontier_profile", "_refit_in_one_pass", "_refit_by_stopped_forwards",
    # inside the merges: the damped G's inverse per layer, gathering each unit's system, the batched solves
    "_inverse", "submatrices", "inverse_submatrices", "times", "inverse_times", "_padded_solve",
)
MODES = {  # the options of each run; everything else is the default a new user gets
    "unstructured": {"sparsity": 0.9},  # since 2026-12-02: one cycle, then the refit
    "sparsegpt": {"sparsity": 0.9, "criterion": "sparsegpt"},
    "unstructured-no-refit": {"sparsity": 0.9, "refit": False},  # three cycles: the default before 2026-12-02
    "refit": {"sparsity": 0.9, "cycles": 3, "refit": True},  # three cycles and the refit, as first measured
    "structured": {"mode": "structured", "target_macs_ratio": 2.0},  # the refit included since 2026-12-02
    "structured-no-refit": {"mode": "structured", "target_macs_ratio": 2.0, "refit": False},
    "structured-refit": {"mode": "structured", "target_macs_ratio": 2.0, "refit": True},
    # the defaults reading the layers for the refit by forwards stopped at each one (models that do not trace)
    "refit-per-layer": {"sparsity": 0.9},
    "structured-refit-per-layer": {"mode": "structured", "target_macs_ratio": 2.0},
    "statistics": {},  # only the layer input second moments G of every prunable layer, as one cycle computes them
}
LABELS = {"unstructured": "CAMP-HiVe unstructured, sparsity 0.9 (default)", "sparsegpt": "SparseGPT, sparsity 0.9",
          "unstructured-no-refit": "CAMP-HiVe unstructured, sparsity 0.9, refit=False (3 cycles)",
          "refit": "CAMP-HiVe unstructured, sparsity 0.9, 3 cycles, refit=True",
          "structured": "CAMP-HiVe structured, 2x fewer MACs (default)",
          "structured-no-refit": "CAMP-HiVe structured, 2x fewer MACs, refit=False",
          "structured-refit": "CAMP-HiVe structured, 2x fewer MACs, refit=True",
          "refit-per-layer": "CAMP-HiVe unstructured, sparsity 0.9 (default), refit by stopped forwards per layer",
          "structured-refit-per-layer": "CAMP-HiVe structured, 2x fewer MACs (default), refit by stopped forwards "
                                        "per layer",
          "statistics": "layer statistics G of every layer, once"}
GIB = 2**30


def wrap_key_functions(profile: StageProfile) -> list[tuple[object, str, object]]:
    """Run every key function inside ``profile.stage(its name)``; returns what to restore."""
    for module_info in pkgutil.walk_packages(camphive.__path__, "camphive."):
        if module_info.name.endswith("__main__"):  # importing it would run the command line
            continue
        try:
            importlib.import_module(module_info.name)
        except Exception:  # optional parts (onnx, distributed launchers) may not import here
            continue
    wrappers, restore = {}, []
    modules = [module for name, module in list(sys.modules.items()) if name.startswith("camphive")]
    for module in modules:
        for owner in [module, *[value for value in vars(module).values()
                                if isinstance(value, type) and value.__module__ == module.__name__]]:
            for name in KEY_FUNCTIONS:
                original = vars(owner).get(name)
                if not callable(original) or isinstance(original, type):
                    continue
                label = name if owner is module else f"{owner.__name__}.{name}"
                if original not in wrappers:
                    wrappers[original] = _staged(profile, label, original)
                restore.append((owner, name, original))
                setattr(owner, name, wrappers[original])
    return restore


def _staged(profile: StageProfile, label: str, function):
    @functools.wraps(function)
    def staged(*args, **kwargs):
        with profile.stage(label):
            return function(*args, **kwargs)

    return staged


def synthetic_batches(count: int, batch_size: int, resolution: int, seed: int = 0) -> list:
    """``count`` images ``(3, resolution, resolution)`` of seeded standard normal noise with random labels."""
    generator = torch.Generator().manual_seed(seed)
    sizes = [batch_size] * (count // batch_size) + ([count % batch_size] if count % batch_size else [])
    return [(torch.randn(size, 3, resolution, resolution, generator=generator),
             torch.randint(0, 1000, (size,), generator=generator)) for size in sizes]


def forward_seconds(model, batches) -> tuple[float, int | None]:
    """Wall seconds and peak RSS of one no-grad forward pass over ``batches`` in eval mode (after a
    one-image warm-up)."""
    model.eval()
    profile = StageProfile()
    with torch.no_grad():
        model(batches[0][0][:1])
        started = time.perf_counter()
        with profile.stage("forward"):
            for inputs, _ in batches:
                model(inputs)
    return time.perf_counter() - started, profile.records["forward"].peak_rss_bytes


class _CycleDone(Exception):
    """Stops a run after the cycle it was asked for (the state is saved first)."""


class _OutOfTime(Exception):
    """Stops a run at its time budget; the stages open then are recorded up to that moment."""


def _out_of_time(signum, frame):
    raise _OutOfTime


def code_version() -> str:
    """The commit the pruning code is at, and whether ``src/`` differs from it (what was measured)."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src"], cwd=root, capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return commit + (" with uncommitted changes in src/" if dirty else "")


def profile_one(name: str, count: int, mode: str, args, cycle: int | None = None) -> dict:
    """Prune one model once (or only its cycle ``cycle``, resuming from ``args.state_dir``); returns
    the stages, the forward time and the totals."""
    torch.manual_seed(0)
    model = models.create(name, num_classes=1000)
    batches = synthetic_batches(count, args.batch_size, args.resolution)
    options = dict(MODES[mode])
    if mode.startswith("structured") and args.no_latency:
        options["measure_latency"] = False
    state_path = args.state_dir / f"{name}-{count}-{mode}-after-cycle-{{}}.pt"
    if cycle is not None:
        if cycle > 1:  # resume exactly where the previous part stopped
            saved = torch.load(str(state_path).format(cycle - 1))
            model.load_state_dict(saved["model"])
            options.update(masks=saved["masks"], start_cycle=cycle - 1)

        def stop_after(done: int, masks, record) -> None:
            torch.save({"model": model.state_dict(), "masks": masks}, str(state_path).format(done))
            if done == cycle:
                raise _CycleDone

        options["on_cycle_end"] = stop_after
    load_before = os.getloadavg()[0]
    forward, forward_peak = forward_seconds(model, batches)
    profile = StageProfile()
    restore = wrap_key_functions(profile)
    top = "camphive.prune" if mode != "statistics" else "statistics only"
    profiler = cProfile.Profile()
    started, finished = time.perf_counter(), True
    signal.signal(signal.SIGALRM, _out_of_time)
    signal.alarm(args.budget)
    try:
        with profile.stage(top):
            profiler.enable()
            if mode == "statistics":  # the stage that grows with the calibration set, alone
                camphive.curvature.layer_input_covariances(model, batches)
            else:
                refit_module.ONE_PASS = not mode.endswith("per-layer")
                try:
                    camphive.prune(model, batches, **options)
                finally:
                    refit_module.ONE_PASS = True
    except _CycleDone:
        pass
    except _OutOfTime:
        finished = False
    finally:
        signal.alarm(0)
        profiler.disable()
        for owner, attribute, original in restore:
            setattr(owner, attribute, original)
    seconds = time.perf_counter() - started
    stages = profile.to_dict()["stages"]
    return {"model": name, "images": count, "mode": mode, "forward": forward, "forward_peak": forward_peak,
            "seconds": seconds, "stages": stages, "cprofile": cumulative_by_name(profiler),
            "peak": stages[top]["peak_rss_bytes"], "maxrss": max_rss_bytes(), "load": (load_before, os.getloadavg()[0]),
            "cycles": "all" if cycle is None else str(cycle), "finished": finished, "code": code_version(),
            "budget": args.budget}


def combine(parts: list[dict]) -> dict:
    """One run from the runs of its cycles: seconds and calls add up, peaks and the load range widen,
    the forward time is the parts' median (each part timed it on a possibly differently loaded machine)."""
    combined = dict(parts[0], seconds=sum(part["seconds"] for part in parts),
                    finished=all(part.get("finished", True) for part in parts),
                    cycles="+".join(part["cycles"] for part in parts),
                    forward=sorted(part["forward"] for part in parts)[len(parts) // 2],
                    maxrss=max(part["maxrss"] for part in parts),
                    peak=max(part["peak"] for part in parts),
                    forward_peak=max(part["forward_peak"] for part in parts),
                    load=(min(min(part["load"]) for part in parts), max(max(part["load"]) for part in parts)),
                    stages={}, cprofile={})
    for part in parts:
        for path, record in part["stages"].items():
            total = combined["stages"].setdefault(path, {"seconds": 0.0, "calls": 0, "peak_rss_bytes": None})
            total["seconds"] += record["seconds"]
            total["calls"] += record["calls"]
            peaks = [peak for peak in (total["peak_rss_bytes"], record["peak_rss_bytes"]) if peak is not None]
            total["peak_rss_bytes"] = max(peaks) if peaks else None
        for function, seconds in part["cprofile"].items():
            combined["cprofile"][function] = combined["cprofile"].get(function, 0.0) + seconds
    return combined


def cumulative_by_name(profiler: cProfile.Profile) -> dict[str, float]:
    """cProfile's cumulative seconds of each key function (largest entry of that name: wrappers share it)."""
    found: dict[str, float] = {}
    for (_, _, function), (_, _, _, cumulative, _) in pstats.Stats(profiler).stats.items():
        if function in KEY_FUNCTIONS:
            found[function] = max(found.get(function, 0.0), cumulative)
    return found


def table(run: dict) -> str:
    """One run as a markdown table: a row per stage path, indented under the stage that called it."""
    forward = run["forward"]
    cycles = "" if run.get("cycles", "all") == "all" else f" (cycles {run['cycles']}, one process each)"
    if not run.get("finished", True):
        cycles += " **stopped unfinished at its time budget**"
    lines = [f"**{run['model']}, {run['images']} images, {LABELS[run['mode']]}**{cycles}: {run['seconds']:.0f} s = "
             f"**{run['seconds'] / forward:.1f} forward passes** (one no-grad forward over the {run['images']} "
             f"images: {forward:.1f} s); peak RSS {run['peak'] / GIB:.2f} GiB; load average "
             f"{min(run['load']):.1f} to {max(run['load']):.1f} (2 cores)", "",
             "| stage | calls | seconds | forward passes | peak RSS (GiB) | cProfile cumulative s |",
             "|---|---|---|---|---|---|"]
    for path, record in run["stages"].items():
        depth = path.count("/")
        label = ("&nbsp;&nbsp;" * depth) + path.rsplit("/", 1)[-1]
        short = path.rsplit("/", 1)[-1].rsplit(".", 1)[-1]
        profiled = run["cprofile"].get(short)
        peak = record["peak_rss_bytes"]
        lines.append(f"| {label} | {record['calls']} | {record['seconds']:.1f} | {record['seconds'] / forward:.2f} | "
                     f"{'-' if peak is None else f'{peak / GIB:.2f}'} | "
                     f"{'' if profiled is None or depth == 0 else f'{profiled:.1f}'} |")
    return "\n".join(lines)


def summary(runs: list[dict]) -> str:
    """The runs of one model and calibration set side by side with one no-grad forward pass over it.

    Each run's forward passes use the forward pass timed just before it (the load may drift between
    runs); the forward row shows their median. Ratios to SparseGPT are of wall seconds."""
    model, images = runs[0]["model"], runs[0]["images"]
    forwards = sorted(run["forward"] for run in runs)
    forward = forwards[len(forwards) // 2]
    sparsegpt = next((run for run in runs if run["mode"] == "sparsegpt"), None)
    reference = None if sparsegpt is None else sparsegpt["seconds"]
    reference_finished = sparsegpt is None or sparsegpt.get("finished", True)
    loads = [value for run in runs for value in run["load"]]

    def ratio(seconds: float, finished: bool = True) -> str:
        """Runs stopped at their budget bound the ratio from one side (both stopped: unknown)."""
        if reference is None or not (finished or reference_finished):
            return "-"
        bound = "" if finished == reference_finished else ("at least " if reference_finished else "at most ")
        return f"{bound}{seconds / reference:.2f}"

    def gib(value) -> str:
        return "-" if value is None else f"{value / GIB:.2f}"

    codes = sorted({run.get("code", "unknown") for run in runs})
    lines = [f"**{model}, {images} calibration images**: load average {min(loads):.1f} to {max(loads):.1f} "
             f"(2 cores); code at {', '.join(codes)}", "", "| run | seconds | forward passes | / SparseGPT | peak RSS (GiB) |", "|---|---|---|---|---|",
             f"| one no-grad forward pass over the {images} images (median of {len(forwards)}) | {forward:.1f} | 1 | "
             f"{ratio(forward)} | {gib(runs[0]['forward_peak'])} |"]
    for run in runs:
        stopped = "" if run.get("finished", True) else f" (stopped at its {run.get('budget', '?')} s budget: at least)"
        cycles = "" if run.get("cycles", "all") == "all" else f" (cycles {run['cycles']}, one process each)"
        lines.append(f"| {LABELS[run['mode']]}{cycles}{stopped} | {run['seconds']:.1f} | "
                     f"{run['seconds'] / run['forward']:.1f} | "
                     f"{'1.00' if run is sparsegpt else ratio(run['seconds'], run.get('finished', True))} | "
                     f"{gib(run['peak'])} |")
    return "\n".join(lines)


def ordered_stages(stages: dict) -> dict:
    """Stage paths with every parent before its children (StageProfile records a path when it first closes)."""
    return dict(sorted(stages.items(), key=lambda item: item[0].split("/")))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18-imagenet",
                        help="comma-separated: resnet18-imagenet, mobilenetv2-imagenet, resnet50-imagenet, ...")
    parser.add_argument("--sizes", default="128,256", help="comma-separated calibration set sizes (images)")
    parser.add_argument("--modes", default="unstructured,sparsegpt,structured",
                        help="comma-separated, run in this order: " + ", ".join(MODES) + " (statistics: G of "
                             "every layer alone, what grows with the images)")
    parser.add_argument("--batch-size", type=int, default=128, help="calibration batch size (the CLI's default)")
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the target machine has 2 cores)")
    parser.add_argument("--no-latency", action="store_true", help="structured: skip the before/after latency timing")
    parser.add_argument("--cycle", type=int, default=None,
                        help="unstructured, sparsegpt: run only this cycle (1, 2, 3), resuming from --state-dir, and save "
                             "its part there; --combine then tables the parts (keeps each process short)")
    parser.add_argument("--combine", action="store_true",
                        help="table (and record) the runs saved in --state-dir: the parts of --cycle runs, or whole runs")
    parser.add_argument("--budget", type=int, default=600,
                        help="seconds a run may take; it is stopped then and its table marked unfinished")
    parser.add_argument("--state-dir", type=Path, default=Path(tempfile.gettempdir()) / "camphive-imagenet-cost")
    parser.add_argument("--no-write", action="store_true", help="print only; do not record in RESULTS.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.state_dir.mkdir(parents=True, exist_ok=True)
    runs = []
    for name in args.models.split(","):
        for count in (int(size) for size in args.sizes.split(",")):
            for mode in args.modes.split(","):
                key = f"{name}-{count}-{mode}"
                if args.combine:
                    parts = sorted(args.state_dir.glob(f"{key}-part-*.json"))
                    if not parts:  # this model was not run at this size
                        continue
                    run = combine([json.loads(part.read_text()) for part in parts])
                else:  # every run is kept, so that --combine can table (and record) runs made one at a time
                    run = profile_one(name, count, mode, args, args.cycle)
                    (args.state_dir / f"{key}-part-{args.cycle or 'all'}.json").write_text(json.dumps(run))
                run["stages"] = ordered_stages(run["stages"])
                print(table(run), flush=True)
                runs.append(run)
    if args.cycle is not None:
        return  # a part: tabled and recorded by --combine
    body = ("Synthetic 3x{0}x{0} images, calibration batches of {1}, {2} torch threads. CAMP-HiVe unstructured: "
            "`camphive.prune(model, calib, sparsity=0.9)`; SparseGPT: the same with `criterion=\"sparsegpt\"`; "
            "CAMP-HiVe structured: `mode=\"structured\", target_macs_ratio=2.0`; everything else default. Forward "
            "passes: the run's seconds over those of one no-grad forward pass over the same images, timed just "
            "before it. Peak RSS: the process's resident memory while the run (or stage) went on, sampled every "
            "20 ms, exact where it set a new process peak; runs share one process in the order of the table, so "
            "a later run's peak may include memory kept from the runs before it. Then the stages of the "
            "CAMP-HiVe runs: the pipeline's key functions, nested under their caller.\n\n"
            ).format(args.resolution, args.batch_size, args.threads)
    if args.combine:
        body += ("Tabled with `--combine` from the runs saved in `--state-dir`, each made by this script in its own "
                 "process with the same options for its model and size plus `--budget` (a run stopped at its budget "
                 "is marked: its time is a lower bound, its peak memory that of the part it ran).\n\n")
    setups: dict[tuple, list[dict]] = {}
    for run in runs:
        setups.setdefault((run["model"], run["images"]), []).append(run)
    body += "\n\n".join(summary(group) for group in setups.values()) + "\n\n"
    body += "\n\n".join(table(run) for run in runs if run["mode"] != "sparsegpt")
    publish(f"ImageNet-scale pruning cost: {args.models} ({args.sizes} images, {args.modes})", body,
            write=not args.no_write)


if __name__ == "__main__":
    main()
