"""Shared figure helpers: fixed colours per subnetwork kind, offline HTML, static export with
kaleido (both when it works and when it is missing), and one theme across every analysis
figure."""

from __future__ import annotations

import re
from pathlib import Path

import plotly.graph_objects as go
import pytest
from plotly.offline import get_plotlyjs

from interp.errors import ConfigError, InterpError, MissingDependencyError
from interp.plots import (
    COLORS,
    SEQUENCE,
    TEMPLATE,
    color_for,
    export_image,
    figure,
    save_figure,
    subplots,
    theme_problems,
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


# --------------------------------------------------------------------------- static export


def _fake_kaleido(monkeypatch, fail: Exception | None = None):
    """Replace kaleido by a stand-in that records the specs and writes marker bytes."""
    import sys
    import types

    calls = []

    def write_fig_from_object_sync(specs, kopts=None):
        calls.append((list(specs), kopts))
        if fail is not None:
            raise fail
        for spec in specs:
            Path(spec["path"]).write_bytes(f"{spec['opts']['format']}:{spec['opts']['scale']}"
                                           .encode())

    monkeypatch.setitem(sys.modules, "kaleido", types.SimpleNamespace(
        write_fig_from_object_sync=write_fig_from_object_sync))
    return calls


def test_static_export_writes_every_format_in_one_browser_start(tmp_path, monkeypatch):
    calls = _fake_kaleido(monkeypatch)
    fig = figure(title="t", width=640, height=300)
    paths = save_figure(fig, tmp_path / "out" / "f", png=True, svg=True, scale=3)
    assert [p.name for p in paths] == ["f.html", "f.png", "f.svg"]
    assert (tmp_path / "out" / "f.png").read_bytes() == b"png:3"
    assert (tmp_path / "out" / "f.svg").read_bytes() == b"svg:3"
    (specs, kopts), = calls  # one kaleido session (one Chrome start) for both files
    assert kopts == {"mathjax": False}  # no CDN script requested
    assert [(s["opts"]["width"], s["opts"]["height"]) for s in specs] == [(640, 300)] * 2
    assert all(".export-" in s["path"] for s in specs)  # staged, then renamed into place
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "f.html", "f.png", "f.svg", "plotly.min.js"]  # no staging directory left behind
    (pdf,) = export_image(fig, tmp_path / "g.PDF")
    assert pdf.read_bytes() == b"pdf:2.0"
    with pytest.raises(ConfigError, match=r"\.png, \.svg"):
        export_image(fig, tmp_path / "g.gif")


def test_static_export_without_kaleido_says_what_to_install(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "kaleido", None)  # import kaleido -> ImportError
    fig = figure(title="t")
    with pytest.raises(MissingDependencyError, match="pip install 'kaleido>=1'") as err:
        save_figure(fig, tmp_path / "f.html", png=True)
    assert isinstance(err.value, ImportError) and "apt-get install chromium" in str(err.value)
    assert "f.png" in str(err.value)
    assert (tmp_path / "f.html").is_file() and not (tmp_path / "f.png").exists()  # HTML kept


def test_static_export_without_chrome_says_what_to_install(tmp_path, monkeypatch):
    class ChromeNotFoundError(RuntimeError):  # what kaleido raises (choreographer's class)
        pass

    _fake_kaleido(monkeypatch, fail=ChromeNotFoundError("no chrome"))
    with pytest.raises(MissingDependencyError, match="Chrome or Chromium") as err:
        export_image(figure(title="t"), tmp_path / "f.svg")
    assert "apt-get install chromium" in str(err.value) and "BROWSER_PATH" in str(err.value)
    assert list(tmp_path.iterdir()) == []  # nothing half-written
    _fake_kaleido(monkeypatch, fail=ValueError("bad figure"))
    with pytest.raises(InterpError, match="kaleido failed: ValueError: bad figure"):
        export_image(figure(title="t"), tmp_path / "f.svg")


def _real_exporter() -> str | None:
    """Why a real export cannot run here, or None when kaleido and a Chrome are present."""
    import importlib.util
    import os
    import shutil

    if importlib.util.find_spec("kaleido") is None:
        return "kaleido is not installed"
    browsers = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
    if not os.environ.get("BROWSER_PATH") and not any(shutil.which(b) for b in browsers):
        return "no Chrome or Chromium on PATH"
    return None


