"""The reports of ``camphive compare``: CSV, Markdown and one self-contained HTML page.

The page leads with a headline computed from the rows, then accuracy against the target
for every criterion, the table of accuracy, parameters, MACs and latency, per-layer
sparsity (CAMP-HiVe against magnitude at the hardest target), the dense model's Hessian
eigenvalue convergence, and the exact configuration and machine.
"""
from __future__ import annotations

import json

import yaml

from camphive import report_html as page
from camphive.measure.latency import LATENCY_COLUMNS
from camphive.report import (
    METHOD,
    accuracy_panels,
    best_by_target,
    display_name,
    headline,
    layer_sparsity_plot,
    markdown_table,
    write_csv,
)
from camphive.runs import RunFolder, atomic_write_text

RECALIBRATED = "BatchNorm re-estimated on the calibration images"

CSV_COLUMNS = ["criterion", "target", "sparsity", "parameters", "macs", "macs_ratio", "pruned", "pruned_top5",
               "pruned_loss", "finetuned", "finetuned_top5", "finetuned_loss", *LATENCY_COLUMNS, "sharpness_after",
               "num_hvps", "curvature_seconds", "prune_seconds", "finetune_seconds"]


def _percent(value) -> str:
    return f"{100 * value:.2f}"


def _count(value) -> str:
    return f"{value / 1e6:.3f} M" if value >= 1e5 else f"{value:,}"


def _target_text(kind: str):
    return (lambda value: f"{value:g}x") if kind == "macs_ratio" else (lambda value: f"{value:g}")


def write_reports(run: RunFolder, results: dict) -> tuple[str, list[str]]:
    """Write ``results.csv``, ``report.md``, ``report.html`` and their PNGs; return (headline, file names)."""
    settings, rows, dense = results["settings"], results["rows"], results["dense"]
    kind = settings["target_kind"]
    target_name = "MACs reduction" if kind == "macs_ratio" else "sparsity"
    x_label = ("MACs reduction (dense MACs / pruned MACs)" if kind == "macs_ratio"
               else "sparsity (fraction of weights removed)")
    if settings["mode"] == "structured" and kind == "sparsity":
        x_label = "sparsity (fraction of channels removed)"
    text = headline(rows, target_name=target_name, dense=dense["reference_accuracy"], dense_note=_reference_note(dense),
                    target_text=_target_text(kind))
    files = ["results.json", "results.csv", "report.md", "report.html"]
    write_csv(rows, run.file("results.csv"), CSV_COLUMNS)
    title = f"{settings['model']} on {settings['dataset']}: {settings['mode']} pruning"
    accuracy_panels(rows, run.file("accuracy.png"), x_label=x_label, dense=dense["reference_accuracy"], title=title,
                    dense_label="dense, BN re-estimated" if dense["reference"] == "recalibrated" else "dense")
    files.append("accuracy.png")
    layers = _layer_series(rows)
    at_hardest = [row["layer_sparsity"] for row in rows if layers and row["target"] == layers[0] and row.get("layer_sparsity")]
    if layers and _all_equal(at_hardest):
        layers = None  # uniform structured pruning: every criterion removes the same share per layer
    if layers:
        layer_sparsity_plot(layers[1], run.file("layer_sparsity.png"),
                            title=f"fraction removed per layer at {target_name} {_target_text(kind)(layers[0])}")
        files.append("layer_sparsity.png")
    has_spectrum = results.get("spectrum") is not None and run.file("convergence.png").is_file()
    display = _display_rows(rows, dense, kind, results.get("spectrum"))
    columns = _columns(rows, settings["mode"], top5=results["data"]["num_classes"] > 10)
    atomic_write_text(run.file("report.md"), _markdown(title, text, results, display, columns, layers, has_spectrum))
    atomic_write_text(run.file("report.html"), _html(title, text, results, display, columns, layers, has_spectrum, run))
    if has_spectrum:
        files.append("convergence.png")
    return text, files


