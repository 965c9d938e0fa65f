"""The bigram study's figures (the analyses' own plot functions), claims and ``report.html``."""

from __future__ import annotations

import re
from pathlib import Path

import plotly.graph_objects as go

from analyses import ablation, layout, overlap, residual, sufficiency, sweep
from analyses import checkpoints as ckpt_analysis
from analyses.studies._bigram_stages import StudyContext
from analyses.studies.common import claim_verdict, write_figure_files
from interp.report import Report, format_p

#: The study's acceptance targets (from the paper's findings at toy scale).
TARGETS = {"min_r": 0.9, "max_active": 0.10, "min_ablation_ratio": 5.0, "max_overlap_p": 0.01}


def _increase(ab: dict, key: str) -> float:
    return ab[f"loss_without_{key}"] - ab["loss_full"]


def _claim(holds: bool | None, measured: str, target: str) -> dict:
    return {"holds": holds, "measured": measured, "target": target}


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def checks(metrics: dict) -> dict[str, dict]:
    """The paper's claims tested on this run: ``{claim: {holds, measured, target}}``.

    ``holds`` is None where the run cannot check the claim (e.g. removing the random
    subnetwork did not raise the loss, so no ratio to it exists).
    """
    big, full, ab = metrics["bigram_subnetwork"], metrics["full_model"], metrics["ablation"]
    ov, lay = metrics["overlap"], metrics["layout"]
    rnd, bgm = _increase(ab, "random"), _increase(ab, "bigram")
    if rnd > 0:
        ratio = bgm / rnd
        removal = _claim(ratio >= TARGETS["min_ablation_ratio"],
                         f"{ratio:.1f}x (+{bgm:.3f} vs +{rnd:.3f} nats)", ">= 5x")
    else:
        removal = _claim(None, f"n/a: removing the random subnetwork changed the loss by "
                               f"{rnd:+.4f} nats (bigram: {bgm:+.3f})", ">= 5x")
    kept = lay["kind_share"] or {}
    first = lay["layers"][0] if lay["layers"] else None
    return {
        "bigram r >= 0.9": _claim(big["surprisal_r"] >= TARGETS["min_r"],
                                  f"{big['surprisal_r']:.3f}", ">= 0.9"),
        "active <= 10%": _claim(big["active_fraction"] <= TARGETS["max_active"],
                                f"{100 * big['active_fraction']:.2f}%", "<= 10%"),
        "full-model r below subnetwork r": _claim(
            full["surprisal_r"] < big["surprisal_r"],
            f"{full['surprisal_r']:.3f} vs {big['surprisal_r']:.3f}", "full < subnetwork"),
        "removal hurts >= 5x random": removal,
        "overlap with optimal above chance (p < 0.01)": _claim(
            ov["ratio"] > 1 and ov["p_value"] < TARGETS["max_overlap_p"],
            f"{ov['ratio']:.2f}x chance, {format_p(ov['p_value'])}", "> 1x, p < 0.01"),
        "plurality in layer 0": _claim(
            lay["plurality_in_first_layer"],
            f"most kept weights in layer {lay['plurality_layer']} "
            f"({_pct(max(lay['layer_share'], key=lambda v: v or 0, default=None))})",
            f"layer {first}"),
        "plurality in the first MLP": _claim(
            lay["plurality_in_first_mlp"],
            f"largest group: {lay['plurality_group']}; first-MLP share "
            f"{_pct(lay['first_mlp_share'])}; MLP {_pct(lay['mlp_share'])}, V+O "
            f"{_pct(lay['vo_share'])}, Q+K {_pct(lay['qk_share'])} "
            f"({', '.join(f'{k} {_pct(v)}' for k, v in kept.items())})",
            f"layer {first} MLP"),
    }


# --------------------------------------------------------------------------- figures


