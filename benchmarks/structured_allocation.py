"""Does any split of resnet20's channels between its stages, at about 3x fewer MACs, run faster?

Uniform allocation with ``round_to=8`` gives resnet20 (1x28x28) a batch-64 CPU speed-up of
about 0.75-0.8 of its 3x MACs reduction (structured.py). This benchmark asks whether that is
the allocation or the hardware: it lists every (residual, inner) width per stage on the
multiples of 8 whose predicted MACs reduction lies in ``--band``, times the hand-picked
splits and a seeded random sample of the others (random weights, BN folded; eager NCHW and
NHWC, interleaved medians), then times the fastest few again compiled (torch.compile, NHWC).
A second table times every stage's convolutions with forward hooks in the dense and the
uniform model, to show where the time goes.

    PYTHONPATH=src python benchmarks/structured_allocation.py --threads 1
"""
from __future__ import annotations

import argparse
import itertools
import os
import random
import time
from collections import defaultdict

import torch  # noqa: E402
from common import append_results, keep_freed_memory  # noqa: E402  (puts src/ on the path)

from camphive import models  # noqa: E402
from camphive.export import fold_batchnorm  # noqa: E402
from camphive.measure import count_macs, measure_latency  # noqa: E402
from camphive.pruning.structured.budget import MacsModel  # noqa: E402
from camphive.pruning.structured.groups import build_dependency_graph, channel_groups, remove_channels  # noqa: E402

INPUT = (1, 28, 28)
DENSE = (16, 16, 32, 32, 64, 64)  # (residual, inner) widths of stages 1-3
UNIFORM = (8, 8, 16, 24, 40, 40)  # what uniform allocation with round_to 8 gives at 3x
HAND_PICKED = {"dense": DENSE, "uniform, round_to 8": UNIFORM,
               "stage 1 residual kept": (16, 8, 16, 16, 32, 24), "stage 1 inner kept": (8, 16, 16, 16, 32, 32),
               "stage 2 residual wider": (8, 8, 24, 16, 40, 32), "stage 3 wider": (8, 8, 16, 16, 48, 40),
               "residual streams wider": (16, 8, 24, 8, 40, 24)}
RESIDUAL_ROOTS = {"conv1+": 0, "layer2.0.conv2+": 2, "layer3.0.conv2+": 4}


def width_index(group_key: str) -> int:
    """Which of the six widths a resnet20 channel group has: a stage's residual stream or a block's inner conv."""
    index = next((i for root, i in RESIDUAL_ROOTS.items() if group_key.startswith(root)), None)
    return index if index is not None else 2 * (int(group_key[len("layer")]) - 1) + 1


def dense_resnet20():
    model = models.create("resnet20", num_classes=10, in_channels=1).eval()
    graph = build_dependency_graph(model, torch.randn(1, *INPUT))
    return model, graph, channel_groups(model, graph, [])


def resnet20_with_widths(widths: tuple[int, ...]) -> torch.nn.Module:
    """resnet20 (random weights, BN folded) with the given (residual, inner) widths per stage."""
    model, graph, groups = dense_resnet20()
    for group in groups:
        remove_channels(graph, group, torch.arange(widths[width_index(group.key)], group.size))
    return fold_batchnorm(model)


def widths_in_band(band: tuple[float, float]) -> list[tuple[int, ...]]:
    """Every width tuple on the multiples of 8 whose predicted MACs reduction lies in ``band``."""
    model, _, groups = dense_resnet20()
    macs = MacsModel(model, groups, count_macs(model, torch.randn(1, *INPUT)))
    choices = [range(8, width + 1, 8) for width in DENSE]
    found = []
    for widths in itertools.product(*choices):
        kept = {group.key: widths[width_index(group.key)] for group in groups}
        if band[0] <= macs.total / macs.predict(kept) <= band[1]:
            found.append(widths)
    return found


