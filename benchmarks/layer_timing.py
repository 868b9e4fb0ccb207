"""Does the layer timing table predict the speed of whole pruned models, is it repeatable, and
how fast can the latency-aware rounding's choices get?

The latency-aware rounding of structured pruning (``latency_aware=True``) times every layer of
a model at the channel counts it could keep (``camphive.measure.layer_timing.LayerTimer``) and
picks the mix whose summed layer times are lowest. Checks on each of ``--models`` (1x28x28,
random weights) at 2x fewer MACs, counts rounded to multiples of 16 with the choices the default
uses:

* repeatability (the first model only): the same table timed four times, in this process with
  its default allocator and in the child process the library uses (whose allocator keeps freed
  memory): the spread of each layer shape's four medians;
* prediction and reach: the dense model, the uniform mix, the search's pick
  (``latency_aware_kept``) and random mixes of the choices within 1.9-2.2x fewer MACs (``--mixes``
  in all) built with random weights and timed whole (interleaved medians, batch 64), against
  the sum of their layers' times: Spearman's rank correlation, and each mix's speed-up over its
  MACs reduction, the ratio the structured latency goal asks to be >= 0.8.

    PYTHONPATH=src python benchmarks/layer_timing.py --threads 1 --models resnet20,resnet56
"""
from __future__ import annotations

import argparse
import copy
import random
import time

import numpy as np
import torch
from common import keep_freed_memory, publish

from camphive import models  # noqa: E402  (common.py puts src/ on the path)
from camphive.measure import count_macs, measure_latency  # noqa: E402
from camphive.measure.layer_timing import LayerTimer  # noqa: E402
from camphive.pruning.structured.budget import (  # noqa: E402
    ChannelRounding,
    MacsModel,
    rounding_choices,
    uniform_kept_for_macs,
)
from camphive.pruning.structured.groups import build_dependency_graph, channel_groups, remove_channels  # noqa: E402
from camphive.pruning.structured.latency_allocation import (  # noqa: E402
    _Costs,
    _possible_shapes,
    latency_aware_kept,
)

INPUT = (1, 28, 28)


def setup(name: str, seed: int):
    torch.manual_seed(seed)
    model = models.create(name, num_classes=10, in_channels=1).eval()
    example = (torch.randn(1, *INPUT),)
    groups = channel_groups(model, build_dependency_graph(model, example), [], {})
    macs_model = MacsModel(model, groups, count_macs(model, example))
    rounding = ChannelRounding(16, 16)
    kept, fraction = uniform_kept_for_macs(groups, {}, macs_model, macs_model.total / 2, rounding, 1)
    choices = rounding_choices(groups, {}, fraction, kept, rounding, 1)
    return model, example, macs_model, kept, choices


def spread(model, example, shapes, isolate: bool, threads: int, seconds: float) -> tuple[float, float]:
    """Median and maximum relative spread (std / mean) of four timings of every shape."""
    tables = []
    for _ in range(4):
        timer = LayerTimer(model, example, threads=threads, seconds=seconds, isolate=isolate)
        timer.measure(shapes)
        tables.append(timer.table)
    values = np.array([[table[key] for key in tables[0]] for table in tables])
    relative = values.std(0) / values.mean(0)
    return float(np.median(relative)), float(relative.max())


def with_counts(model, example, kept: dict) -> torch.nn.Module:
    pruned = copy.deepcopy(model)
    graph = build_dependency_graph(pruned, example)
    for group in channel_groups(pruned, graph, [], {}):
        remove_channels(graph, group, torch.arange(kept[group.key], group.size))
    return pruned.eval()


