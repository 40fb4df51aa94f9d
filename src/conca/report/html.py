"""A small, dependency-light builder for one self-contained HTML report.

Every conca experiment (demo, sweeps, reproductions) writes its results through
:class:`Report`.  The output is a single HTML file with inline CSS, no JavaScript,
no external resources and figures embedded as base64 PNG, so it can be mailed,
archived or opened offline.

Example::

    rep = Report("Layer 6 SAE", subtitle="gpt2, 16k latents")
    rep.heading("Metrics").table([{"site": "resid_6", "fvu": 0.1234567, "l0": 31.9}])
    rep.figure(plots.training_curves({"resid_6": history}))
    rep.code(config_yaml)
    rep.write("runs/demo/report.html")
"""

from __future__ import annotations

import base64
import html
import io
import math
import numbers
from datetime import datetime, timezone
from pathlib import Path

from conca.fileio import atomic_write_text

__all__ = ["Report", "format_value"]

MISSING = "\u2014"  # em dash, shown for None / missing cells

_CSS = """
:root { color-scheme: light; }
* { box-sizing: border-box; }
body {
  margin: 0; padding: 2rem 1rem; background: #f6f7f9; color: #1d2430;
  font-family: system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
  font-size: 15px; line-height: 1.5;
}
main {
  max-width: 1000px; margin: 0 auto; background: #fff; padding: 2rem 2.5rem;
  border: 1px solid #e1e4e8; border-radius: 8px;
}
header { border-bottom: 2px solid #e1e4e8; margin-bottom: 1.5rem; padding-bottom: .75rem; }
h1 { font-size: 1.8rem; margin: 0 0 .25rem 0; }
h2 { font-size: 1.35rem; margin: 2rem 0 .75rem 0; border-bottom: 1px solid #eaecef; padding-bottom: .25rem; }
h3 { font-size: 1.1rem; margin: 1.5rem 0 .5rem 0; }
h4, h5, h6 { font-size: 1rem; margin: 1.25rem 0 .5rem 0; }
.subtitle { color: #57606a; margin: 0; font-size: 1.05rem; }
p { margin: .6rem 0; }
table { border-collapse: collapse; margin: .75rem 0 1.25rem 0; font-size: .92rem; min-width: 40%; }
caption { caption-side: top; text-align: left; font-weight: 600; padding: .25rem 0; color: #333; }
th, td { padding: .35rem .7rem; border-bottom: 1px solid #e6e8eb; text-align: left; vertical-align: top; }
thead th { background: #eef1f5; border-bottom: 2px solid #d0d7de; }
tbody tr:nth-child(even) { background: #f8f9fb; }
tbody tr:hover { background: #eef4ff; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
table.kv th { background: transparent; font-weight: 600; white-space: nowrap; }
.table-wrap { overflow-x: auto; }
figure { margin: 1rem 0 1.5rem 0; text-align: center; }
figure img { max-width: 100%; height: auto; }
figcaption { color: #57606a; font-size: .9rem; margin-top: .35rem; }
pre {
  background: #f3f4f6; border: 1px solid #e1e4e8; border-radius: 6px; padding: .75rem 1rem;
  overflow-x: auto; font-size: .85rem; line-height: 1.4;
  font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, "Liberation Mono", monospace;
}
.empty { color: #888; font-style: italic; }
footer { margin-top: 2rem; color: #8b949e; font-size: .8rem; border-top: 1px solid #eaecef; padding-top: .5rem; }
"""


def _is_number(value: object) -> bool:
    """True for real numbers (Python, numpy scalars, 0-d/1-element tensors), but not bools."""
    value = _unwrap(value)
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _unwrap(value: object) -> object:
    """Turn numpy scalars / 0-d arrays / single-element tensors into Python scalars."""
    if value is None or isinstance(value, (str, bytes, bool, int, float)):
        return value
    item = getattr(value, "item", None)
    numel = getattr(value, "numel", None) or getattr(value, "size", None)
    try:
        n = numel() if callable(numel) else numel
    except TypeError:
        n = None
    if callable(item) and (n is None or n == 1):
        try:
            return item()
        except (ValueError, RuntimeError, TypeError):
            return value
    return value


def format_value(value: object) -> str:
    """Human-readable text for one cell (not yet HTML-escaped).

    Floats get 4 significant digits, ``None`` becomes an em dash, ints stay exact,
    lists/tuples of numbers are formatted element-wise.
    """
    value = _unwrap(value)
    if value is None:
        return MISSING
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        f = float(value)
        if math.isnan(f):
            return "nan"
        if math.isinf(f):
            return "inf" if f > 0 else "-inf"
        return f"{f:.4g}"
    if isinstance(value, (list, tuple)):
        inner = ", ".join(format_value(v) for v in value)
        return f"[{inner}]" if isinstance(value, list) else f"({inner}{',' if len(value) == 1 else ''})"
    return str(value)


def _esc(text: object) -> str:
    return html.escape(str(text), quote=True)