def build_figures(ctx: StudyContext) -> dict[str, go.Figure]:
    """Every figure of the study, by name, drawn by the analyses' plot functions."""
    r = ctx.results
    suff = {f"{k} model" if k == "full" else f"{k} subnetwork": v
            for k, v in r["sufficiency"].items()}
    controls = r.get("controls") or {}
    if "embeddings_only" in controls:
        suff["embeddings only"] = controls["embeddings_only"]
    if "random_init" in controls:
        suff["subnetwork of an untrained model"] = controls["random_init"]["subnetwork"]
    res = {k: residual.ResidualResult.from_dict(v) for k, v in r["residual"].items()}
    lay = {k: layout.LayoutResult.from_dict(v) for k, v in r["layout"].items()}
    ov = overlap.OverlapResult.from_dict(r["overlap"])
    figs = {
        "sweep": sweep.plot_sweep(ctx.sweep),
        "sufficiency": sufficiency.plot_sufficiency_r(suff),
        "ablation": ablation.plot_necessity(ablation.NecessityResult.from_dict(r["ablation"])),
        "layout": layout.plot_layout(lay["bigram"]),
        "layout_density": layout.plot_layout(lay["bigram"], value="fraction_kept"),
        "layout_optimal": layout.plot_layout(lay["optimal"]),
        "overlap": overlap.plot_overlap(ov),
        "overlap_layers": overlap.plot_overlap_layers(ov),
        "overlap_blocks": overlap.plot_overlap_blocks(ov),
        "rotations": residual.plot_rotations(list(res.values())),
        "cosines": residual.plot_cosines(list(res.values())),
        "cov_similarity": residual.plot_cov_similarity(list(res.values())),
    }
    if r.get("checkpoints"):
        cres = ckpt_analysis.CheckpointsResult.from_dict(r["checkpoints"])
        figs["checkpoints_r"] = ckpt_analysis.plot_checkpoint_r(cres)
        figs["checkpoints_layout"] = ckpt_analysis.plot_checkpoint_layout(cres)
        if cres.overlaps:
            figs["checkpoints_overlap"] = ckpt_analysis.plot_checkpoint_overlap(cres)
    return figs


def write_figures(ctx: StudyContext) -> dict[str, Path]:
    ctx.figures = build_figures(ctx)
    return write_figure_files(ctx.figures, ctx.out)


# --------------------------------------------------------------------------- report



