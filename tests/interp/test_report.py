"""interp.report: escaped text and tables, n/a for NaN, plotly.js once, atomic writes."""

from __future__ import annotations

import math
import re

import plotly.graph_objects as go
import pytest
from plotly.offline import get_plotlyjs

import interp.io as io_mod
from interp.report import Report


def _fig(name: str, width: int | None = None) -> go.Figure:
    fig = go.Figure(go.Scatter(x=[0, 1, 2], y=[3, 1, 2], name=name))
    return fig.update_layout(title=f"title of {name}", width=width)


def _body(page: str) -> str:
    return page.split("</head>", 1)[1]


def test_text_is_escaped_and_bold_works():
    page = Report("r").text(
        "a <script>alert(1)</script> & **bold** text\n\nsecond **para** <b>no</b>").render()
    body = _body(page)
    assert "<script>alert(1)</script>" not in body and "<b>no</b>" not in body
    assert "<p>a &lt;script&gt;alert(1)&lt;/script&gt; &amp; <b>bold</b> text</p>" in body
    assert "<p>second <b>para</b> &lt;b&gt;no&lt;/b&gt;</p>" in body
    # an unpaired ** stays literal
    assert "<p>2 ** 3</p>" in _body(Report("r").text("2 ** 3").render())


def test_title_heading_caption_and_preformatted_are_escaped():
    page = (Report("A<B", subtitle="x & y").heading("<h1>")
            .preformatted("if a < b:\n    print('<hr>')").render())
    assert "<title>A&lt;B</title>" in page and "<h1>A&lt;B</h1>" in page
    body = _body(page)
    assert "<h2>&lt;h1&gt;</h2>" in body and "x &amp; y · generated " in body
    assert "<pre>if a &lt; b:\n    print(&#x27;&lt;hr&gt;&#x27;)</pre>" in body
    assert "<hr>" not in body


def test_table_escapes_cells_and_shows_nan_as_na():
    rows = [{"name <i>": "<b>bigram</b>", "r": 0.91234567, "n": 1234567, "big": 123456.0,
             "miss": math.nan},
            {"name <i>": "a & b", "r": math.nan, "n": 3, "big": 1.5}]  # "miss" absent
    body = _body(Report("t").table(rows, caption="<caption>").render())
    table = re.search(r"<table>.*?</table>", body).group(0)
    assert re.findall(r"<th[^>]*>(.*?)</th>", table) == ["name &lt;i&gt;", "r", "n", "big",
                                                         "miss"]
    rows_html = re.findall(r"<tr>(.*?)</tr>", table)
    assert len(rows_html) == 3
    cells = [re.findall(r"<td[^>]*>(.*?)</td>", r) for r in rows_html[1:]]
    assert cells == [
        ["&lt;b&gt;bigram&lt;/b&gt;", "0.9123", "1,234,567", "123,456", "n/a"],
        ["a &amp; b", "n/a", "3", "1.5", ""],  # a missing key is an empty cell
    ]
    assert "<b>" not in table and "nan" not in table.lower()
    assert '<div class="caption">&lt;caption&gt;</div>' in body
    assert "<table>" not in _body(Report("t").table([]).render())  # no rows, no table


def test_kpis_colour_pass_and_fail():
    body = _body(Report("k").kpis([("r", 0.95, True), ("ratio", math.nan, False),
                                   ("<n>", 12000, None)]).render())
    assert '<div class="v ok">0.95</div>' in body
    assert '<div class="v bad">n/a</div>' in body
    assert '<div class="v">12,000</div><div class="l">&lt;n&gt;</div>' in body


def test_figures_embedded_with_plotlyjs_exactly_once():
    first = _fig("first", width=900)
    rep = Report("figs").figure(first, caption="one").figure(_fig("second"))
    assert first.layout.width == 900  # the caller's figure is not modified
    page = rep.render()
    js = get_plotlyjs()
    assert page.count(js) == 1  # the whole bundle once, in the head
    assert page.index(js) < page.index("</head>")
    assert page.count("plotly.js v") == 1  # no second copy of any version
    body = _body(page)
    assert 'id="fig1"' in body and 'id="fig2"' in body
    assert body.count("Plotly.newPlot(") == 2
    assert "title of first" in body and "title of second" in body
    assert '<div class="caption">one</div>' in body
    # opens offline: no script is fetched (the bundle itself names a topojson CDN default)
    assert "cdn.plot.ly" not in body and "<script src=" not in page
    assert '"width":900' not in body.replace(" ", "")  # fixed width dropped for the page
    assert '"displaylogo":false' in body.replace(" ", "")


def test_write_is_atomic_and_leaves_no_temp_files(tmp_path, monkeypatch):
    path = tmp_path / "out" / "report.html"
    written = Report("v1").text("first").write(path)
    assert written == path and [p.name for p in path.parent.iterdir()] == ["report.html"]
    page = path.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and page.endswith("</body></html>")
    assert "<p>first</p>" in page
    before = path.read_bytes()

    def crash(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(io_mod.os, "fsync", crash)
    with pytest.raises(OSError, match="Input/output"):
        Report("v2").text("second").figure(_fig("x")).write(path)
    monkeypatch.undo()
    assert path.read_bytes() == before  # the old report is whole
    assert [p.name for p in path.parent.iterdir()] == ["report.html"]
    Report("v2").text("second").write(path)
    assert "<p>second</p>" in path.read_text() and len(list(path.parent.iterdir())) == 1
