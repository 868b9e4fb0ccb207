"""Tables, plots and headline sentences for run reports (Markdown, CSV, PNG), written atomically.

Rows are plain dicts, one per (criterion, target) run, as ``camphive compare`` writes them:
``criterion``, ``target`` (sparsity or MACs ratio), ``pruned`` and ``finetuned`` (top-1 test
accuracy as a fraction, ``finetuned`` ``None`` without fine-tuning), and further scalars.
"""
from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from pathlib import Path

from camphive.runs import atomic_write_bytes, atomic_write_text

METHOD = "camp-hive"
STAGES = (("pruned", "right after pruning"), ("finetuned", "after fine-tuning"))


# Criteria whose authors write their names in capitals; every other criterion is shown as named.
_PROPER_NAMES = {"camp-hive": "CAMP-HiVe", "camphive": "CAMP-HiVe", "wanda": "Wanda", "sparsegpt": "SparseGPT",
                 "obc": "OBC"}


def display_name(criterion: str) -> str:
    """How a criterion is written for people: the methods' own capitalization, the other baselines as named."""
    return _PROPER_NAMES.get(criterion.replace("_", "-").lower(), criterion)


def markdown_table(rows: Sequence[dict], columns: Sequence[tuple[str, str]]) -> str:
    """A Markdown table of ``rows`` with ``columns`` = [(key, header)]; floats get 4 digits."""
    lines = ["| " + " | ".join(header for _, header in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(key)) for key, _ in columns) + " |")
    return "\n".join(lines) + "\n"


def _cell(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, int) and abs(value) >= 10000:
        return f"{value:,}"
    return str(value)


def scalar_columns(rows: Sequence[dict]) -> list[str]:
    """Keys whose values are scalars (numbers, strings, None) in every row, in first-seen order."""
    keys = list(dict.fromkeys(key for row in rows for key in row))
    return [key for key in keys
            if all(isinstance(row.get(key), (int, float, str, bool)) or row.get(key) is None for row in rows)]


def write_csv(rows: Sequence[dict], path: str | Path, columns: Sequence[str] | None = None) -> Path:
    """Write the scalar columns of ``rows`` as CSV (nested values stay in the JSON)."""
    columns = list(columns or scalar_columns(rows))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: ("" if row.get(key) is None else row.get(key)) for key in columns})
    return atomic_write_text(path, buffer.getvalue())


# --------------------------------------------------------------------------- headline


def best_by_target(rows: Sequence[dict], stage: str) -> dict:
    """``{target: criterion with the highest accuracy at that stage}`` (ties: the first listed)."""
    best: dict = {}
    for row in rows:
        value = row.get(stage)
        if value is not None and (row["target"] not in best or value > best[row["target"]][1]):
            best[row["target"]] = (row["criterion"], value)
    return {target: name for target, (name, _) in best.items()}