def write_report(ctx: StudyContext, metrics: dict) -> Path:
    """Compose the report from the metrics and the figures built by :func:`write_figures`."""
    cfg, figs, res = ctx.cfg, ctx.figures, ctx.results
    big, full, opt = metrics["bigram_subnetwork"], metrics["full_model"], metrics["optimal_subnetwork"]
    ab, ov, lay, rec = metrics["ablation"], metrics["overlap"], metrics["layout"], metrics["recipe"]
    claims = metrics["claims"]
    rnd = _increase(ab, "random")

    rep = Report("Bigram subnetworks", subtitle=(
        f"model {metrics['model'].get('source')} · corpus {metrics['corpus']['name']} "
        f"({metrics['corpus']['train_tokens']:,} training tokens, vocabulary "
        f"{metrics['corpus']['vocab_size']:,}) · recipe {rec['name']} · seed {cfg.seed}"
        + (" · quick run" if cfg.quick else "")))
    rep.text(
        "A bigram subnetwork is a subset of a language model's attention and MLP weights that, "
        "with the embeddings, unembedding, biases and norms, predicts the next token from the "
        "current token alone (Chang & Bergen, 2025). This run trains masks over every attention "
        "and MLP weight matrix with continuous sparsification, for a range of sparsity weights "
        "λ, and asks: are they sufficient (do they reproduce the bigram model?), necessary "
        "(does removing them break the model?), where do they sit, and how do they shape the "
        "residual stream?")
    rep.kpis([
        ("bigram subnetwork r", big["surprisal_r"], claims["bigram r >= 0.9"]["holds"]),
        ("full model r", full["surprisal_r"], claims["full-model r below subnetwork r"]["holds"]),
        ("active masked weights (%)", 100 * big["active_fraction"],
         claims["active <= 10%"]["holds"]),
        ("selected λ", big["lambda"], None),
        ("loss increase: bigram / random removal",
         _increase(ab, "bigram") / rnd if rnd > 0 else float("nan"),
         claims["removal hurts >= 5x random"]["holds"]),
        ("overlap with optimal (x chance)", ov["ratio"],
         claims["overlap with optimal above chance (p < 0.01)"]["holds"]),
        ("plurality", lay["plurality_group"] or "n/a",
         claims["plurality in the first MLP"]["holds"]),
    ])
    rep.table([{"claim": k, "holds": claim_verdict(c["holds"]), "measured": c["measured"],
                "paper / target": c["target"]} for k, c in claims.items()],
              caption="The paper's claims, checked on this run (as measured; 'n/a' where the "
                      "run cannot check a claim).")
    overrides = rec["overrides"]
    rep.text(
        f"Mask-training recipe **{rec['name']}**: {rec['description']}. Used here: lr "
        f"{rec['mask_lr']:g}, temperature x{rec['temperature_factor']:g} per step, at most "
        f"{rec['mask_steps']:,} steps of {rec['mask_batch']} sequences, "
        f"{rec['spike_retries'] + 1} attempt(s) on a loss spike, λ in "
        f"{', '.join(f'{x:g}' for x in rec['lambdas'])}"
        + (f" (overridden: {', '.join(f'{k} = {v}' for k, v in overrides.items())})"
           if overrides else "") + ". Every subnetwork of the run, at every checkpoint, is "
        "trained with this recipe and budget.")

    rep.heading("1. Sparsity sweep and selection")
    rep.text(
        "One subnetwork per λ. The analysed subnetwork is the sparsest whose surprisal "
        f"correlation is within {cfg.tolerance} of the least-regularised one (the paper's rule).")
    rep.figure(figs["sweep"], "Each point is one trained subnetwork; the star is the selection.")
    rep.table(ctx.sweep.rows())

    rep.heading("2. Sufficiency")
    rep.text(
        "Pearson r between per-token surprisals of each network and of the bigram model on "
        "held-out text. The bigram model is the paper's: raw counts, and a current token never "
        "seen in training backs off to the unigram. Headline r is the paper's drop-infinite "
        "variant: every token whose bigram surprisal is finite (only a seen context followed "
        "by a token it never preceded is dropped). The paper's other variant caps infinite "
        "surprisals at the largest finite one and scores every token. The smoothed variant "
        "(bigram mixed 0.99 / 0.01 with the unigram) is this project's, not the paper's.")
    rep.figure(figs["sufficiency"])
    rows = [{"network": k, "r (drop-infinite)": v["surprisal_r"],
             "r (capped)": v.get("surprisal_r_capped", float("nan")),
             "r (smoothed, this project)": v.get("surprisal_r_smoothed", float("nan")),
             "tokens scored": f"{v.get('n_finite', 0):,} / {v.get('n_tokens', 0):,}",
             "CE to bigram": v.get("ce_to_bigram", float("nan"))}
            for k, v in res["sufficiency"].items()]
    rep.table(rows)
    controls = res.get("controls") or {}
    if controls:
        text = []
        if "embeddings_only" in controls:
            text.append(f"the embeddings alone (empty subnetwork) reach r = "
                        f"{controls['embeddings_only']['surprisal_r']:.3f}")
        if "random_init" in controls:
            ri = controls["random_init"]
            text.append(f"a bigram subnetwork trained inside a randomly initialised copy of the "
                        f"model reaches r = {ri['subnetwork']['surprisal_r']:.3f} with "
                        f"{100 * ri['active_fraction']:.2f}% active")
        rep.text("Controls: " + "; ".join(text) + ".")

    rep.heading("3. Necessity")
    rep.text(
        f"Validation loss of the full model ({ab['loss_full']:.3f} nats/token) and with a "
        "subnetwork removed (its complement kept): the bigram subnetwork, a random subnetwork "
        "with the same number of weights in every block, and the optimal-pruning subnetwork "
        f"({100 * opt['active_fraction']:.2f}% active, trained to match the full model).")
    if rnd <= 0:
        rep.text(f"Removing the random subnetwork changed the loss by {rnd:+.4f} nats (not an "
                 "increase), so the bigram-to-random ratio is undefined and the 5x claim is "
                 "marked not checkable.")
    rep.figure(figs["ablation"])
    gen = res.get("generation") or {}
    if gen:
        rep.text("Generations from the same prompt, with and without the bigram subnetwork:")
        rep.preformatted(_format_generations(gen))

    rep.heading("4. Where the subnetwork sits")
    rep.text(
        f"The most kept weights are in layer {lay['plurality_layer']} "
        f"(plurality in layer 0: {claim_verdict(lay['plurality_in_first_layer'])}); the largest "
        f"(layer, attention/MLP) group is {lay['plurality_group']} (plurality in the first "
        f"MLP: {claim_verdict(lay['plurality_in_first_mlp'])}). Shares say where the subnetwork's "
        "weights are; densities say how much of each block it keeps.")
    rep.figure(figs["layout"], "Share of the bigram subnetwork's weights per layer and block.")
    rep.figure(figs["layout_density"], "Fraction of each block's weights the subnetwork keeps.")
    rep.table(layout.LayoutResult.from_dict(res["layout"]["bigram"]).rows(),
              caption="Per layer: kept weights, share of the subnetwork, density of the layer.")
    rep.figure(figs["layout_optimal"], "The same for the optimal-pruning subnetwork.")

    rep.heading("5. Overlap with the optimal subnetwork")
    rep.text(
        f"The two subnetworks share {100 * ov['observed_fraction']:.3f}% of all masked weights; "
        f"random pairs with the same count per block would share "
        f"{100 * ov['expected_fraction']:.3f}% ({ov['ratio']:.2f}x, {format_p(ov['p_value'])}). "
        f"{100 * (ov['share_bigram_in_optimal'] or 0):.1f}% of the bigram subnetwork lies inside "
        "the optimal one. Layer by layer, against the same exact null restricted to each layer:")
    rep.figure(figs["overlap"])
    rep.figure(figs["overlap_layers"])
    rep.table(overlap.OverlapResult.from_dict(res["overlap"]).layer_rows())
    rep.figure(figs["overlap_blocks"])

    rep.heading("6. Residual stream: current token vs next token")
    rep.text(
        "Per layer (0 = embeddings; the last layer before the final layer norm): the median "
        "rotation of ridge maps (α = 1, with intercept) to the input-token embeddings and to "
        "the last-layer activations over all eigenvalues (the paper's statistic), and the "
        "cosine of each residual to the current token's embedding and to the next token's "
        "unembedding. For the full model, the bigram subnetwork alone, and a random subnetwork "
        "of the same layout.")
    rep.figure(figs["rotations"])
    rep.figure(figs["cosines"])
    rep.figure(figs["cov_similarity"],
               "Cross-layer covariance similarity with the top singular direction removed.")

    if "checkpoints_r" in figs:
        cres = ckpt_analysis.CheckpointsResult.from_dict(res["checkpoints"])
        rep.heading("7. Across training checkpoints")
        rep.text(f"A bigram subnetwork at λ = {cres.lam:g} on each LM checkpoint, each trained "
                 f"with the {rec['name']} recipe and the same budget ({rec['mask_steps']:,} "
                 "steps at most); consecutive checkpoints' subnetworks compared layer by layer "
                 "against the same null.")
        rep.figure(figs["checkpoints_r"])
        rep.table(cres.rows())
        rep.figure(figs["checkpoints_layout"])
        if "checkpoints_overlap" in figs:
            rep.figure(figs["checkpoints_overlap"])
            rep.table(cres.overlap_rows())

    rep.heading("Run")
    rep.table([{"stage": k, "seconds": v} for k, v in metrics["timings"].items()],
              caption=f"Total {sum(metrics['timings'].values()):.0f} s.")
    rep.preformatted("\n".join(f"{k} = {v}" for k, v in cfg.to_dict().items()))
    return rep.write(ctx.out / "report.html")


def _format_generations(gen: dict) -> str:
    """Each continuation under its key; runs of blank lines shown as one marker line."""
    lines = []
    for key, text in gen.get("texts", gen).items():
        if isinstance(text, str):
            text = re.sub(r"\n{3,}", lambda m: f"\n[{len(m.group())} newlines]\n", text.strip())
            lines.append(f"--- {key} ---\n{text}\n")
    return "\n".join(lines)
