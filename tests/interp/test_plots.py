"""Shared figure helpers: fixed colours per subnetwork kind and offline HTML."""

from __future__ import annotations

import re

import plotly.graph_objects as go
import pytest
from plotly.offline import get_plotlyjs

from interp.errors import InterpError
from interp.plots import (
    COLORS,
    SEQUENCE,
    TEMPLATE,
    color_for,
    figure,
    save_figure,
    subplots,
)


def test_colors_are_fixed_per_kind():
    assert color_for("bigram subnetwork") == COLORS["bigram"]
    assert color_for("Random (same layout)", 5) == COLORS["random"]
    assert color_for("other", 1) == SEQUENCE[1]


def test_figure_builds_the_template_layout_and_traces():
    fig = figure(title="loss", xaxis_title="step", yaxis_title="nats")
    labels = ["full model", "bigram subnetwork", "random (same layout)", "optimal", "probe",
              "other"]
    for i, label in enumerate(labels):
        fig.add_trace(go.Scatter(x=[0, 1], y=[i, i + 1], name=label,
                                 line=dict(color=color_for(label, i))))
    assert len(fig.data) == 6
    assert [t.line.color for t in fig.data] == [
        "#000000", "#D55E00", "#999999", "#0072B2", SEQUENCE[4], SEQUENCE[5]]
    assert fig.layout.title.text == "loss"
    assert fig.layout.xaxis.title.text == "step" and fig.layout.yaxis.title.text == "nats"
    tpl = fig.layout.template.layout
    assert tpl.paper_bgcolor == tpl.plot_bgcolor == "white"
    assert list(tpl.colorway) == list(SEQUENCE)
    assert tpl.xaxis.showgrid and tpl.xaxis.zeroline is False and tpl.xaxis.showline
    assert fig.layout.template == TEMPLATE
    sub = subplots(1, 2, titles=["left", "right"])
    assert [a.text for a in sub.layout.annotations] == ["left", "right"]
    assert sub.layout.template == TEMPLATE


def test_save_figure_writes_offline_html(tmp_path, unchecked):
    fig = figure(title="a title")
    fig.add_trace(go.Scatter(x=[0, 1], y=[1, 2], name="bigram"))
    (html,) = save_figure(fig, tmp_path / "a.html")
    assert html == tmp_path / "a.html"
    save_figure(fig, tmp_path / "b")  # suffix added; the bundle is written once
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.html", "b.html", "plotly.min.js"]
    bundle = tmp_path / "plotly.min.js"
    assert bundle.read_text() == get_plotlyjs()  # the whole bundle, from the installed plotly
    text = html.read_text()
    # the only script loaded from outside the file is the bundle beside it: opens offline
    assert re.findall(r"<script[^>]*\bsrc=\"([^\"]+)\"", text) == ["plotly.min.js"]
    assert "cdn.plot.ly" not in text and "https://" not in text.split("<body>", 1)[1]
    assert "a title" in text and '"name":"bigram"' in text.replace(" ", "")
    assert (tmp_path / "b.html").read_text().count('src="plotly.min.js"') == 1
    # a stale bundle is left alone (written once per directory, never rewritten)
    bundle.write_text("// stale")
    save_figure(fig, tmp_path / "c.html")
    assert bundle.read_text() == "// stale"
    (alone,) = save_figure(fig, tmp_path / "sub" / "c.html", plotlyjs="embed")
    assert not (tmp_path / "sub" / "plotly.min.js").exists()
    alone_text = alone.read_text()
    assert get_plotlyjs() in alone_text and "<script src=" not in alone_text
    assert not re.findall(r"<script[^>]*\bsrc=", alone_text)
    with unchecked(), pytest.raises(InterpError, match="plotlyjs must be"):
        save_figure(fig, tmp_path / "d.html", plotlyjs="cdn")  # not a Literal option
    assert not (tmp_path / "d.html").exists()