def _reference_note(dense: dict) -> str:
    """How the dense reference was evaluated, with the other evaluation's accuracy, for the headline."""
    other = dense.get("recalibrated")
    if other is None:
        return ""
    if dense["reference"] == "recalibrated":
        return f"with {RECALIBRATED}, as pruning does ({dense['accuracy']:.1%} as trained)"
    return f"as trained ({other['accuracy']:.1%} with {RECALIBRATED}; pruning kept the statistics)"


def _yaml(value) -> str:
    return yaml.safe_dump(json.loads(json.dumps(value, default=str)), sort_keys=False)


def _hardest(rows) -> float:
    return max(row["target"] for row in rows)


def _layer_series(rows) -> tuple[float, dict] | None:
    """At the hardest target: CAMP-HiVe's per-layer sparsity and magnitude's (or the first other criterion's)."""
    if not rows:
        return None
    hardest = _hardest(rows)
    at = {row["criterion"]: row["layer_sparsity"] for row in rows if row["target"] == hardest and row.get("layer_sparsity")}
    names = [name for name in (METHOD, "magnitude", "tp-magnitude") if name in at]
    names += [name for name in at if name not in names]
    chosen = names[:2]
    return (hardest, {name: at[name] for name in chosen}) if chosen else None


def _all_equal(series) -> bool:
    series = list(series)
    return len(series) > 1 and all(
        other.keys() == series[0].keys() and all(abs(other[key] - series[0][key]) < 1e-9 for key in other)
        for other in series[1:])


SAME_LAYERS = ("Every criterion removed the same fraction of each layer (structured pruning with the same share per "
               "channel group); the criteria differ only in which channels they removed. Per layer: results.json.")


def _display_rows(rows, dense, kind, spectrum) -> list[dict]:
    """Rows as shown: the dense model first (as trained, and with BatchNorm re-estimated as pruning
    does, when it has BatchNorm), then each target's criteria, accuracies in percent."""
    # The dense model's accuracy sits in both accuracy columns, as the reference to read each column against.
    common = {"target": "–", "sparsity": 0.0, "parameters": dense["parameters"], "macs": dense["macs"],
              "file_bytes": dense.get("file_bytes"),
              "macs_ratio": 1.0, "sharpness_after": ((spectrum or {}).get("global", {}).get("eigenvalues") or [None])[0]}
    evaluations = [("dense, as trained" if dense.get("recalibrated") else "dense", dense)]
    if dense.get("recalibrated"):
        evaluations.append(("dense, BN re-estimated", dense["recalibrated"]))
    shown = [{**common, "criterion": name, "pruned": metrics["accuracy"], "finetuned": metrics["accuracy"],
              "pruned_top5": metrics.get("top5"), "finetuned_top5": metrics.get("top5")} for name, metrics in evaluations]
    for row in sorted(rows, key=lambda row: row["target"]):
        shown.append({**row, "target": _target_text(kind)(row["target"]),
                      "before_text": _milliseconds(row.get("latency_before_ms"), row.get("latency_before_iqr_ms")),
                      "after_text": _milliseconds(row.get("latency_after_ms"), row.get("latency_after_iqr_ms"))})
    return shown


def _milliseconds(median, iqr) -> str | None:
    """Median and interquartile range: on a busy machine, differences inside the IQR are noise."""
    if median is None:
        return None
    return f"{median:.2f} [{iqr:.2f}]" if iqr is not None else f"{median:.2f}"


