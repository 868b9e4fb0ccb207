"""Report pieces: the headline sentence computed from rows, CSV, plots and the HTML page."""
import base64
import csv

import pytest

from camphive import report_html
from camphive.report import (
    accuracy_panels,
    best_by_target,
    display_name,
    headline,
    layer_sparsity_plot,
    markdown_table,
    scalar_columns,
    write_csv,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _rows(finetuned=True):
    values = {  # (criterion, target): (after pruning, after fine-tuning)
        ("camp-hive", 0.5): (0.90, 0.91), ("magnitude", 0.5): (0.90, 0.92), ("taylor", 0.5): (0.85, 0.90),
        ("camp-hive", 0.9): (0.70, 0.86), ("magnitude", 0.9): (0.40, 0.80), ("taylor", 0.9): (0.55, 0.83),
    }
    return [{"criterion": name, "target": target, "pruned": pruned, "finetuned": tuned if finetuned else None,
             "layer_sparsity": {"conv1": target / 2, "fc": target}}
            for (name, target), (pruned, tuned) in values.items()]


def test_headline_compares_the_method_with_the_best_baseline_at_the_hardest_target():
    text = headline(_rows(), dense=0.93)
    assert text.startswith("At sparsity 0.9, after fine-tuning: CAMP-HiVe 86.0% top-1 vs 83.0% for the best baseline "
                           "(taylor), +3.0 points; dense model 93.0%.")
    assert "Right after pruning: 70.0% vs 55.0% for the best baseline, +15.0 points." in text
    # At 0.5 magnitude wins after fine-tuning (0.92 > 0.91), so the method wins 1 of 2.
    assert text.endswith("CAMP-HiVe is best or tied after fine-tuning at 1 of 2 sparsity values.")


def test_headline_without_fine_tuning_uses_accuracy_after_pruning():
    text = headline(_rows(finetuned=False), target_name="MACs reduction", target_text=lambda value: f"{value:g}x")
    assert text.startswith("At MACs reduction 0.9x, right after pruning: CAMP-HiVe 70.0% top-1 vs 55.0%")
    assert "2 of 2 MACs reduction values" in text  # ties count (0.90 = 0.90 at 0.5)


def test_headline_reports_a_loss_honestly_and_copes_without_the_method():
    rows = [row for row in _rows() if row["target"] == 0.5]
    assert "-1.0 points" in headline(rows)
    others = [row for row in _rows() if row["criterion"] != "camp-hive"]
    assert headline(others).startswith("At sparsity 0.9, after fine-tuning, the most accurate criterion is taylor with "
                                       "83.0% top-1")
    assert headline([]) == "No pruned model was evaluated."


def test_headline_gives_absolute_accuracies_beside_the_dense_reference():
    # Accuracies are stated as they are, never as a share of dense that could exceed 100 %.
    rows = [{"criterion": "camp-hive", "target": 0.9, "pruned": 0.961, "finetuned": None},
            {"criterion": "magnitude", "target": 0.9, "pruned": 0.496, "finetuned": None}]
    text = headline(rows, dense=1.0, dense_note="with BatchNorm re-estimated (10.2% as trained)")
    assert text == ("At sparsity 0.9, right after pruning: CAMP-HiVe 96.1% top-1 vs 49.6% for the best baseline "
                    "(magnitude), +46.5 points; dense model 100.0% with BatchNorm re-estimated (10.2% as trained). "
                    "CAMP-HiVe is best or tied right after pruning at 1 of 1 sparsity values.")
    assert "keeps" not in text


def test_best_by_target():
    assert best_by_target(_rows(), "finetuned") == {0.5: "magnitude", 0.9: "camp-hive"}
    assert best_by_target(_rows(), "pruned") == {0.5: "camp-hive", 0.9: "camp-hive"}  # first of a tie


def test_csv_holds_the_scalar_columns(tmp_path):
    rows = _rows()
    assert scalar_columns(rows) == ["criterion", "target", "pruned", "finetuned"]
    path = write_csv(rows, tmp_path / "r.csv")
    read = list(csv.DictReader(path.open()))
    assert len(read) == 6 and read[3] == {"criterion": "camp-hive", "target": "0.9", "pruned": "0.7", "finetuned": "0.86"}


def test_markdown_table():
    table = markdown_table([{"a": 0.5, "b": None, "c": 123456}], [("a", "A"), ("b", "B"), ("c", "C")])
    assert table == "| A | B | C |\n|---|---|---|\n| 0.5000 | – | 123,456 |\n"


def test_plots_are_png_files(tmp_path):
    accuracy = accuracy_panels(_rows(), tmp_path / "a.png", dense=0.93, title="t")
    layers = layer_sparsity_plot({"camp-hive": {"conv1": 0.1, "fc": 0.9}, "magnitude": {"conv1": 0.5, "fc": 0.8}},
                                 tmp_path / "l.png", title="t")
    for path in (accuracy, layers):
        assert path.read_bytes().startswith(PNG_MAGIC)


def test_display_name():
    assert display_name("camp-hive") == display_name("camphive") == "CAMP-HiVe"
    assert display_name("taylor") == "taylor"
    assert (display_name("wanda"), display_name("sparsegpt"), display_name("obc")) == ("Wanda", "SparseGPT", "OBC")


def test_html_page_is_self_contained_and_escaped(tmp_path):
    png = tmp_path / "x.png"
    png.write_bytes(PNG_MAGIC + b"rest")
    html = report_html.page("A <b> title", [
        report_html.headline("x < y & z"),
        report_html.figure(png, "caption"),
        report_html.table([{"name": "<i>", "value": 0.5}],
                          [("name", "Name", None), ("value", "Value", lambda v: f"{v:.1f}")],
                          cell_class=lambda row, key: "best" if key == "value" else ""),
        report_html.details("more", report_html.preformatted("a: <1>")),
    ])
    assert "<title>A &lt;b&gt; title</title>" in html
    assert "x &lt; y &amp; z" in html and "<i>" not in html and "&lt;1&gt;" in html
    encoded = html.split('src="data:image/png;base64,')[1].split('"')[0]
    assert base64.b64decode(encoded) == PNG_MAGIC + b"rest"
    assert '<td class="best">0.5</td>' in html and '<td class="text">&lt;i&gt;</td>' in html
    for external in ("http://", "https://", "<link", "<script"):
        assert external not in html


@pytest.mark.parametrize("value", [b"abc", "path"])
def test_image_data_uri_accepts_bytes_and_paths(tmp_path, value):
    if value == "path":
        (tmp_path / "i.png").write_bytes(b"abc")
        value = tmp_path / "i.png"
    assert report_html.image_data_uri(value) == "data:image/png;base64,YWJj"
