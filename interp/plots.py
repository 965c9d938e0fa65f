"""Shared figure helpers: one plotly template, one colour per subnetwork kind, offline saving.

Every analysis builds its figures with :func:`figure` or :func:`subplots` so they look alike,
picks trace colours with :func:`color_for` (the full model, bigram, random and optimal
subnetworks always get the same colours), and writes them with :func:`save_figure`, which works
without a network: the plotly.js bundle is embedded or written once next to the HTML files.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import plotly.graph_objects as go
import plotly.io as pio
from plotly.subplots import make_subplots

from interp.errors import InterpError
from interp.io import atomic_write_bytes, atomic_write_text

log = logging.getLogger(__name__)

#: Colours of the subnetwork kinds the studies compare (colour-blind safe, Okabe-Ito).
COLORS: dict[str, str] = {
    "full": "#000000",
    "bigram": "#D55E00",
    "random": "#999999",
    "optimal": "#0072B2",
}
#: Colours for any other labels, in order.
SEQUENCE: tuple[str, ...] = (
    "#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000",
)
TEMPLATE_NAME = "interp"

_AXIS = dict(
    showgrid=True, gridcolor="#E5E7EB", zeroline=False, showline=True, linecolor="#6B7280",
    ticks="outside", tickcolor="#6B7280", title_standoff=8,
)
TEMPLATE = go.layout.Template(
    layout=dict(
        font=dict(family="Helvetica, Arial, sans-serif", size=14, color="#111827"),
        title=dict(font=dict(size=17), x=0.02, xanchor="left"),
        paper_bgcolor="white",
        plot_bgcolor="white",
        colorway=list(SEQUENCE),
        xaxis=_AXIS,
        yaxis=_AXIS,
        legend=dict(bgcolor="rgba(255,255,255,0.8)", bordercolor="#E5E7EB", borderwidth=1),
        margin=dict(l=80, r=30, t=70, b=60),
        hoverlabel=dict(font_size=13),
        colorscale=dict(sequential="Viridis"),
    )
)
pio.templates[TEMPLATE_NAME] = TEMPLATE


def color_for(label: str, index: int = 0) -> str:
    """The colour of a trace: fixed for labels naming a known kind, else the ``index``-th one.

    A label matches a kind when it contains the kind's name ("bigram (lambda=1)" -> bigram).
    """
    low = label.lower()
    for kind, color in COLORS.items():
        if kind in low:
            return color
    return SEQUENCE[index % len(SEQUENCE)]


def figure(**layout) -> go.Figure:
    """An empty figure in the toolkit's template; ``layout`` goes to ``update_layout``."""
    return go.Figure(layout=dict(template=TEMPLATE_NAME, **layout))


def subplots(
    rows: int = 1, cols: int = 1, *, titles: Sequence[str] | None = None, **kwargs
) -> go.Figure:
    """``make_subplots`` in the toolkit's template (keyword arguments pass through)."""
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=titles, **kwargs)
    fig.update_layout(template=TEMPLATE_NAME)
    return fig


def save_figure(
    fig: go.Figure,
    path: str | Path,
    *,
    plotlyjs: Literal["directory", "embed"] = "directory",
    png: bool = False,
    scale: float = 2.0,
) -> list[Path]:
    """Write ``fig`` as HTML that opens offline, and optionally as PNG; return the paths written.

    ``plotlyjs="directory"`` writes the plotly.js bundle once as ``plotly.min.js`` beside the
    HTML (many figures in one run directory share it); ``"embed"`` puts it inside the file
    (~4 MB each, but the file stands alone). PNG export needs ``kaleido`` and a Chrome; when they
    are missing the PNG is skipped with a warning.
    """
    path = Path(path)
    html_path = path if path.suffix == ".html" else path.with_suffix(".html")
    if plotlyjs not in ("directory", "embed"):
        raise InterpError(f"plotlyjs must be 'directory' or 'embed', not {plotlyjs!r}.")
    if plotlyjs == "directory":
        bundle = html_path.parent / "plotly.min.js"
        if not bundle.exists():
            from plotly.offline import get_plotlyjs

            atomic_write_text(bundle, get_plotlyjs())
        html = fig.to_html(include_plotlyjs="directory", full_html=True)
    else:
        html = fig.to_html(include_plotlyjs=True, full_html=True)
    written = [atomic_write_text(html_path, html)]
    if png:
        png_path = write_png(fig, html_path.with_suffix(".png"), scale=scale)
        if png_path is not None:
            written.append(png_path)
    return written


def write_png(fig: go.Figure, path: str | Path, *, scale: float = 2.0) -> Path | None:
    """Write a PNG with kaleido; return None (and log a warning) when it cannot."""
    try:
        data = fig.to_image(format="png", scale=scale)
    except Exception as e:  # noqa: BLE001 (no kaleido or Chrome: a PNG is optional)
        log.warning("PNG export skipped for %s (%s). Install kaleido and a Chrome to get it.",
                    path, e)
        return None
    return atomic_write_bytes(path, data)