def _columns(rows, mode: str, top5: bool) -> list[tuple[str, str, object]]:
    structured = mode == "structured"
    columns = [("criterion", "criterion", display_name), ("target", "target", None),
               ("sparsity", "achieved sparsity", lambda value: f"{value:.3f}"),
               ("parameters", "parameters" if structured else "non-zero parameters", _count),
               ("macs", "MACs / sample" if structured else "non-zero MACs / sample", _count),
               ("macs_ratio", "MACs reduction", lambda value: f"{value:.2f}x"),
               ("pruned", "top-1 % after pruning", _percent)]
    if any(row.get("finetuned") is not None for row in rows):
        columns.append(("finetuned", "top-1 % after fine-tuning", _percent))
    if top5:  # top-5 says little with 10 classes or fewer
        key = "finetuned_top5" if any(row.get("finetuned_top5") is not None for row in rows) else "pruned_top5"
        columns.append((key, "top-5 %", _percent))
    if any(row.get("latency_after_ms") is not None for row in rows):
        batch = next(row["latency_batch"] for row in rows if row.get("latency_after_ms") is not None)
        columns += [("before_text", f"dense ms (batch {batch}) [IQR]", None),
                    ("after_text", f"pruned ms (batch {batch}) [IQR]", None),
                    ("speedup", "speedup", lambda value: f"{value:.2f}x")]
    if any(row.get("sharpness_after") is not None for row in rows):
        columns.append(("sharpness_after", "top Hessian eigenvalue", lambda value: f"{value:.4g}"))
    if any(row.get("file_bytes") is not None for row in rows):
        columns.append(("file_bytes", "checkpoint MB" if structured else "file MB",
                        lambda value: f"{value / 1e6:.3f}"))
    columns += [("num_hvps", "HVPs", None), ("prune_seconds", "prune s", lambda value: f"{value:.1f}")]
    return columns


def _facts(results) -> list[tuple[str, str]]:
    settings, dense = results["settings"], results["dense"]
    budget = (f"{settings['finetune_epochs']} epoch(s) at lr {settings['finetune_lr']:g}"
              if settings["finetune_epochs"] else "none")
    samples = settings.get("finetune_subset") or settings.get("train_subset")
    if settings["finetune_epochs"] and samples:
        budget += f", {samples} samples"
    trained = dense.get("train", {})
    source = (f"checkpoint {settings['checkpoint']}" if settings.get("checkpoint")
              else f"trained {trained.get('epochs', settings['dense_epochs'])} epoch(s) here")
    data = results["data"]
    shape = "x".join(str(size) for size in data["input_shape"])
    return [("data", f"{shape}, {data['num_classes']} classes, {data['train_samples']:,} train / "
                     f"{data['test_samples']:,} test"),
            *_dense_facts(dense), ("dense parameters", _count(dense["parameters"])),
            ("dense MACs / sample", _count(dense["macs"])), ("dense model", source),
            ("calibration", f"{settings['calib_samples']} training images"), ("fine-tuning", budget),
            ("seed", str(settings["seed"])), ("device", results["device"]),
            ("wall time", f"{results['seconds']:.0f} s" + (" (resumed run)" if settings.get("resume") else ""))]


def _dense_facts(dense: dict) -> list[tuple[str, str]]:
    recalibrated = dense.get("recalibrated")
    if recalibrated is None:
        return [("dense top-1", f"{100 * dense['accuracy']:.2f} %")]
    mark = {"recalibrated": ("", " (reference)"), "as trained": (" (reference)", "")}[dense["reference"]]
    return [("dense top-1 as trained", f"{100 * dense['accuracy']:.2f} %{mark[0]}"),
            ("dense top-1, BN re-estimated", f"{100 * recalibrated['accuracy']:.2f} %{mark[1]}")]


def _spectrum_text(spectrum: dict) -> str:
    values = spectrum["global"].get("eigenvalues", [])
    listed = ", ".join(f"λ{index + 1} = {value:.4g}" for index, value in enumerate(values))
    return (f"Top loss-Hessian eigenvalues of the dense model on the calibration batches ({spectrum['num_samples']} "
            f"samples): {listed}; {spectrum['num_matvecs']} Hessian-vector products, {spectrum['wall_time_s']:.1f} s.")


def _fairness(settings, dense: dict) -> str:
    text = ("Every criterion starts from the same dense weights, reads the same calibration batches, and is "
            f"fine-tuned with the same budget, data order and seed ({settings['seed']}); one seed, so differences of "
            "a few tenths of a point may be noise.")
    if dense.get("recalibrated") is not None and dense["reference"] == "recalibrated":
        text += (" Pruning re-estimates BatchNorm statistics on the calibration images; the dense reference is the "
                 "dense model after the same re-estimation (the dense model as trained is listed too).")
    return text