def stage_profile(widths: tuple[int, ...], threads: int, repeats: int = 30) -> dict[str, float]:
    """Milliseconds per batch-64 forward (NHWC, eager) spent in each stage's conv/linear layers, and in all."""
    model = resnet20_with_widths(widths).to(memory_format=torch.channels_last)
    batch = torch.randn(64, *INPUT).contiguous(memory_format=torch.channels_last)
    spent, started = defaultdict(float), {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            stage = name.split(".")[0]
            handles.append(module.register_forward_pre_hook(lambda m, i: started.__setitem__(m, time.perf_counter())))
            handles.append(module.register_forward_hook(
                lambda m, i, o, stage=stage: spent.__setitem__(stage, spent[stage] + time.perf_counter() - started[m])))
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            for _ in range(5):
                model(batch)
            spent.clear()
            begin = time.perf_counter()
            for _ in range(repeats):
                model(batch)
            total = time.perf_counter() - begin
    finally:
        torch.set_num_threads(previous)
        for handle in handles:
            handle.remove()
    profile = {stage: 1000 * seconds / repeats for stage, seconds in spent.items()}
    profile["other operations"] = 1000 * total / repeats - sum(profile.values())
    profile["whole model"] = 1000 * total / repeats
    return profile


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--band", default="2.95,3.15", help="MACs reductions to search, low,high")
    parser.add_argument("--samples", type=int, default=40, help="random splits timed besides the hand-picked ones")
    parser.add_argument("--compiled", type=int, default=5, help="fastest splits (NHWC) timed again compiled")
    parser.add_argument("--latency-seconds", type=float, default=9.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-write", dest="write", action="store_false", help="print only, leave RESULTS.md alone")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    allocator = keep_freed_memory()
    started, load_before = time.perf_counter(), os.getloadavg()[0]
    band = tuple(float(x) for x in args.band.split(","))
    found = widths_in_band(band)
    others = [w for w in found if w not in HAND_PICKED.values()]
    sample = random.Random(args.seed).sample(others, min(args.samples, len(others)))
    labels = {**{str(widths): label for label, widths in HAND_PICKED.items()}, **{str(w): "random" for w in sample}}
    candidates = {name: resnet20_with_widths(parse_widths(name)) for name in labels}
    example = torch.randn(1, *INPUT)
    macs = {name: count_macs(model, example).total for name, model in candidates.items()}
    reduction = {name: macs[str(DENSE)] / value for name, value in macs.items()}
    timing = dict(batch_sizes=(64,), threads=args.threads, target_seconds=args.latency_seconds, min_repeats=15)
    timed = {layout: measure_latency(candidates, INPUT, channels_last=layout == "NHWC", **timing)
             for layout in ("NCHW", "NHWC")}
    ratio = {layout: {name: report.get(name, 64).speedup / reduction[name] for name in candidates}
             for layout, report in timed.items()}
    fastest = sorted((n for n in candidates if n != str(DENSE)), key=lambda n: -ratio["NHWC"][n])[:args.compiled]
    chosen = [str(DENSE)] + list(dict.fromkeys([str(UNIFORM), *fastest]))
    timed["NHWC compiled"] = measure_latency({n: candidates[n] for n in chosen}, INPUT, channels_last=True,
                                             compiled=True, **timing)
    ratio["NHWC compiled"] = {n: timed["NHWC compiled"].get(n, 64).speedup / reduction[n] for n in chosen}

    lines = [f"resnet20 (1x28x28, random weights, BN folded), widths (residual, inner) of stages 1-3 on the "
             f"multiples of 8: {len(found)} splits have a predicted MACs reduction in [{band[0]}, {band[1]}]; timed "
             f"here: the hand-picked ones and {len(sample)} drawn at random (seed {args.seed}), then the "
             f"{len(chosen) - 1} fastest in NHWC (and uniform) again compiled. Batch 64, {args.threads} thread(s), "
             "interleaved medians; speed-up against the dense model in the same layout; ratio = speed-up / MACs "
             "reduction (goal >= 0.8). Sorted by the NHWC ratio:\n",
             "| widths | split | MACs reduction | NCHW ms | speed-up | ratio | NHWC ms | speed-up | ratio "
             "| NHWC compiled ms | speed-up | ratio |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in sorted(candidates, key=lambda n: -ratio["NHWC"][n]):
        cells = []
        for layout, report in timed.items():
            if name in ratio[layout]:
                result = report.get(name, 64)
                cells.append(f"{result.median_ms:.1f} | {result.speedup:.2f} | {ratio[layout][name]:.2f}")
            else:
                cells.append(" |  | ")
        lines.append(f"| {name} | {labels[name]} | {reduction[name]:.2f}x | " + " | ".join(cells) + " |")
    spread = sorted(ratio["NHWC"][n] for n in candidates if n != str(DENSE))
    lines.append(f"\nNHWC ratio over the {len(spread)} pruned splits: {spread[0]:.2f} to {spread[-1]:.2f}; uniform "
                 f"{ratio['NHWC'][str(UNIFORM)]:.2f}; compiled: best "
                 f"{max(v for n, v in ratio['NHWC compiled'].items() if n != str(DENSE)):.2f}.")

    profiles = {widths: stage_profile(widths, args.threads) for widths in (DENSE, UNIFORM)}
    stage_macs = {widths: stage_macs_of(widths) for widths in (DENSE, UNIFORM)}
    lines += ["\nWhere the time goes (NHWC eager, batch 64, forward hooks around each conv/linear; "
              "'other operations' = whole model minus the layers: ReLU, additions, pooling, copies):\n",
              "| part | dense ms | uniform 3x ms | speed-up | MACs reduction | ratio |", "|---|---|---|---|---|---|"]
    for part in profiles[DENSE]:
        dense_ms, pruned_ms = profiles[DENSE][part], profiles[UNIFORM].get(part, 0.0)
        speed = dense_ms / pruned_ms if pruned_ms > 0 else float("nan")
        macs_cut = stage_macs[DENSE].get(part, 0) / max(stage_macs[UNIFORM].get(part, 0), 1)
        cells = f"{macs_cut:.2f}x | {speed / macs_cut:.2f}" if part in stage_macs[DENSE] else " | "
        lines.append(f"| {part} | {dense_ms:.2f} | {pruned_ms:.2f} | {speed:.2f} | {cells} |")

    header = (f"Load average before/after {load_before:.1f} / {os.getloadavg()[0]:.1f} (shared 2-core machine); "
              f"wall time {time.perf_counter() - started:.0f} s; memory: {allocator}.\n")
    text = header + "\n### Channel allocation and latency, resnet20 at 3x\n\n" + "\n".join(lines)
    print(text)
    if args.write:
        append_results("Structured pruning: channel allocation and latency", text)


def parse_widths(name: str) -> tuple[int, ...]:
    """The width tuple back from its printed form, e.g. "(8, 8, 16, 24, 40, 40)"."""
    return tuple(int(x) for x in name.strip("()").split(","))


def stage_macs_of(widths: tuple[int, ...]) -> dict[str, float]:
    """MACs per sample of each stage's conv/linear layers (top-level module name), and of the whole model."""
    model = resnet20_with_widths(widths)
    report = count_macs(model, torch.randn(1, *INPUT))
    per_stage: dict[str, float] = defaultdict(float)
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            per_stage[name.split(".")[0]] += report.per_layer.get(name, 0)
    per_stage["whole model"] = report.total
    return dict(per_stage)


if __name__ == "__main__":
    main()
