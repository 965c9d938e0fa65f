"""Shared figure helpers: one plotly template, one colour per subnetwork kind, offline saving.

Every analysis builds its figures with :func:`figure` or :func:`subplots` so they look alike,
picks trace colours with :func:`color_for` (the full model, bigram, random and optimal
subnetworks always get the same colours), and writes them with :func:`save_figure`, which works
without a network: the plotly.js bundle is embedded or written once next to the HTML files.
Static PNG/SVG copies (:func:`export_image`) need ``kaleido`` and a Chrome; without them the
error says what to install.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import plotly.graph_objects as go
import plotly.io as pio
from plotly.subplots import make_subplots

from interp.errors import ConfigError, InterpError, MissingDependencyError, check_number
from interp.io import atomic_write_text

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
    svg: bool = False,
    scale: float = 2.0,
) -> list[Path]:
    """Write ``fig`` as HTML that opens offline, and optionally as PNG and SVG beside it;
    return the paths written (HTML first).

    ``plotlyjs="directory"`` writes the plotly.js bundle once as ``plotly.min.js`` beside the
    HTML (many figures in one run directory share it); ``"embed"`` puts it inside the file
    (~4 MB each, but the file stands alone). ``png``/``svg`` export static images with
    :func:`export_image` (one browser start for both); without ``kaleido`` and a Chrome that
    raises :class:`~interp.errors.MissingDependencyError` saying what to install, after the
    HTML is written.
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
    static = [html_path.with_suffix(f".{fmt}") for fmt, on in (("png", png), ("svg", svg)) if on]
    if static:
        written += export_image(fig, static, scale=scale)
    return written


#: Static formats :func:`export_image` writes (from the file suffix).
STATIC_FORMATS: tuple[str, ...] = ("png", "svg", "pdf", "jpeg", "webp")

_CHROME = ("Install Chrome or Chromium (Debian/Ubuntu: apt-get install chromium), or set "
           "BROWSER_PATH to the browser's executable.")
_HTML_ONLY = "save_figure(fig, path) without png/svg writes HTML, which needs neither."


def export_image(fig: go.Figure, paths: str | Path | Sequence[str | Path], *,
                 scale: float = 2.0) -> list[Path]:
    """Write ``fig`` as static images, one per path, in the format of each path's suffix
    (``.png``, ``.svg``, ``.pdf``, ``.jpeg``, ``.webp``); return the paths.

    Uses ``kaleido`` (1.x), which drives a headless Chrome: all paths share one browser start
    (a few seconds), and each file appears whole or not at all. Without kaleido, or without
    a Chrome it can find, raises :class:`~interp.errors.MissingDependencyError` naming what to
    install; an unknown suffix raises :class:`~interp.errors.ConfigError`.
    """
    paths = [Path(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]
    formats = [p.suffix.lower().lstrip(".").replace("jpg", "jpeg") for p in paths]
    for p, fmt in zip(paths, formats):
        if fmt not in STATIC_FORMATS:
            raise ConfigError(f"Cannot export {str(p)!r} as an image: its suffix must be one of "
                              f"{', '.join('.' + f for f in STATIC_FORMATS)}.")
    names = ", ".join(p.name for p in paths)
    try:
        import kaleido
    except ImportError as e:
        raise MissingDependencyError(
            f"Exporting {names} needs the kaleido package, which is not installed: pip install "
            f"'kaleido>=1' in this environment. It also needs a Chrome: {_CHROME} "
            f"{_HTML_ONLY}") from e
    check_number("scale", scale, low=0, low_open=True)
    figure_dict = fig.to_dict()
    width = fig.layout.width or pio.defaults.default_width
    height = fig.layout.height or pio.defaults.default_height
    parents = {p.parent for p in paths}
    for parent in parents:
        parent.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        tmp = {parent: Path(stack.enter_context(tempfile.TemporaryDirectory(
            dir=parent, prefix=".export-"))) for parent in parents}
        staged = [tmp[p.parent] / p.name for p in paths]
        specs = [dict(fig=figure_dict, path=str(s),
                      opts=dict(format=fmt, width=width, height=height, scale=scale))
                 for s, fmt in zip(staged, formats)]
        try:
            # mathjax off: its default is a CDN script, and figures here use no LaTeX
            kaleido.write_fig_from_object_sync(specs, kopts={"mathjax": False})
        except Exception as e:  # noqa: BLE001 (kaleido and the browser raise many kinds)
            if any(c.__name__ == "ChromeNotFoundError" for c in type(e).__mro__):
                raise MissingDependencyError(
                    f"Exporting {names} needs a Chrome or Chromium browser, and kaleido found "
                    f"none. {_CHROME} {_HTML_ONLY}") from e
            raise InterpError(f"Exporting {names} with kaleido failed: {type(e).__name__}: "
                              f"{e}. The HTML export (save_figure without png/svg) does not "
                              "need kaleido.") from e
        for s, p in zip(staged, paths):
            if not s.is_file() or s.stat().st_size == 0:
                raise InterpError(f"kaleido wrote nothing for {str(p)!r}; the browser may have "
                                  "failed to render the figure. Try again, or export HTML.")
            os.replace(s, p)
    log.info("exported %s", names)
    return paths


def theme_problems(fig: go.Figure) -> list[str]:
    """What ``fig`` lacks to follow the toolkit's figure conventions (empty when nothing).

    The conventions: the toolkit's template, a title, an axis title on every labelled axis
    (one per row of subplots suffices for y axes that share a row, one per column for x
    axes), and explicit hover text on every trace (``hovertemplate``, or ``hoverinfo``
    ``"skip"`` / ``"none"`` for decoration) so hovering names what a point is (its layer,
    head, block or image) and its unit, not only raw coordinates.
    """
    problems = []
    if fig.layout.template != TEMPLATE:
        problems.append("not in the interp template (build it with interp.plots.figure or "
                        "subplots)")
    if not (fig.layout.title and fig.layout.title.text):
        problems.append("no title")
    for letter in ("x", "y"):
        groups: dict[tuple, list] = {}
        for trace in fig.data:
            if f"{letter}axis" not in trace:
                continue
            ref = getattr(trace, f"{letter}axis", None) or letter
            axis = fig.layout[f"{letter}axis{ref[1:]}"]
            if axis.showticklabels is False or axis.visible is False:
                continue
            groups.setdefault(tuple(axis.domain or (0, 1)), []).append(axis)
        for domain, axes in groups.items():
            if not any(a.title and a.title.text for a in axes):
                problems.append(f"a {letter} axis (domain {domain[0]:.2f}-{domain[1]:.2f}) "
                                "has no title")
    for i, trace in enumerate(fig.data):
        if getattr(trace, "hoverinfo", None) in ("skip", "none"):
            continue
        if not getattr(trace, "hovertemplate", None):
            problems.append(f"trace {i} ({trace.type} {trace.name or ''!r}) has no "
                            "hovertemplate")
    return problems