@pytest.mark.skipif(_real_exporter() is not None, reason=f"real export: {_real_exporter()}")
def test_real_static_export(tmp_path):
    fig = figure(title="a figure", xaxis_title="step", yaxis_title="loss (nats)")
    fig.add_trace(go.Bar(x=["a", "b"], y=[1, 2], name="bigram", hovertemplate="%{y}"))
    html, png, svg = save_figure(fig, tmp_path / "f", png=True, svg=True, scale=1)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (700, 500)  # plotly's default size at scale 1
    text = svg.read_text()
    assert text.startswith("<svg") and "a figure" in text and "loss (nats)" in text


# --------------------------------------------------------------------------- one theme


def test_theme_problems_names_what_a_figure_lacks():
    bare = go.Figure(go.Scatter(x=[0, 1], y=[0, 1]))
    problems = theme_problems(bare)
    assert any("template" in p for p in problems) and "no title" in problems
    assert sum("axis" in p and "no title" in p for p in problems) == 2
    assert any("hovertemplate" in p for p in problems)
    good = figure(title="t", xaxis_title="x (units)", yaxis_title="y (units)")
    good.add_trace(go.Scatter(x=[0, 1], y=[0, 1], hovertemplate="%{x}: %{y}"))
    good.add_trace(go.Scatter(x=[0, 1], y=[1, 0], hoverinfo="skip"))  # decoration
    assert theme_problems(good) == []
    # subplots: one y title per row is enough, every column needs its x title
    sub = subplots(1, 2, titles=["a", "b"])
    sub.update_layout(title="t")
    for col in (1, 2):
        sub.add_trace(go.Scatter(x=[0], y=[0], hovertemplate="%{y}"), row=1, col=col)
    sub.update_yaxes(title_text="y", row=1, col=1)
    sub.update_xaxes(title_text="x", row=1, col=1)
    assert theme_problems(sub) == ["a x axis (domain 0.55-1.00) has no title"]


def _masks(seed: int) -> dict:
    import torch

    gen = torch.Generator().manual_seed(seed)
    return {name: torch.rand(shape, generator=gen) < 0.2
            for name, shape in (("blocks.0.attn.q", (8, 8)), ("blocks.0.mlp.in", (16, 8)),
                                ("blocks.1.attn.q", (8, 8)), ("blocks.1.mlp.in", (16, 8)))}


