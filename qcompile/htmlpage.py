"""Self-contained HTML pages (the quantization report, the sensitivity table): one file, inline
CSS, inline SVG plots and a few lines of inline JavaScript that make tables sortable. No network,
no matplotlib.

Example::

    >>> rows = [[cell("fc1"), cell("31.2 dB", sort=31.2)]]
    >>> page("demo", table(["layer", "SQNR"], rows, id="layers"))
"""
from __future__ import annotations

import html
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

from .atomic import atomic_file

_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em}
table{border-collapse:collapse;font-size:.9em}
td,th{padding:2px 8px;border:1px solid #ccc;text-align:right}
td:first-child,th:first-child{text-align:left}
th.sortable{cursor:pointer;background:#f3f3f3}
th[aria-sort=ascending]::after{content:" \\25B2"}th[aria-sort=descending]::after{content:" \\25BC"}
svg text{font-size:11px;font-family:system-ui,sans-serif}
dl{display:grid;grid-template-columns:max-content auto;gap:2px 12px}dt{font-weight:600}dd{margin:0}
"""

# Sorts on each cell's data-sort (numbers numerically, the rest as text); a click on a header
# toggles the order. A "#sort=<column>" or "#sort=-<column>" fragment sorts on load (shareable
# links; the tests check the rendered order with it). data-sortable="ready" marks tables it set up.
_JS = """
(function(){
function key(td){var v=td.getAttribute('data-sort');if(v===null)v=td.textContent;var n=parseFloat(v);
  return isNaN(n)?{n:null,s:v}:{n:n,s:v};}
function cmp(a,b){if(a.n!==null&&b.n!==null)return a.n-b.n;if(a.n!==null)return -1;if(b.n!==null)return 1;
  return a.s<b.s?-1:a.s>b.s?1:0;}
function sortBy(table,col,desc){var body=table.tBodies[0];var rows=Array.prototype.slice.call(body.rows);
  rows.sort(function(r1,r2){var c=cmp(key(r1.cells[col]),key(r2.cells[col]));return desc?-c:c;});
  rows.forEach(function(r){body.appendChild(r);});
  Array.prototype.forEach.call(table.tHead.rows[0].cells,function(th,i){
    if(i===col)th.setAttribute('aria-sort',desc?'descending':'ascending');else th.removeAttribute('aria-sort');});}
document.querySelectorAll('table.sortable').forEach(function(table){
  Array.prototype.forEach.call(table.tHead.rows[0].cells,function(th,i){th.classList.add('sortable');
    th.addEventListener('click',function(){sortBy(table,i,th.getAttribute('aria-sort')==='ascending');});});
  table.setAttribute('data-sortable','ready');});
var m=/[#&]sort=(-?)([\\w-]+)/.exec(location.hash);
if(m){document.querySelectorAll('table.sortable').forEach(function(table){
  Array.prototype.forEach.call(table.tHead.rows[0].cells,function(th,i){
    if(th.getAttribute('data-key')===m[2])sortBy(table,i,m[1]==='-');});});}
})();
"""


@dataclass(frozen=True)
class Cell:
    """One table cell: the HTML shown, the value sorted on, an optional background colour."""

    html: str
    sort: Optional[Union[float, str]] = None
    background: Optional[str] = None


def cell(text, sort=None, background: Optional[str] = None, raw: bool = False) -> Cell:
    """A cell showing ``text`` (escaped unless ``raw``), sorted on ``sort`` (default: ``text``)."""
    return Cell(str(text) if raw else html.escape(str(text)), sort, background)


def db_cell(db: Optional[float], colour: bool = True) -> Cell:
    """A dB value, ``-`` when missing, ``inf`` when exact; coloured with :func:`sqnr_colour`."""
    if db is None:
        return Cell("-", "")
    text = f"{db:.1f}" if math.isfinite(db) else ("inf" if db > 0 else "-inf")
    return Cell(text, db if math.isfinite(db) else math.copysign(1e9, db), sqnr_colour(db) if colour else None)


def sqnr_colour(db: float) -> str:
    """Red at 10 dB or less, green at 40 dB or more (40 dB ≈ 1 % relative error)."""
    t = (1.0 if db > 0 else 0.0) if not math.isfinite(db) else min(max((db - 10) / 30, 0.0), 1.0)
    return f"hsl({int(120 * t)}, 70%, 80%)"


def table(columns: Sequence[str], rows: Sequence[Sequence[Cell]], *, id: Optional[str] = None,
          keys: Optional[Sequence[str]] = None, row_keys: Optional[Sequence[str]] = None,
          sortable: bool = True) -> str:
    """An HTML table. ``keys``: a stable id per column (``data-key``, used by ``#sort=``);
    ``row_keys``: a ``data-row`` attribute per row (what tests and scripts look rows up by)."""
    keys = keys or [c.lower().replace(" ", "_") for c in columns]
    head = "".join(f'<th data-key="{html.escape(k)}">{html.escape(c)}</th>' for c, k in zip(columns, keys))
    body = []
    for i, row in enumerate(rows):
        attr = f' data-row="{html.escape(row_keys[i])}"' if row_keys else ""
        tds = "".join(
            "<td" + (f' data-sort="{html.escape(str(c.sort))}"' if c.sort is not None else "")
            + (f' style="background:{c.background}"' if c.background else "") + f">{c.html}</td>" for c in row)
        body.append(f"<tr{attr}>{tds}</tr>")
    cls = ' class="sortable"' if sortable else ""
    ident = f' id="{html.escape(id)}"' if id else ""
    return f"<table{ident}{cls}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def definitions(items: Sequence[tuple[str, str]]) -> str:
    """A two-column list of (term, text), both escaped."""
    return "<dl>" + "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in items) + "</dl>"


_PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e")


def svg_lines(labels: Sequence[str], series: dict[str, Sequence[Optional[float]]], *, y_label: str,
              title: str, width: int = 900, height: int = 280) -> str:
    """A line plot with one point per label (in order) for each series; ``None`` values are left
    out, ``inf`` is drawn at the top edge and ``-inf`` at the bottom edge, both marked. Each point has
    a hover tooltip."""
    finite = [v for vals in series.values() for v in vals if v is not None and math.isfinite(v)]
    if not labels or not finite:
        return f"<p>{html.escape(title)}: no values to plot.</p>"
    lo, hi = min(0.0, min(finite)), max(finite) * 1.05 + 1e-9
    n = len(labels)
    ticks = n <= 48  # layer names under the axis while they fit; tooltips always
    left, right, top, bottom = (140 if ticks else 48), 12, 40, 130 if ticks else 12
    height += bottom
    w, h = width - left - right, height - top - bottom

    def x(i):
        return left + (w * (i + 0.5) / n)

    def y(v):
        v = (hi if v > 0 else lo) if not math.isfinite(v) else v
        return top + h - (v - lo) / (hi - lo) * h

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="{html.escape(title)}">',
             f'<text x="{left}" y="14" font-weight="600">{html.escape(title)}</text>',
             f'<rect x="{left}" y="{top}" width="{w}" height="{h}" fill="none" stroke="#999"/>']
    for k in range(5):
        v = lo + (hi - lo) * k / 4
        parts.append(f'<line x1="{left}" x2="{left + w}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#eee"/>'
                     f'<text x="{left - 4}" y="{y(v) + 4:.1f}" text-anchor="end">{v:.0f}</text>')
    parts.append(f'<text x="{left - 34}" y="{top + h / 2:.0f}" transform="rotate(-90 {left - 34} {top + h / 2:.0f})" '
                 f'text-anchor="middle">{html.escape(y_label)}</text>')
    for j, (name, vals) in enumerate(series.items()):
        colour = _PALETTE[j % len(_PALETTE)]
        pts = [(i, v) for i, v in enumerate(vals) if v is not None]
        if len(pts) > 1:
            parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="'
                         + " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in pts) + '"/>')
        for i, v in pts:
            shown = f"{v:.1f}" if math.isfinite(v) else ("inf" if v > 0 else "-inf")
            parts.append(f'<circle cx="{x(i):.1f}" cy="{y(v):.1f}" r="{2.5 if math.isfinite(v) else 4}" '
                         f'fill="{colour if math.isfinite(v) else "none"}" stroke="{colour}">'
                         f"<title>{html.escape(labels[i])}: {html.escape(name)} {shown}</title></circle>")
        parts.append(f'<rect x="{left + 150 * j}" y="22" width="10" height="10" fill="{colour}"/>'
                     f'<text x="{left + 14 + 150 * j}" y="31">{html.escape(name)}</text>')
    if ticks:
        for i, label in enumerate(labels):
            short = label if len(label) <= 30 else "…" + label[-29:]  # the end tells layers apart
            parts.append(f'<text x="{x(i):.1f}" y="{top + h + 12}" text-anchor="end" '
                         f'transform="rotate(-40 {x(i):.1f} {top + h + 12})">{html.escape(short)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def svg_bars(items: Sequence[tuple[str, float]], *, unit: str, title: str, width: int = 900) -> str:
    """Horizontal bars, one per (label, value), with the value written at the end of each bar."""
    if not items:
        return ""
    row, left = 22, 230
    height = 24 + row * len(items)
    top = max(v for _, v in items) or 1.0
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="{html.escape(title)}">', f'<text x="0" y="14" font-weight="600">{html.escape(title)}</text>']
    for i, (label, v) in enumerate(items):
        yy = 22 + row * i
        bw = (width - left - 110) * v / top
        parts.append(f'<text x="{left - 6}" y="{yy + 14}" text-anchor="end">{html.escape(label)}</text>'
                     f'<rect x="{left}" y="{yy + 3}" width="{bw:.1f}" height="{row - 6}" '
                     f'fill="{_PALETTE[i % 2]}"/><text x="{left + bw + 6:.1f}" y="{yy + 14}">{v:.3g} {html.escape(unit)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def page(title: str, body: str) -> str:
    """A complete HTML document: ``body`` with the shared inline style and table script."""
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body>{body}<script>{_JS}</script></body></html>")


def write(path: Union[str, Path], document: str) -> Path:
    """Write ``document`` to ``path`` (UTF-8, atomically) and return the path."""
    path = Path(path)
    with atomic_file(path) as tmp:
        tmp.write_text(document, encoding="utf-8")
    return path