class Report:
    """Accumulates report blocks and renders them into one self-contained HTML page.

    All builder methods return ``self`` so calls can be chained.  All user-supplied
    text (titles, paragraphs, cell values, code) is HTML-escaped.
    """

    def __init__(self, title: str, subtitle: str | None = None):
        self.title = str(title)
        self.subtitle = None if subtitle is None else str(subtitle)
        self.created = datetime.now(timezone.utc)
        self._blocks: list[str] = []

    # ------------------------------------------------------------------ blocks
    def heading(self, text: str, level: int = 2) -> "Report":
        level = int(level)
        if not 1 <= level <= 6:
            raise ValueError(f"heading level must be in 1..6, got {level}")
        self._blocks.append(f"<h{level}>{_esc(text)}</h{level}>")
        return self

    def paragraph(self, text: str) -> "Report":
        self._blocks.append(f"<p>{_esc(text)}</p>")
        return self

    def table(
        self,
        rows: list[dict[str, object]],
        columns: list[str] | None = None,
        caption: str | None = None,
    ) -> "Report":
        rows = list(rows)
        if columns is None:
            columns = list(rows[0].keys()) if rows else []
        columns = list(columns)
        cap = f"<caption>{_esc(caption)}</caption>" if caption is not None else ""
        if not columns:
            self._blocks.append(
                f'<div class="table-wrap"><table>{cap}<tbody><tr><td class="empty">(no rows)</td></tr>'
                "</tbody></table></div>"
            )
            return self

        # A column is numeric (right-aligned header) when every present value is a number.
        numeric = {}
        for col in columns:
            present = [r.get(col) for r in rows if r.get(col) is not None]
            numeric[col] = bool(present) and all(_is_number(v) for v in present)

        num_cls = ' class="num"'
        head = "".join(f'<th scope="col"{num_cls if numeric[c] else ""}>{_esc(c)}</th>' for c in columns)
        body_rows = []
        for r in rows:
            cells = []
            for c in columns:
                v = r.get(c)
                cls = num_cls if _is_number(v) or (v is None and numeric[c]) else ""
                cells.append(f"<td{cls}>{_esc(format_value(v))}</td>")
            body_rows.append("<tr>" + "".join(cells) + "</tr>")
        if not body_rows:
            body_rows.append(f'<tr><td class="empty" colspan="{len(columns)}">(no rows)</td></tr>')
        self._blocks.append(
            f'<div class="table-wrap"><table>{cap}<thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(body_rows)}</tbody></table></div>"
        )
        return self

    def key_values(self, items: dict[str, object], caption: str | None = None) -> "Report":
        cap = f"<caption>{_esc(caption)}</caption>" if caption is not None else ""
        body = []
        for k, v in dict(items).items():
            cls = ' class="num"' if _is_number(v) else ""
            body.append(f'<tr><th scope="row">{_esc(k)}</th><td{cls}>{_esc(format_value(v))}</td></tr>')
        if not body:
            body.append('<tr><td class="empty" colspan="2">(empty)</td></tr>')
        self._blocks.append(f'<div class="table-wrap"><table class="kv">{cap}<tbody>{"".join(body)}</tbody></table></div>')
        return self

    def figure(self, fig, caption: str | None = None, dpi: int = 110) -> "Report":
        """Embed a matplotlib Figure as a base64 PNG, then close it to free memory."""
        buf = io.BytesIO()
        try:
            fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
        finally:
            _close_figure(fig)
        data = base64.b64encode(buf.getvalue()).decode("ascii")
        alt = _esc(caption) if caption is not None else "figure"
        cap = f"<figcaption>{_esc(caption)}</figcaption>" if caption is not None else ""
        self._blocks.append(f'<figure><img alt="{alt}" src="data:image/png;base64,{data}">{cap}</figure>')
        return self

    def links(self, items: list[tuple[str, str, str]]) -> "Report":
        """A list of (text, href, note): links to pages beside the report (relative hrefs), each
        with a note after it; everything escaped."""
        body = "".join(f'<li><a href="{_esc(href)}">{_esc(text)}</a>{" — " + _esc(note) if note else ""}</li>'
                       for text, href, note in items)
        self._blocks.append(f"<ul class=\"links\">{body}</ul>")
        return self

    def code(self, text: str) -> "Report":
        self._blocks.append(f"<pre><code>{_esc(text)}</code></pre>")
        return self

    # ------------------------------------------------------------------ output
    def render(self) -> str:
        sub = f'<p class="subtitle">{_esc(self.subtitle)}</p>' if self.subtitle else ""
        stamp = self.created.strftime("%Y-%m-%d %H:%M:%S UTC")
        body = "\n".join(self._blocks)
        return (
            "<!DOCTYPE html>\n"
            '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{_esc(self.title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n<main>\n"
            f"<header><h1>{_esc(self.title)}</h1>{sub}</header>\n"
            f"{body}\n"
            f"<footer>Generated by conca on {stamp}.</footer>\n"
            "</main>\n</body>\n</html>\n"
        )

    def write(self, path) -> Path:
        """Write the report atomically (temp file in the same directory + ``os.replace``), with the
        usual mode of a new file (0666 less the umask)."""
        path = Path(path)
        atomic_write_text(path, self.render())
        return path

    def __repr__(self) -> str:
        return f"Report(title={self.title!r}, blocks={len(self._blocks)})"


def _close_figure(fig) -> None:
    """Close a figure whether or not it is managed by pyplot."""
    import sys

    plt = sys.modules.get("matplotlib.pyplot")
    if plt is not None:
        plt.close(fig)