def spearman(a, b) -> float:
    rank_a, rank_b = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(rank_a, rank_b)[0, 1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet20", help="comma-separated catalog names (1x28x28 input)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--mixes", type=int, default=16, help="mixes timed whole per model, dense excluded")
    parser.add_argument("--seconds", type=float, default=1.0, help="LayerTimer's budget per table")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    started = time.time()
    torch.set_num_threads(args.threads)
    names = args.models.split(",")
    model, example, macs_model, kept, choices = setup(names[0], args.seed)
    shapes = _possible_shapes(macs_model, kept, choices)
    here = spread(model, example, shapes, False, args.threads, args.seconds)  # before pinning this process
    allocator = keep_freed_memory()  # whole models are timed as benchmarks/structured.py times them
    child = spread(model, example, shapes, True, args.threads, args.seconds)
    lines = [f"{names[0]} (1x28x28, random weights), 2x fewer MACs, multiples of 16 (8 in 16-channel groups): "
             f"{len(set(shapes))} (layer, channel counts) choices; {args.threads} thread(s).\n",
             "Repeatability: four tables of the same shapes; relative spread (std / mean) of each shape's four "
             "medians:\n", "| timed | median spread | largest spread |", "|---|---|---|",
             f"| in this process (default glibc allocator) | {here[0]:.3f} | {here[1]:.3f} |",
             f"| in a child process that keeps freed memory (the library's way) | {child[0]:.3f} | {child[1]:.3f} |"]
    for name in names:
        lines += prediction(name, args, allocator)
    lines.append(f"\nWall time {time.time() - started:.0f} s.")
    publish("Layer timing table: repeatability and prediction of whole-model latency", "\n".join(lines))


def prediction(name: str, args, allocator: str) -> list[str]:
    """Whole-model latency of the dense model, the uniform mix, the search's pick and random mixes,
    against the sums of their layers' times."""
    model, example, macs_model, kept, choices = setup(name, args.seed)
    timer = LayerTimer(model, example, threads=args.threads, seconds=args.seconds)
    pick = latency_aware_kept(kept, choices, macs_model, macs_model.total / 2, timer)
    generator = random.Random(args.seed)
    mixes = {"dense": None, "uniform": dict(kept), "latency-aware pick": pick.kept}
    for _ in range(100 * args.mixes):  # distinct mixes, as many as asked for if there are
        if len(mixes) > args.mixes:
            break
        mix = {key: generator.choice(values) for key, values in choices.items()}
        if 1.9 <= macs_model.total / macs_model.predict(mix) <= 2.2 and mix not in mixes.values():
            mixes[f"mix {len(mixes) - 2}"] = mix
    timed = measure_latency({label: model if mix is None else with_counts(model, example, mix)
                             for label, mix in mixes.items()}, INPUT, batch_sizes=(64,), threads=args.threads,
                            target_seconds=8)
    measured = {result.model: result.median_ms for result in timed.results}
    pruned = [label for label in mixes if label != "dense"]
    reduction = {label: macs_model.total / macs_model.predict(mixes[label]) for label in pruned}
    ratio = {label: measured["dense"] / measured[label] / reduction[label] for label in pruned}
    predicted = {label: _Costs(macs_model, timer, mixes[label]).seconds * 64e3 for label in pruned}
    rho = spearman([measured[label] for label in pruned], [predicted[label] for label in pruned])
    best = max(pruned, key=ratio.get)
    outcome = (f"kept the uniform mix ({pick.reason})" if pick.reason else
               f"changed {pick.changed_groups} group(s), predicted {pick.uniform_seconds / pick.seconds:.3f}x as fast "
               "as the uniform mix")
    lines = ["", f"**{name}**: {timer.timed_shapes} distinct layer shapes timed; the search {outcome}. "
             f"{len(pruned)} mixes (the "
             "uniform one, the pick and random ones at 1.9-2.2x fewer MACs) and the dense model timed whole (batch 64, "
             f"interleaved medians, {allocator}, load average {timed.load_average}) against the sum of their layers' "
             f"times: Spearman rank correlation **{rho:.2f}**. Speed-up / MACs reduction: uniform "
             f"**{ratio['uniform']:.2f}**, the pick **{ratio['latency-aware pick']:.2f}**, the best of the mixes "
             f"**{ratio[best]:.2f}** ({best}), median {float(np.median(list(ratio.values()))):.2f}.\n",
             "| mix | MACs reduction | whole model, ms | speed-up | ratio | sum of layers, ms |", "|---|---|---|---|---|---|",
             f"| dense | 1.00x | {measured['dense']:.2f} | 1.00 | 1.00 | |"]
    for label in sorted(pruned, key=lambda n: measured[n]):
        lines.append(f"| {label} | {reduction[label]:.2f}x | {measured[label]:.2f} | "
                     f"{measured['dense'] / measured[label]:.2f} | {ratio[label]:.2f} | {predicted[label]:.2f} |")
    return lines


if __name__ == "__main__":
    main()
