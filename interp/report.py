"""Self-contained HTML reports: prose, metric tables and interactive plotly figures.

The page embeds plotly.js once (no network needed to open it) and every figure as a div, so a
report can be mailed, archived or opened offline years later.
"""

from __future__ import annotations

import datetime as _dt
import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from interp.io import atomic_write_text
from interp.results import format_value

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1.5em;color:#1f2328;line-height:1.5}
h1{font-size:1.8em;border-bottom:2px solid #d0d7de;padding-bottom:.3em}
h2{font-size:1.35em;margin-top:2em;border-bottom:1px solid #d0d7de;padding-bottom:.2em}
table{border-collapse:collapse;margin:1em 0;font-size:.92em}
th,td{border:1px solid #d0d7de;padding:.35em .7em;text-align:left;vertical-align:top}
th{background:#f6f8fa} td.n{text-align:right;white-space:nowrap}
.caption{color:#57606a;font-size:.9em;margin:.2em 0 1.5em}
.meta{color:#57606a;font-size:.85em}
.kpis{display:flex;flex-wrap:wrap;gap:.8em;margin:1em 0}
.kpi{border:1px solid #d0d7de;border-radius:6px;padding:.6em 1em;min-width:10em}
.kpi .v{font-size:1.5em;font-weight:600} .kpi .l{color:#57606a;font-size:.85em}
.ok{color:#1a7f37} .bad{color:#cf222e}
pre{background:#f6f8fa;padding:.8em;overflow-x:auto;font-size:.85em;white-space:pre-wrap}
"""


def format_p(p: float | None) -> str:
    """'p = 0.031', 'p < 1e-14' where the exact tail is below what doubles resolve, 'p n/a'."""
    if p is None or p != p:
        return "p n/a"
    return "p < 1e-14" if p < 1e-14 else f"p = {p:.2g}"


def _fmt(v) -> str:
    return html.escape(format_value(v))


def _cell(v) -> str:
    """A table cell: numbers right-aligned (they line up), text left-aligned."""
    numeric = isinstance(v, (int, float)) and not isinstance(v, bool)
    return f'<td class="n">{_fmt(v)}</td>' if numeric else f"<td>{_fmt(v)}</td>"


@dataclass
class Report:
    """Build a report piece by piece, then :meth:`write` it atomically."""

    title: str
    subtitle: str = ""
    _parts: list[str] = field(default_factory=list)
    _n_figures: int = 0

    def heading(self, text: str) -> Report:
        self._parts.append(f"<h2>{html.escape(text)}</h2>")
        return self

    def text(self, markdown_ish: str) -> Report:
        """A paragraph; blank lines separate paragraphs, ``**x**`` is bold."""
        for para in markdown_ish.strip().split("\n\n"):
            body = html.escape(para.strip())
            while "**" in body and body.count("**") >= 2:
                body = body.replace("**", "<b>", 1).replace("**", "</b>", 1)
            self._parts.append(f"<p>{body}</p>")
        return self

    def kpis(self, items: Sequence[tuple[str, object, bool | None]]) -> Report:
        """Headline numbers: (label, value, passed?) where passed colours the value."""
        cells = []
        for label, value, ok in items:
            cls = "" if ok is None else (" ok" if ok else " bad")
            cells.append(f'<div class="kpi"><div class="v{cls}">{_fmt(value)}</div>'
                         f'<div class="l">{html.escape(label)}</div></div>')
        self._parts.append(f'<div class="kpis">{"".join(cells)}</div>')
        return self

    def table(self, rows: Sequence[Mapping[str, object]], caption: str = "") -> Report:
        if not rows:
            return self
        cols = list(rows[0].keys())
        head = "".join(f"<th>{html.escape(str(c))}</th>" for c in cols)
        body = "".join(
            "<tr>" + "".join(_cell(r.get(c, "")) for c in cols) + "</tr>" for r in rows
        )
        self._parts.append(f"<table><tr>{head}</tr>{body}</table>")
        if caption:
            self._parts.append(f'<div class="caption">{html.escape(caption)}</div>')
        return self

    def figure(self, fig, caption: str = "") -> Report:
        """Embed a plotly figure (plotly.js is included once for the whole page).

        A fixed figure width (good for PNG export) is dropped so the figure fills the page.
        """
        import plotly.graph_objects as go

        self._n_figures += 1
        fig = go.Figure(fig).update_layout(width=None, autosize=True)
        div = fig.to_html(full_html=False, include_plotlyjs=False, default_width="100%",
                          div_id=f"fig{self._n_figures}",
                          config={"displaylogo": False, "responsive": True})
        self._parts.append(div)
        if caption:
            self._parts.append(f'<div class="caption">{html.escape(caption)}</div>')
        return self

    def result(self, result, caption: str = "") -> Report:
        """A result's compact summary table (any :class:`interp.results.Result`)."""
        self._parts.append(result._repr_html_())
        if caption:
            self._parts.append(f'<div class="caption">{html.escape(caption)}</div>')
        return self

    def preformatted(self, text: str) -> Report:
        self._parts.append(f"<pre>{html.escape(text)}</pre>")
        return self

    def render(self) -> str:
        from plotly.offline import get_plotlyjs

        stamp = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
        sub = f'<p class="meta">{html.escape(self.subtitle)} · generated {stamp}</p>'
        return (
            "<!DOCTYPE html><html><head><meta charset='utf-8'>"
            f"<title>{html.escape(self.title)}</title><style>{_CSS}</style>"
            f"<script type='text/javascript'>{get_plotlyjs()}</script></head><body>"
            f"<h1>{html.escape(self.title)}</h1>{sub}{''.join(self._parts)}</body></html>"
        )

    def write(self, path: str | Path) -> Path:
        """Write the page atomically (a reader never sees half a report)."""
        return atomic_write_text(path, self.render())

    def _repr_html_(self) -> str:
        """The whole page in a sandboxed frame, so a notebook shows it as the file will look."""
        return (f'<iframe srcdoc="{html.escape(self.render(), quote=True)}" '
                'style="width:100%;height:640px;border:1px solid #d0d7de" '
                'sandbox="allow-scripts"></iframe>')
