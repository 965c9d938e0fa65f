"""The image-likelihood study's claims, figures (the analyses' own plot functions) and report."""

from __future__ import annotations

from pathlib import Path

import plotly.graph_objects as go

from analyses import compression, layout, ood, overlap
from analyses.studies._ood_stages import OODContext, ood_scores
from analyses.studies.common import claim_verdict, write_figure_files
from interp.plots import color_for, figure
from interp.report import Report, format_p

#: The study's acceptance targets (from the issue: the paper's findings at toy scale).
TARGETS = {"max_likelihood_auroc": 0.40, "min_nonlocal_mean": 0.85, "min_nonlocal_seed": 0.80,
           "max_png_ratio": 0.5, "max_best_codec_ratio": 0.85, "subnetwork_auroc_gap": 0.05}

SCORE_LABELS = {"likelihood": "likelihood (full model)", "likelihood_local": "likelihood (local)",
                "nonlocal": "non-local: log p_full − log p_local",
                "input_complexity": "input complexity (PNG)",
                "nonlocal_subnetwork": "non-local via the local subnetwork"}


#: Axis labels (two lines) for the per-score AUROC figure.
SHORT_LABELS = {"likelihood": "likelihood<br>(full)", "likelihood_local": "likelihood<br>(local)",
                "nonlocal": "non-local<br>(full − local)", "input_complexity":
                "input<br>complexity", "nonlocal_subnetwork": "non-local via<br>subnetwork"}


def _claim(holds: bool | None, measured: str, target: str) -> dict:
    return {"holds": holds, "measured": measured, "target": target}


def _seeds(values: list[float]) -> str:
    return ", ".join(f"{v:.3f}" for v in values)


def checks(metrics: dict) -> dict[str, dict]:
    """The paper's claims tested on this run: ``{claim: {holds, measured, target}}``."""
    au, per, bpd = metrics["auroc"], metrics["auroc_per_seed"], metrics["bpd"]
    comp = metrics["compression"]
    lik, nl = per["likelihood"], per["nonlocal"]
    out = {
        "OOD set gets the higher likelihood (local model)": _claim(
            bpd["local_out"] < bpd["local_in"],
            f"{bpd['local_out']:.3f} vs {bpd['local_in']:.3f} bits/dim", "out < in"),
        "raw-likelihood AUROC <= 0.40 (every seed)": _claim(
            max(lik) <= TARGETS["max_likelihood_auroc"],
            f"mean {au['likelihood']:.3f} (seeds {_seeds(lik)})", "<= 0.40"),
        "non-local AUROC mean >= 0.85, no seed < 0.80": _claim(
            au["nonlocal"] >= TARGETS["min_nonlocal_mean"]
            and min(nl) >= TARGETS["min_nonlocal_seed"],
            f"mean {au['nonlocal']:.3f} (seeds {_seeds(nl)}); input complexity "
            f"{au['input_complexity']:.3f}", "mean >= 0.85, min >= 0.80"),
        "round trip bit-exact": _claim(bool(comp["roundtrip_exact"]),
                                       f"{comp['n_images']} images, both decoders",
                                       "every image"),
        "model <= 0.5x per-image PNG": _claim(
            comp["bpd_model"] <= TARGETS["max_png_ratio"] * comp["bpd_png"],
            f"{comp['bpd_model']:.3f} vs PNG {comp['bpd_png']:.3f} bits/dim "
            f"({comp['bpd_model'] / comp['bpd_png']:.2f}x)", "<= 0.5x"),
        "model <= 0.85x the best general codec (whole set)": _claim(
            comp["bpd_model_one_stream"] <= TARGETS["max_best_codec_ratio"]
            * comp["bpd_best_codec"],
            f"one stream {comp['bpd_model_one_stream']:.3f} vs {comp['best_codec']} "
            f"{comp['bpd_best_codec']:.3f} "
            f"({comp['bpd_model_one_stream'] / comp['bpd_best_codec']:.2f}x)", "<= 0.85x"),
    }
    sub = metrics.get("local_subnetwork")
    if sub:
        gap = sub["auroc_nonlocal_local_model_same_seed"] - sub["auroc_nonlocal"]
        out["local subnetwork detects OOD as well as the local model"] = _claim(
            gap <= TARGETS["subnetwork_auroc_gap"],
            f"AUROC {sub['auroc_nonlocal']:.3f} vs {sub['auroc_nonlocal_local_model_same_seed']:.3f}"
            f" (seed {sub['seed']}), {100 * sub['active_fraction']:.1f}% of weights",
            "within 0.05")
    return out