def _table_note(mode: str, rows) -> str:
    note = "Bold: the best criterion at that target. "
    if mode == "unstructured":
        sizes = (" File MB: the final model as a compressed file (bitmask + non-zero float32 values, as `camphive export "
                 "--format sparse` writes it); the dense rows: the float32 checkpoint."
                 if any(row.get("file_bytes") is not None for row in rows) else "")
        return note + ("Unstructured pruning keeps the tensor shapes: MACs count non-zero weights only, and dense "
                       "kernels run no faster, so latency is not timed." + sizes)
    if any(row.get("latency_after_ms") is not None for row in rows):
        return note + ("Structured pruning removes channels. Latency: dense and every pruned model of a target timed "
                       "interleaved on the CPU, median over repeats [interquartile range]; differences inside the "
                       "range are machine noise.")
    return note + "Structured pruning removes channels; latency was not timed (--no-latency)."


def _markdown(title, text, results, display, columns, layers, has_spectrum) -> str:
    table_rows = [{key: ("–" if row.get(key) is None else (fmt(row[key]) if fmt else row[key]))
                   for key, _, fmt in columns} for row in display]
    parts = [f"# {title}\n", f"**{text}**\n", _fairness(results["settings"], results["dense"]) + "\n",
             "\n".join(f"- {label}: {value}" for label, value in _facts(results)) + "\n",
             markdown_table(table_rows, [(key, header) for key, header, _ in columns]),
             _table_note(results["settings"]["mode"], results["rows"]) + "\n",
             "![accuracy](accuracy.png)\n"]
    if layers:
        parts.append("![per-layer sparsity](layer_sparsity.png)\n")
    elif results["rows"]:
        parts.append(SAME_LAYERS + "\n")
    if has_spectrum:
        parts += [_spectrum_text(results["spectrum"]) + "\n", "![eigenvalue convergence](convergence.png)\n"]
    parts.append("Full results: results.json, results.csv; configuration: config.yaml; report: report.html.\n")
    return "\n".join(parts)


def _html(title, text, results, display, columns, layers, has_spectrum, run: RunFolder) -> str:
    settings = results["settings"]
    best = {stage: best_by_target(results["rows"], stage) for stage in ("pruned", "finetuned")}
    by_label = {_target_text(settings["target_kind"])(target): target for target in {r["target"] for r in results["rows"]}}

    def cell_class(row, key) -> str:
        target = by_label.get(row.get("target"))
        return "best" if key in best and target is not None and best[key].get(target) == row["criterion"] else ""

    blocks = [page.headline(text), page.facts(_facts(results)), page.paragraph(_fairness(settings, results["dense"]), "note"),
              page.heading("Accuracy"),
              page.figure(run.file("accuracy.png"), "Top-1 test accuracy against the target, right after pruning "
                          "and after fine-tuning; CAMP-HiVe in thick red, the dense reference dashed."),
              page.heading("Results"),
              page.table(display, columns, row_class=lambda row: "method" if row["criterion"] == METHOD else "",
                         cell_class=cell_class),
              page.paragraph(_table_note(settings["mode"], results["rows"]), "note")]
    if not layers and results["rows"]:
        blocks += [page.heading("Per-layer sparsity"), page.paragraph(SAME_LAYERS)]
    if layers:
        names = " vs ".join(display_name(name) for name in layers[1])
        blocks += [page.heading("Per-layer sparsity"),
                   page.figure(run.file("layer_sparsity.png"), f"Fraction removed in each layer: {names}, at the "
                               f"hardest target.")]
    if has_spectrum:
        blocks += [page.heading("Curvature of the dense model"), page.paragraph(_spectrum_text(results["spectrum"])),
                   page.figure(run.file("convergence.png"), "Eigenvalue estimates against the Hessian-vector "
                               "products used (left) and their distance to the final value (right).")]
    blocks += [page.heading("Configuration and machine"),
               page.details("configuration (config.yaml, as run)",
                            page.preformatted(_yaml(settings))),
               page.details("machine", page.preformatted(_yaml(results["machine"])),
                            open_=True)]
    return page.page(title, blocks, subtitle=f"camphive compare, {len(results['rows'])} pruned models")
