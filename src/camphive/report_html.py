"""A self-contained HTML report: one file, plots embedded as base64 PNG, no external assets.

Build a page from blocks (``headline``, ``facts``, ``figure``, ``table``, ``details``) and
write it with :func:`write_page`. Every piece of text is escaped here, so callers pass
plain strings.
"""
from __future__ import annotations

import base64
import html
from collections.abc import Callable, Sequence
from pathlib import Path

from camphive.runs import atomic_write_text

STYLE = """
body { font-family: -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; color: #222;
       max-width: 1120px; margin: 24px auto; padding: 0 20px; line-height: 1.45; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { font-size: 1.2em; margin-top: 1.8em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
.subtitle { color: #666; margin-top: 0; }
.headline { font-size: 1.25em; background: #fff4f2; border-left: 6px solid #d62728; padding: 12px 16px;
            margin: 18px 0; }
.facts { display: flex; flex-wrap: wrap; gap: 10px; margin: 12px 0; padding: 0; list-style: none; }
.facts li { background: #f4f6f8; border-radius: 6px; padding: 6px 12px; }
.facts b { display: block; font-size: 0.75em; color: #666; font-weight: normal; }
figure { margin: 12px 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9em; }
table { border-collapse: collapse; font-size: 0.88em; margin: 8px 0; }
th, td { border: 1px solid #ddd; padding: 4px 8px; text-align: right; }
th { background: #f4f6f8; }
td.text, th.text { text-align: left; }
td.text { white-space: nowrap; }
tr.method td { background: #fff4f2; }
td.best { font-weight: bold; }
pre { background: #f6f8fa; padding: 10px; overflow-x: auto; font-size: 0.85em; }
.note { color: #666; font-size: 0.9em; }
"""

Block = str


def image_data_uri(png: bytes | str | Path) -> str:
    """A ``data:`` URI for a PNG given as bytes or a file path."""
    data = png if isinstance(png, bytes) else Path(png).read_bytes()
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def heading(text: str) -> Block:
    return f"<h2>{html.escape(text)}</h2>"


def paragraph(text: str, css_class: str = "") -> Block:
    attribute = f' class="{css_class}"' if css_class else ""
    return f"<p{attribute}>{html.escape(text)}</p>"


def headline(text: str) -> Block:
    return f'<p class="headline">{html.escape(text)}</p>'


def facts(items: Sequence[tuple[str, str]]) -> Block:
    """Small labelled values in a row: ``[(label, value)]``."""
    cells = "".join(f"<li><b>{html.escape(label)}</b>{html.escape(value)}</li>" for label, value in items)
    return f'<ul class="facts">{cells}</ul>'


def figure(png: bytes | str | Path, caption: str, alt: str = "") -> Block:
    return (f'<figure><img src="{image_data_uri(png)}" alt="{html.escape(alt or caption)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def table(rows: Sequence[dict], columns: Sequence[tuple[str, str, Callable | None]], *,
          row_class: Callable[[dict], str] | None = None,
          cell_class: Callable[[dict, str], str] | None = None) -> Block:
    """An HTML table; ``columns`` = [(key, header, formatter or None)]. Text columns align left."""
    head = "".join(f'<th class="{_align(rows, key)}">{html.escape(header)}</th>' for key, header, _ in columns)
    body = []
    for row in rows:
        cells = []
        for key, _, formatter in columns:
            value = row.get(key)
            text = "–" if value is None else (formatter(value) if formatter else str(value))
            classes = " ".join(filter(None, [_align(rows, key), cell_class(row, key) if cell_class else ""]))
            cells.append(f'<td class="{classes}">{html.escape(text)}</td>')
        attribute = f' class="{row_class(row)}"' if row_class and row_class(row) else ""
        body.append(f"<tr{attribute}>{''.join(cells)}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _align(rows: Sequence[dict], key: str) -> str:
    is_text = any(isinstance(row.get(key), str) for row in rows)
    return "text" if is_text else ""


def preformatted(text: str) -> Block:
    return f"<pre>{html.escape(text)}</pre>"


def details(summary: str, *blocks: Block, open_: bool = False) -> Block:
    return f"<details{' open' if open_ else ''}><summary>{html.escape(summary)}</summary>{''.join(blocks)}</details>"


def page(title: str, blocks: Sequence[Block], subtitle: str = "") -> str:
    """The whole document as a string."""
    sub = f'<p class="subtitle">{html.escape(subtitle)}</p>' if subtitle else ""
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>{sub}{''.join(blocks)}</body></html>\n")


def write_page(path: str | Path, title: str, blocks: Sequence[Block], subtitle: str = "") -> Path:
    return atomic_write_text(path, page(title, blocks, subtitle))
