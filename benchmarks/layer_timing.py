"""Does the layer timing table predict the speed of whole pruned models, and is it repeatable?

The latency-aware rounding of structured pruning (``latency_aware=True``) times every layer of
a model at the channel counts it could keep (``camphive.measure.layer_timing.LayerTimer``) and
picks the mix whose summed layer times are lowest. Two checks, on resnet20 (1x28x28, random
weights) at 2x fewer MACs, counts rounded to multiples of 16 with the choices the default uses:

* repeatability: the same table timed four times, in this process with its default allocator
  and in the child process the library uses (whose allocator keeps freed memory): the spread of
  each layer shape's four medians;
* prediction: ``--mixes`` mixes of the choices (the uniform one and random ones within 1.9-2.2x
  fewer MACs) built with random weights and timed whole (interleaved medians, batch 64), against
  the sum of their layers' times: Spearman's rank correlation.

    PYTHONPATH=src python benchmarks/layer_timing.py --threads 1
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
from camphive.pruning.structured.latency_allocation import _Costs, _possible_shapes  # noqa: E402

INPUT = (1, 28, 28)


def setup(seed: int):
    torch.manual_seed(seed)
    model = models.create("resnet20", num_classes=10, in_channels=1).eval()
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
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--mixes", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=1.0, help="LayerTimer's budget per table")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    started = time.time()
    torch.set_num_threads(args.threads)
    model, example, macs_model, kept, choices = setup(args.seed)
    shapes = _possible_shapes(macs_model, kept, choices)
    here = spread(model, example, shapes, False, args.threads, args.seconds)  # before pinning this process
    allocator = keep_freed_memory()  # whole models are timed as benchmarks/structured.py times them
    child = spread(model, example, shapes, True, args.threads, args.seconds)

    timer = LayerTimer(model, example, threads=args.threads, seconds=args.seconds)
    timer.measure(shapes)
    generator = random.Random(args.seed)
    mixes = {"uniform": dict(kept)}
    for _ in range(100 * args.mixes):  # distinct mixes, as many as asked for if there are
        mix = {key: generator.choice(values) for key, values in choices.items()}
        if 1.9 <= macs_model.total / macs_model.predict(mix) <= 2.2 and mix not in mixes.values():
            mixes[f"mix {len(mixes)}"] = mix
        if len(mixes) >= args.mixes:
            break
    timed = measure_latency({name: with_counts(model, example, mix) for name, mix in mixes.items()}, INPUT,
                            batch_sizes=(64,), threads=args.threads, target_seconds=8)
    measured = {result.model: result.median_ms for result in timed.results}
    predicted = {name: _Costs(macs_model, timer, mix).seconds * 64e3 for name, mix in mixes.items()}
    names = list(mixes)
    rho = spearman([measured[n] for n in names], [predicted[n] for n in names])

    lines = [f"resnet20 (1x28x28, random weights), 2x fewer MACs, multiples of 16 (8 in 16-channel groups): "
             f"{len(set(shapes))} (layer, channel counts) choices, {timer.timed_shapes} distinct shapes to time; "
             f"{args.threads} thread(s).\n",
             "Repeatability: four tables of the same shapes; relative spread (std / mean) of each shape's four "
             "medians:\n", "| timed | median spread | largest spread |", "|---|---|---|",
             f"| in this process (default glibc allocator) | {here[0]:.3f} | {here[1]:.3f} |",
             f"| in a child process that keeps freed memory (the library's way) | {child[0]:.3f} | {child[1]:.3f} |",
             "", f"Prediction: {len(names)} mixes (the uniform one and random ones at 1.9-2.2x fewer MACs), timed whole "
             f"(batch 64, interleaved medians, {allocator}, load average {timed.load_average}) against the sum of "
             "their layers' "
             f"times from the child's table: Spearman rank correlation **{rho:.2f}**.\n",
             "| mix | MACs reduction | whole model, ms | sum of layers, ms |", "|---|---|---|---|"]
    for name in sorted(names, key=lambda n: measured[n]):
        lines.append(f"| {name} | {macs_model.total / macs_model.predict(mixes[name]):.2f}x | {measured[name]:.2f} | "
                     f"{predicted[name]:.2f} |")
    lines.append(f"\nWall time {time.time() - started:.0f} s.")
    publish("Layer timing table: repeatability and prediction of whole-model latency", "\n".join(lines))


if __name__ == "__main__":
    main()
