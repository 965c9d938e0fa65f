"""The bigram study's ``report.html``: readable without the code, figures embedded."""

from __future__ import annotations

from pathlib import Path

from analyses.studies.bigram import format_p
from interp.report import Report

#: The study's acceptance targets (from the paper's findings at toy scale).
TARGETS = {"min_r": 0.9, "max_active": 0.10, "min_ablation_ratio": 5.0}


def _increase(ab: dict, key: str) -> float:
    return ab[f"loss_without_{key}"] - ab["loss_full"]


def checks(metrics: dict) -> dict[str, bool]:
    """The headline claims of the paper, tested on this run."""
    big, full, ab = metrics["bigram_subnetwork"], metrics["full_model"], metrics["ablation"]
    rnd = max(_increase(ab, "random"), 1e-9)
    return {
        "bigram r >= 0.9": big["surprisal_r"] >= TARGETS["min_r"],
        "active <= 10%": big["active_fraction"] <= TARGETS["max_active"],
        "full-model r below subnetwork r": full["surprisal_r"] < big["surprisal_r"],
        "removal hurts >= 5x random": _increase(ab, "bigram") / rnd >= TARGETS["min_ablation_ratio"],
    }


def write_report(ctx, metrics: dict) -> Path:
    """Compose the report from the metrics and the figures built by the stages."""
    cfg, figs, res = ctx.cfg, ctx.figures, ctx.results
    big, full, opt = metrics["bigram_subnetwork"], metrics["full_model"], metrics["optimal_subnetwork"]
    ab, ov, lay = metrics["ablation"], metrics["overlap"], metrics["layout"]
    ok = checks(metrics)
    ratio = _increase(ab, "bigram") / max(_increase(ab, "random"), 1e-9)

    rep = Report("Bigram subnetworks", subtitle=(
        f"model {metrics['model'].get('source')} · corpus {metrics['corpus']['name']} "
        f"({metrics['corpus']['train_tokens']:,} training tokens, vocabulary "
        f"{metrics['corpus']['vocab_size']:,}) · seed {cfg.seed}" + (" · quick run" if cfg.quick else "")))
    rep.text(
        "A bigram subnetwork is a subset of a language model's attention and MLP weights that, "
        "with the embeddings, unembedding, biases and norms, predicts the next token from the "
        "current token alone (Chang & Bergen, 2025). This run trains masks over every attention "
        "and MLP weight matrix with continuous sparsification, for a range of sparsity weights "
        "λ, and asks: are they sufficient (do they reproduce the bigram model?), necessary "
        "(does removing them break the model?), where do they sit, and how do they shape the "
        "residual stream?")
    rep.kpis([
        ("bigram subnetwork r", big["surprisal_r"], ok["bigram r >= 0.9"]),
        ("full model r", full["surprisal_r"], ok["full-model r below subnetwork r"]),
        ("active masked weights (%)", 100 * big["active_fraction"], ok["active <= 10%"]),
        ("selected λ", big["lambda"], None),
        ("loss increase: bigram / random removal", ratio, ok["removal hurts >= 5x random"]),
        ("overlap with optimal (x chance)", ov["ratio"], None),
        ("first-MLP share (%)", 100 * lay["first_mlp_share"], None),
    ])
    rep.table([{"claim": k, "holds": "yes" if v else "NO"} for k, v in ok.items()],
              caption="Targets from the paper, checked on this run.")

    rep.heading("1. Sparsity sweep and selection")
    rep.text(
        "One subnetwork per λ. The analysed subnetwork is the sparsest whose surprisal "
        f"correlation is within {cfg.tolerance} of the least-regularised one (the paper's rule).")
    rep.figure(figs["sweep"], "Each point is one trained subnetwork; the star is the selection.")
    rep.table(ctx.sweep.rows())

    rep.heading("2. Sufficiency")
    rep.text(
        "Pearson r between per-token surprisals of each network and of the bigram model on "
        "held-out text. Headline r drops tokens whose bigram never occurred in training (the "
        "paper's drop-infinite variant); the smoothed variant scores every token against the "
        "bigram model mixed 0.99/0.01 with the unigram model.")
    rep.figure(figs["sufficiency"])
    suff = res["sufficiency"]
    rows = [{"network": k, "r (seen bigrams)": v["surprisal_r"],
             "r (smoothed, all tokens)": v.get("surprisal_r_smoothed", float("nan")),
             "CE to bigram": v.get("ce_to_bigram", float("nan"))} for k, v in suff.items()]
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
    rep.figure(figs["ablation"])
    gen = res.get("generation") or {}
    if gen:
        rep.text("Generations from the same prompt, with and without the bigram subnetwork:")
        rep.preformatted(_format_generations(gen))

    rep.heading("4. Where the subnetwork sits")
    rep.figure(figs["layout"], "Share of the bigram subnetwork's weights per layer and block.")
    rep.figure(figs["layout_optimal"], "The same for the optimal-pruning subnetwork.")
    rep.heading("5. Overlap with the optimal subnetwork")
    rep.text(
        f"The two subnetworks share {100 * ov['observed_fraction']:.3f}% of all masked weights; "
        f"random pairs with the same count per block would share "
        f"{100 * ov['expected_fraction']:.3f}% ({ov['ratio']:.2f}x, {format_p(ov['p_value'])}). "
        f"{100 * (ov['share_bigram_in_optimal'] or 0):.1f}% of the bigram subnetwork lies inside "
        "the optimal one.")
    rep.figure(figs["overlap"])

    rep.heading("6. Residual stream: current token vs next token")
    rep.text(
        "Per layer (0 = embeddings; the last layer before the final layer norm): the median "
        "rotation of ridge maps (α = 1, with intercept) to the input-token embeddings and to "
        "the last-layer activations, and the cosine of each residual to the current token's "
        "embedding and to the next token's unembedding. For the full model, the bigram "
        "subnetwork alone, and a random subnetwork of the same layout.")
    rep.figure(figs["rotations"])
    rep.figure(figs["cosines"])
    rep.figure(figs["cov_similarity"],
               "Cross-layer covariance similarity with the top singular direction removed.")

    if "checkpoints_r" in figs:
        rep.heading("7. Across training checkpoints")
        rep.figure(figs["checkpoints_r"])
        rep.figure(figs["checkpoints_layout"])

    rep.heading("Run")
    rep.table([{"stage": k, "seconds": v} for k, v in metrics["timings"].items()],
              caption=f"Total {sum(metrics['timings'].values()):.0f} s.")
    rep.preformatted("\n".join(f"{k} = {v}" for k, v in cfg.to_dict().items()))
    return rep.write(ctx.out / "report.html")


def _format_generations(gen: dict) -> str:
    lines = []
    for key, text in gen.get("texts", gen).items():
        if isinstance(text, str):
            lines.append(f"--- {key} ---\n{text.strip()}\n")
    return "\n".join(lines)