# --------------------------------------------------------------------------- figures


def plot_bpd(metrics: dict) -> go.Figure:
    """Bits/dim of both models on both sets (mean over seeds; seeds as points)."""
    fig = figure(title="Bits per dimension (lower = more likely)", xaxis_title="test set",
                 yaxis_title="bits/dim", barmode="group")
    pair = metrics["pair"]
    for i, model in enumerate(("local", "full")):
        ys = [metrics["bpd"][f"{model}_in"], metrics["bpd"][f"{model}_out"]]
        fig.add_bar(name=f"{model} model", x=[f"in: {pair['in']}", f"out: {pair['out']}"], y=ys,
                    marker_color=color_for(model, i),
                    hovertemplate=f"{model} model<br>%{{x}}: %{{y:.3f}} bits/dim<extra></extra>")
    return fig


def plot_auroc_seeds(metrics: dict) -> go.Figure:
    """AUROC of every score, one point per seed, the mean as a bar."""
    fig = figure(title="OOD detection per score (AUROC, in-distribution = positive)",
                 xaxis_title="score", yaxis_title="AUROC", yaxis_range=[0, 1.02])
    names = list(metrics["auroc_per_seed"])
    labels = [SHORT_LABELS.get(n, n) for n in names]
    fig.add_bar(x=labels, y=[metrics["auroc"][n] for n in names], name="mean over seeds",
                marker_color="#c9d6e8", hovertemplate="%{x}<br>mean AUROC %{y:.3f}<extra></extra>")
    for n, lab in zip(names, labels):
        vals = metrics["auroc_per_seed"][n]
        fig.add_scatter(x=[lab] * len(vals), y=vals, mode="markers", showlegend=False,
                        marker=dict(color="#1f3b73", size=8),
                        text=[f"seed {s}" for s in metrics["seeds"]],
                        hovertemplate="%{x}<br>%{text}: %{y:.3f}<extra></extra>")
    if "nonlocal_subnetwork" in metrics["auroc"]:
        lab = SHORT_LABELS["nonlocal_subnetwork"]
        fig.add_bar(x=[lab], y=[metrics["auroc"]["nonlocal_subnetwork"]], showlegend=False,
                    marker_color="#e8c9c9",
                    hovertemplate="%{x}<br>AUROC %{y:.3f} (first seed)<extra></extra>")
    fig.add_hline(y=0.5, line_dash="dot", annotation_text="chance")
    fig.update_xaxes(tickangle=0)
    return fig


def build_figures(ctx: OODContext, metrics: dict) -> dict[str, go.Figure]:
    r, seed = ctx.results, ctx.cfg.seeds[0]
    first = ood.OODResult.from_dict(r["ood"]["seeds"][str(seed)]["metrics"])
    figs = {
        "bpd": plot_bpd(metrics),
        "auroc": plot_auroc_seeds(metrics),
        "roc": ood.plot_roc(first),
        "histograms": ood.plot_score_histograms(ood_scores(ctx, seed),
                                                names=(ctx.cfg.in_data, ctx.cfg.out_data)),
        "codecs": compression.plot_codecs(compression.CompressionResult.from_dict(
            {k: v for k, v in r["compression"].items() if k != "data"})),
    }
    sub = r.get("subnetwork")
    if sub:
        figs["layout"] = layout.plot_layout(layout.LayoutResult.from_dict(sub["layout"]))
        figs["layout_density"] = layout.plot_layout(
            layout.LayoutResult.from_dict(sub["layout"]), value="fraction_kept")
        figs["overlap_layers"] = overlap.plot_overlap_layers(
            overlap.OverlapResult.from_dict(sub["overlap"]))
    return figs


