"""Tables and plots for run reports (Markdown, PNG), written atomically."""
from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

from camphive.runs import atomic_write_bytes


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
                  series: str = "criterion", stages: Sequence[tuple[str, str]] = (("pruned", "right after pruning"),
                                                                                 ("finetuned", "after fine-tuning")),
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