def _analysis_figures() -> dict[str, go.Figure]:
    """Every figure function of analyses/ on small hand-made results."""
    import numpy as np

    from analyses import (
        ablation,
        checkpoints,
        compression,
        layout,
        ood,
        overlap,
        residual,
        sufficiency,
        sweep,
    )

    a, b = _masks(0), _masks(1)
    lay = layout.layout_analysis(a, label="bigram")
    ov = overlap.overlap_analysis(a, b, label_a="bigram", label_b="optimal")
    res = [residual.ResidualResult(
        label=label, layers=["emb", "1", "2"], n_tokens=10, alpha=1.0,
        rotation_to_input=[0.0, 40.0, 60.0], rotation_to_output=[60.0, 30.0, 0.0],
        r2_to_input=[1.0, 0.8, 0.6], r2_to_output=[0.5, 0.7, 1.0],
        cos_embed_current=[0.9, 0.5, 0.3], cos_unembed_next=[0.1, 0.3, 0.5],
        cos_embed_shuffled=[0.0, 0.0, 0.0], cos_unembed_shuffled=[0.0, 0.1, 0.1],
        cov_similarity=[[1.0, 0.5, 0.2], [0.5, 1.0, 0.6], [0.2, 0.6, 1.0]])
        for label in ("full model", "bigram subnetwork")]
    suff = {label: sufficiency.SufficiencyResult(
        surprisal_r=r, surprisal_r_capped=r - 0.05, surprisal_r_smoothed=r - 0.02,
        ce_to_bigram=4.0, kl_to_bigram=0.5, n_tokens=100, n_finite=95, n_seen=95,
        n_smoothed=100, mean_surprisal=3.5, sample_model=[1.0, 2.0, 3.0],
        sample_bigram=[1.1, 2.2, 2.9]) for label, r in (("full model", 0.8), ("bigram", 0.95))}
    entries = [sweep.SweepEntry(lam=lam, active_fraction=f, surprisal_r=r, path=f"m{lam}")
               for lam, f, r in ((0.0, 0.5, 0.96), (1.0, 0.1, 0.95))]
    ck = checkpoints.CheckpointsResult(lam=1.0, entries=[checkpoints.CheckpointEntry(
        step=s, val_loss=3.0, full_r=0.8, subnetwork_r=0.9, active_fraction=0.1,
        block_shares={"q": 0.1, "mlp_in": 0.9}) for s in (100, 200)], overlaps=[ov])
    comp = compression.CompressionResult(
        n_images=4, channels=1, height=8, width=8, head="categorical", horizon=3,
        weight_bits=12, stream_bpd=1.5, payload_bpd=1.4, set_stream_bpd=1.3,
        quantized_nll_bpd=1.29, float_nll_bpd=1.28, quantization_gap=0.01,
        coder_overhead=0.02, codec_bpd={"png": 2.8, "zlib": 2.0}, roundtrip_exact=True,
        encode_images_per_s=100.0, decode_images_per_s={"wavefront": 50.0})
    rng = np.random.default_rng(0)
    scores = {"likelihood": (rng.normal(0, 1, 50), rng.normal(1, 1, 40)),
              "nonlocal": (rng.normal(1, 1, 50), rng.normal(0, 1, 40))}
    nec = ablation.NecessityResult(3.0, {"bigram": 3.6, "random": 3.05},
                                   {"bigram": 100, "random": 100}, 640)
    return {
        "necessity": ablation.plot_necessity(nec),
        "checkpoint_r": checkpoints.plot_checkpoint_r(ck),
        "checkpoint_layout": checkpoints.plot_checkpoint_layout(ck),
        "checkpoint_overlap": checkpoints.plot_checkpoint_overlap(ck),
        "codecs": compression.plot_codecs(comp),
        "layout": layout.plot_layout(lay),
        "layout_density": layout.plot_layout(lay, value="fraction_kept"),
        "roc": ood.plot_roc(ood.evaluate_scores(scores, in_label="photos", out_label="digits")),
        "histograms": ood.plot_score_histograms(scores, names=("photos", "digits")),
        "overlap": overlap.plot_overlap(ov),
        "overlap_layers": overlap.plot_overlap_layers(ov),
        "overlap_blocks": overlap.plot_overlap_blocks(ov),
        "rotations": residual.plot_rotations(res),
        "cosines": residual.plot_cosines(res),
        "cov_similarity": residual.plot_cov_similarity(res),
        "sufficiency": sufficiency.plot_sufficiency(suff),
        "sufficiency_r": sufficiency.plot_sufficiency_r(suff),
        "sweep": sweep.plot_sweep(sweep.SweepResult(entries, selected_lambda=1.0)),
    }


def test_every_analysis_figure_follows_the_theme():
    figs = _analysis_figures()
    problems = {name: theme_problems(fig) for name, fig in figs.items()}
    assert {k: v for k, v in problems.items() if v} == {}
    # hover text names layers and blocks, not bare indices
    rot = figs["rotations"].data[0]
    assert list(rot.customdata) == ["embeddings", "layer 1 (after block 0)",
                                    "layer 2 (after block 1)"]
    assert "%{customdata}" in rot.hovertemplate and "degrees" in rot.hovertemplate
    cov = figs["cov_similarity"].data[0]
    assert cov.customdata[0][2] == "embeddings vs layer 2 (after block 1)"
    assert "%{y}" in figs["layout"].data[0].hovertemplate  # the layer ("layer 0")
    assert list(figs["layout"].data[0].y) == ["layer 0", "layer 1"]
    assert "nats/token" in figs["necessity"].data[0].hovertemplate
    assert list(figs["necessity"].data[0].hovertext) == [
        "nothing removed", "100 weights removed", "100 weights removed"]