def headline(rows: Sequence[dict], *, target_name: str = "sparsity", dense: float | None = None,
             dense_note: str = "", method: str = METHOD, target_text=None) -> str:
    """One or two sentences with the main result, computed from ``rows``, in absolute accuracies.

    At the hardest target (largest sparsity or MACs ratio): the method's top-1 test accuracy
    against the best other criterion's, after fine-tuning when there was any (and right after
    pruning too), next to the dense model's ``dense`` (the reference; ``dense_note`` follows it,
    e.g. how it was evaluated); then at how many targets the method is best. Percent, never a
    ratio of accuracies.
    """
    rows = [row for row in rows if row.get("pruned") is not None]
    if not rows:
        return "No pruned model was evaluated."
    stage = "finetuned" if any(row.get("finetuned") is not None for row in rows) else "pruned"
    stage_text = dict(STAGES)[stage]
    hardest = max(row["target"] for row in rows)
    at_hardest = [row for row in rows if row["target"] == hardest and row.get(stage) is not None]
    ours = [row for row in at_hardest if row["criterion"] == method]
    others = [row for row in at_hardest if row["criterion"] != method]
    where = f"At {target_name} {(target_text or _number)(hardest)}, {stage_text}"
    dense_text = f"; dense model {dense:.1%}{' ' + dense_note if dense_note else ''}" if dense is not None else ""
    if not ours:
        best = max(at_hardest, key=lambda row: row[stage])
        return (f"{where}, the most accurate criterion is {display_name(best['criterion'])} with {best[stage]:.1%} "
                f"top-1{dense_text}; {display_name(method)} was not run.")
    mine = ours[0]
    if not others:
        return f"{where}: {display_name(method)} {mine[stage]:.1%} top-1{dense_text}."
    rival = max(others, key=lambda row: row[stage])
    text = (f"{where}: {display_name(method)} {mine[stage]:.1%} top-1 vs {rival[stage]:.1%} for the best baseline "
            f"({display_name(rival['criterion'])}), {100 * (mine[stage] - rival[stage]):+.1f} points{dense_text}.")
    if stage == "finetuned":
        before = {row["criterion"]: row["pruned"] for row in rows if row["target"] == hardest}
        rival_before = max((value for name, value in before.items() if name != method), default=None)
        if rival_before is not None and before.get(method) is not None:
            text += (f" Right after pruning: {before[method]:.1%} vs {rival_before:.1%} for the best baseline, "
                     f"{100 * (before[method] - rival_before):+.1f} points.")
    targets = sorted({row["target"] for row in rows})
    wins = _wins(rows, stage, method, targets)
    text += f" {display_name(method)} is best or tied {stage_text} at {wins} of {len(targets)} {target_name} values."
    return text


def _wins(rows: Sequence[dict], stage: str, method: str, targets) -> int:
    wins = 0
    for target in targets:
        values = {row["criterion"]: row[stage] for row in rows if row["target"] == target and row.get(stage) is not None}
        if method in values and values[method] >= max(values.values()):
            wins += 1
    return wins


def _number(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


# --------------------------------------------------------------------------- plots


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure, path: str | Path) -> Path:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    _figure().close(figure)
    return atomic_write_bytes(path, buffer.getvalue())


def accuracy_plot(rows: Sequence[dict], path: str | Path, *, x: str = "sparsity", x_label: str = "sparsity",
                  series: str = "criterion", stages: Sequence[tuple[str, str]] = STAGES,
                  dense: float | None = None, title: str = "") -> Path:
    """Accuracy against ``x`` for each ``series`` value; one line style per stage."""
    plt = _figure()
    figure, axis = plt.subplots(figsize=(7, 4.5))
    names = list(dict.fromkeys(row[series] for row in rows))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ["--", "-", ":"]
    for index, name in enumerate(names):
        points = sorted((row for row in rows if row[series] == name), key=lambda row: row[x])
        for (key, label), style in zip(stages, styles):
            values = [(row[x], row[key]) for row in points if row.get(key) is not None]
            if values:
                axis.plot(*zip(*values), style, marker="o", color=colors[index % len(colors)], label=f"{name}, {label}")
    if dense is not None:
        axis.axhline(dense, color="gray", linewidth=1, label="dense")
    axis.set_xlabel(x_label)
    axis.set_ylabel("test accuracy")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    return save_figure(figure, path)


def _styles(names: Sequence[str], method: str) -> dict[str, dict]:
    """One color per criterion, the method drawn thick and on top so it is found at a glance."""
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]
    styles, index = {}, 0
    for name in names:
        if name == method:
            styles[name] = {"color": "#d62728", "linewidth": 2.8, "zorder": 5, "markersize": 7}
        else:
            styles[name] = {"color": palette[index % len(palette)], "linewidth": 1.4, "zorder": 3, "markersize": 5}
            index += 1
    return styles