def write_figures(ctx: OODContext, metrics: dict) -> dict[str, Path]:
    ctx.figures = build_figures(ctx, metrics)
    return write_figure_files(ctx.figures, ctx.out)


# --------------------------------------------------------------------------- report



def _score_rows(metrics: dict) -> list[dict]:
    return [{"score": SCORE_LABELS.get(n, n), "AUROC": metrics["auroc"][n],
             "AUROC per seed": _seeds(metrics["auroc_per_seed"].get(n, [metrics["auroc"][n]])),
             "AUPRC": metrics["auprc"][n], "FPR @ 80% TPR": metrics["fpr_at_80_tpr"][n]}
            for n in metrics["auroc"]]


def write_report(ctx: OODContext, metrics: dict) -> Path:
    """Compose the report from the metrics and the figures built by :func:`write_figures`."""
    cfg, figs, claims = ctx.cfg, ctx.figures, metrics["claims"]
    pair, bpd, au, comp = metrics["pair"], metrics["bpd"], metrics["auroc"], metrics["compression"]
    rep = Report("Local vs full likelihood: OOD detection and lossless compression", subtitle=(
        f"in: {pair['in']} ({pair['n_train']:,} training images) · out: {pair['out']} · seeds "
        f"{', '.join(map(str, cfg.seeds))}" + (" · quick run" if cfg.quick else "")))
    rep.text(
        "A local autoregressive model sees only a small causal neighbourhood of each pixel "
        f"(horizon {cfg.horizon}: the {cfg.horizon} rows above and {cfg.horizon} pixels to the "
        "left). The full model adds gated stacks (dilations "
        f"{', '.join(map(str, cfg.dilations))}: they reach {metrics['full_model']['reach_pixels']} "
        "pixels up and sideways, "
        + ("the whole causal past of these images" if metrics["full_model"]["whole_causal_past"]
           else "NOT the whole causal past of these images") + "); "
        "it starts as the local model plus a zero correction and is then trained as a whole"
        + (f", ending with the moving average of its weights (decay {cfg.full_ema})"
           if cfg.full_ema else "") + ", so "
        "log p_full − log p_local is what training with the non-local past gained over the "
        "local model (Zhang et al. 2021's non-local score). The questions: does the "
        "likelihood's out-of-distribution failure live in the local part, does the non-local "
        "part detect OOD, how well does the local model compress, and which part of the full "
        "model makes the local prediction?")
    rep.kpis([
        ("raw-likelihood AUROC", au["likelihood"],
         claims["raw-likelihood AUROC <= 0.40 (every seed)"]["holds"]),
        ("non-local AUROC", au["nonlocal"],
         claims["non-local AUROC mean >= 0.85, no seed < 0.80"]["holds"]),
        ("input-complexity AUROC", au["input_complexity"], None),
        ("model bits/dim (compression)", comp["bpd_model"],
         claims["model <= 0.5x per-image PNG"]["holds"]),
        ("PNG bits/dim", comp["bpd_png"], None),
        ("round trip exact", "yes" if comp["roundtrip_exact"] else "NO",
         claims["round trip bit-exact"]["holds"]),
    ])
    rep.table([{"claim": k, "holds": claim_verdict(c["holds"]), "measured": c["measured"],
                "target": c["target"]} for k, c in claims.items()],
              caption="Claims checked on this run, as measured.")

    rep.heading("1. Likelihoods")
    rep.text(
        f"Mean bits/dim over seeds. Local: {bpd['local_in']:.3f} on {pair['in']}, "
        f"{bpd['local_out']:.3f} on {pair['out']}; full: {bpd['full_in']:.3f} and "
        f"{bpd['full_out']:.3f}. Lower bits/dim is higher likelihood.")
    rep.figure(figs["bpd"])

    rep.heading("2. OOD detection")
    rep.text(
        "Scores are higher for 'more in-distribution'. Likelihood: −bits/dim of the full "
        "model. Non-local: bits/dim of the local model minus the full model's. Input complexity "
        "(Serra et al. 2020): the PNG code length minus the model's NLL, per dimension. "
        f"Typicality (Nalisnick et al. 2019) scores batches of {cfg.typicality_batch} images: "
        f"AUROC {metrics['typicality']['auroc']:.3f} (seeds "
        f"{_seeds(metrics['typicality']['auroc_per_seed'])}).")
    rep.figure(figs["auroc"])
    rep.table(_score_rows(metrics))
    rep.figure(figs["roc"], f"ROC curves of seed {cfg.seeds[0]}.")
    rep.figure(figs["histograms"], f"Score distributions of seed {cfg.seeds[0]}.")

    rep.heading("3. Lossless compression")
    rep.text(
        f"A local model ({cfg.compress_head} head) trained on {cfg.compress_train:,} "
        f"{comp['data']} images compresses {comp['n_images']:,} test images. Coding uses an "
        "integer version of the network (exact arithmetic, so decoding reproduces the encoder's "
        "distributions on any thread count and batch) and constriction's ANS coder. Float "
        f"model NLL {comp['bpd_float_nll']:.3f}, quantized model NLL "
        f"{comp['bpd_quantized_nll']:.3f}, real code length {comp['bpd_model']:.3f} bits/dim. "
        f"Encode {comp['encode_images_per_s']:.0f} images/s; decode "
        f"{comp['decode_images_per_s']:.0f} images/s (wavefront) and "
        f"{comp['decode_sequential_images_per_s']:.0f} images/s (sequential).")
    rep.figure(figs["codecs"])
    rep.table(compression.CompressionResult.from_dict(
        {k: v for k, v in ctx.results["compression"].items() if k != "data"}).table())

    sub = metrics.get("local_subnetwork")
    if sub:
        ov = ctx.results["subnetwork"]["overlap"]
        rep.heading("4. The local subnetwork inside the full model")
        rep.text(
            "A mask over every convolution kernel of the full model (seed "
            f"{sub['seed']}), trained so the masked model predicts like the local model (KL, "
            f"λ = {cfg.mask_lambda:g}, {cfg.mask_steps} steps): the image analogue of a bigram "
            f"subnetwork. It keeps {100 * sub['active_fraction']:.2f}% of the kernels' weights "
            f"(final KL to the local model {sub['final_kl_bits']:.3f} bits/dim). A second mask "
            "trained the same way to predict like the full model itself (the optimal "
            f"subnetwork) keeps {100 * sub['optimal_active_fraction']:.2f}%. Used as the "
            "local model in the non-local score, the subnetwork gives AUROC "
            f"{sub['auroc_nonlocal']:.3f} (the separate local model: "
            f"{sub['auroc_nonlocal_local_model_same_seed']:.3f}).")
        rep.figure(figs["layout"], "Share of the subnetwork's weights per layer and part.")
        rep.figure(figs["layout_density"], "Fraction of each part's weights it keeps.")
        rep.text(
            f"Overlap with the optimal subnetwork: {ov['ratio']:.2f}x chance "
            f"({format_p(ov['p_value'])}), layer by layer against the same exact null:")
        rep.figure(figs["overlap_layers"])

    rep.heading("Run")
    rep.table([{"stage": k, "seconds": v} for k, v in metrics["timings"].items()],
              caption=f"Total {sum(metrics['timings'].values()):.0f} s.")
    rep.preformatted("\n".join(f"{k} = {v}" for k, v in cfg.to_dict().items()))
    return rep.write(ctx.out / "report.html")

