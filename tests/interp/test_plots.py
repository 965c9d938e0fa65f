"""Shared figure helpers: fixed colours per subnetwork kind and offline HTML."""

from __future__ import annotations

import plotly.graph_objects as go

from interp.plots import COLORS, SEQUENCE, TEMPLATE_NAME, color_for, figure, save_figure


def test_colors_are_fixed_per_kind():
    assert color_for("bigram subnetwork") == COLORS["bigram"]
    assert color_for("Random (same layout)", 5) == COLORS["random"]
    assert color_for("other", 1) == SEQUENCE[1]


def test_save_figure_writes_offline_html(tmp_path):
    fig = figure(title="t")
    fig.add_trace(go.Scatter(x=[0, 1], y=[1, 2]))
    assert fig.layout.template.layout.paper_bgcolor == "white"
    (html,) = save_figure(fig, tmp_path / "a.html")
    save_figure(fig, tmp_path / "b")  # suffix added; the bundle is written once
    bundle = tmp_path / "plotly.min.js"
    assert bundle.stat().st_size > 1_000_000
    assert 'src="plotly.min.js"' in html.read_text() and (tmp_path / "b.html").is_file()
    assert "cdn.plot.ly" not in html.read_text()
    (alone,) = save_figure(fig, tmp_path / "sub" / "c.html", plotlyjs="embed")
    assert alone.stat().st_size > 1_000_000 and not (tmp_path / "sub" / "plotly.min.js").exists()
    assert TEMPLATE_NAME == "interp"