def accuracy_panels(rows: Sequence[dict], path: str | Path, *, x_label: str = "sparsity",
                    dense: float | None = None, title: str = "", method: str = METHOD,
                    off_scale: str | None = "random", dense_label: str = "dense") -> Path:
    """Accuracy (%) against ``row["target"]``, one line per criterion: a panel right after
    pruning and, when any row was fine-tuned, a panel after fine-tuning; ``dense``, the
    reference, dashed (legend ``dense_label``).

    Each panel's y axis spans the criteria other than ``off_scale`` (the random baseline, a
    sanity floor far below the rest once fine-tuned), so the differences that matter stay
    visible; its points below the axis are listed in the panel instead.
    """
    plt = _figure()
    stages = [(key, label) for key, label in STAGES if any(row.get(key) is not None for row in rows)]
    figure, axes = plt.subplots(1, len(stages), figsize=(5.2 * len(stages), 4.2), squeeze=False)
    names = list(dict.fromkeys(row["criterion"] for row in rows))
    styles = _styles(names, method)
    targets = sorted({row["target"] for row in rows})
    for axis, (key, label) in zip(axes[0], stages):
        curves = {name: sorted((row["target"], 100 * row[key]) for row in rows
                               if row["criterion"] == name and row.get(key) is not None) for name in names}
        for name, points in curves.items():
            if points:
                axis.plot(*zip(*points), marker="o", label=display_name(name), **styles[name])
        if dense is not None:
            axis.axhline(100 * dense, color="black", linestyle="--", linewidth=1, label=dense_label)
        _fit_y(axis, curves, off_scale, dense, styles)
        axis.set_title(label)
        axis.set_xlabel(x_label)
        axis.set_xticks(targets)
        axis.set_xticklabels([_number(target) for target in targets])
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel("top-1 test accuracy (%)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    return save_figure(figure, path)


def _fit_y(axis, curves: Mapping[str, list], off_scale: str | None, dense: float | None, styles: dict) -> None:
    """Y limits from every curve but ``off_scale``'s; list that curve's points below the axis."""
    shown = [value for name, points in curves.items() if name != off_scale for _, value in points]
    if not shown or off_scale not in curves:
        return
    top = max(shown + ([100 * dense] if dense is not None else []))
    pad = max(0.08 * (top - min(shown)), 0.5)
    bottom = min(shown) - pad
    hidden = [value for _, value in curves[off_scale] if value < bottom]
    if not hidden:
        return
    axis.set_ylim(bottom, top + pad)
    axis.text(0.02, 0.03, f"{display_name(off_scale)} below the axis: " + ", ".join(f"{value:.1f}" for value in hidden),
              transform=axis.transAxes, fontsize=7, color=styles[off_scale]["color"])


def layer_sparsity_plot(by_criterion: Mapping[str, Mapping[str, float]], path: str | Path, *, title: str = "",
                        method: str = METHOD) -> Path:
    """Grouped horizontal bars: the fraction removed in each layer (rows, in model order) for
    each criterion's run in ``by_criterion`` = ``{criterion: {layer: sparsity}}``."""
    plt = _figure()
    import numpy as np

    labels = list(by_criterion)
    layers = list(dict.fromkeys(layer for values in by_criterion.values() for layer in values))
    height = min(max(2.5, 0.22 * len(layers) * max(1, len(labels) / 2) + 1.2), 24)
    figure, axis = plt.subplots(figsize=(8, height))
    positions = np.arange(len(layers))
    width = 0.8 / max(len(labels), 1)
    styles = _styles(labels, method)
    for index, label in enumerate(labels):
        values = [by_criterion[label].get(layer, np.nan) for layer in layers]
        axis.barh(positions + (index - (len(labels) - 1) / 2) * width, values, height=width,
                  color=styles[label]["color"], label=display_name(label))
    axis.set_yticks(positions)
    axis.set_yticklabels(layers, fontsize=7 if len(layers) > 30 else 8)
    axis.invert_yaxis()  # the first layer on top, as in the model
    axis.set_xlim(0, 1)
    axis.set_xlabel("fraction removed")
    axis.grid(axis="x", alpha=0.3)
    # Above the bars, so it never hides the first or last layers.
    axis.legend(fontsize=8, loc="lower left", bbox_to_anchor=(0.0, 1.0), ncol=len(labels), frameon=False)
    axis.set_title(title, pad=22)
    figure.tight_layout()
    return save_figure(figure, path)
