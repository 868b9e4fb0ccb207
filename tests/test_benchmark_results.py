"""benchmarks/common.py's append_results: a new run replaces the section it supersedes in RESULTS.md
and moves that section, verbatim, to history/<its date>.md; other sections are left alone."""
import importlib.util
import sys
from pathlib import Path

import pytest

COMMON = Path(__file__).resolve().parents[1] / "benchmarks" / "common.py"


@pytest.fixture
def common(monkeypatch):
    spec = importlib.util.spec_from_file_location("benchmark_common_under_test", COMMON)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "machine", lambda: "test machine")
    monkeypatch.setattr(module, "_now", lambda: "2026-12-01 10:00")
    return module


def run(common, monkeypatch, tmp_path, title, body, argv):
    monkeypatch.setattr(sys, "argv", argv)
    common.append_results(title, body, path=tmp_path / "RESULTS.md", history=tmp_path / "history")


OLD = """# Benchmark results

Intro.

## Structured (channel) pruning

*2026-11-25 21:22, old machine*

Command: `python benchmarks/structured.py --sections latency --threads 1`

### Latency against MACs reduction, Fashion-MNIST models

| model | ms |
|---|---|
| dense | 1.10 |

## Structured (channel) pruning

*2026-11-26 04:45, old machine*

Command: `python structured.py --sections criteria --threads 1`

criteria table

## camphive demo

*2026-11-26 05:50, old machine*

Command: `python demo.py`

demo table 0.9091

## A reading written by hand (2026-11-26)

No command here.
"""


def test_same_title_and_command_replaces_and_moves_the_old_run(common, monkeypatch, tmp_path):
    (tmp_path / "RESULTS.md").write_text(OLD)
    run(common, monkeypatch, tmp_path, "Structured (channel) pruning", "new latency table",
        ["structured.py", "--sections", "latency", "--threads", "1"])
    text = (tmp_path / "RESULTS.md").read_text()
    assert "new latency table" in text and "| dense | 1.10 |" not in text
    assert text.count("## Structured (channel) pruning") == 2  # the criteria run (another setup) stays
    assert "criteria table" in text and "demo table" in text and "No command here." in text
    assert text.index("new latency table") < text.index("criteria table")  # replaced in place
    assert "*2026-12-01 10:00, test machine*" in text
    assert "Command: `python structured.py --sections latency --threads 1`" in text
    moved = (tmp_path / "history" / "2026-11-25.md").read_text()
    old_section = OLD[OLD.index("## Structured"):OLD.index("## Structured", OLD.index("## Structured") + 1)].strip()
    assert old_section in moved  # verbatim
    assert not (tmp_path / "history" / "2026-11-26.md").exists()


def test_only_section_with_the_title_is_replaced_whatever_the_command(common, monkeypatch, tmp_path):
    (tmp_path / "RESULTS.md").write_text(OLD)
    run(common, monkeypatch, tmp_path, "camphive demo", "demo table 0.9100", ["benchmarks/demo.py", "--fast"])
    text = (tmp_path / "RESULTS.md").read_text()
    assert text.count("## camphive demo") == 1 and "0.9100" in text and "0.9091" not in text
    assert "demo table 0.9091" in (tmp_path / "history" / "2026-11-26.md").read_text()


def test_another_setup_of_a_shared_title_and_a_new_title_become_new_sections(common, monkeypatch, tmp_path):
    (tmp_path / "RESULTS.md").write_text(OLD)
    run(common, monkeypatch, tmp_path, "Structured (channel) pruning", "speed table",
        ["structured.py", "--sections", "speed", "--threads", "1"])
    run(common, monkeypatch, tmp_path, "A new benchmark", "new table", ["new.py"])
    text = (tmp_path / "RESULTS.md").read_text()
    assert text.count("## Structured (channel) pruning") == 3
    assert text.index("criteria table") < text.index("speed table") < text.index("## camphive demo")
    assert text.rstrip().endswith("new table")
    assert "| dense | 1.10 |" in text and not (tmp_path / "history").exists()


def test_history_keeps_runs_in_time_order_and_a_fresh_file_gets_a_header(common, monkeypatch, tmp_path):
    run(common, monkeypatch, tmp_path, "camphive demo", "first", ["demo.py"])
    text = (tmp_path / "RESULTS.md").read_text()
    assert text.startswith(common.RESULTS_HEADER.strip()) and "first" in text
    history = tmp_path / "history"
    history.mkdir()
    (history / "2026-11-26.md").write_text("# header\n\n## camphive demo\n\n*2026-11-26 09:00, m*\n\nlater run\n")
    (tmp_path / "RESULTS.md").write_text(OLD)
    run(common, monkeypatch, tmp_path, "camphive demo", "second", ["demo.py"])
    moved = (history / "2026-11-26.md").read_text()
    assert moved.startswith("# header")
    assert moved.index("demo table 0.9091") < moved.index("later run")  # 05:50 before 09:00
