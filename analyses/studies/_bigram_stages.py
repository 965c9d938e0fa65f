"""The stages of the bigram study, each reusing its artifacts in the run directory.

Kept apart from :mod:`analyses.studies.bigram` (config, orchestration, result) so each stage
is a short function a notebook user can read and call alone with a :class:`StudyContext`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from analyses import ablation, layout, overlap, residual, sufficiency, sweep
from analyses import checkpoints as ckpt_analysis
from analyses.studies.common import load_corpus_and_tokenizer
from interp.data.bigram import BigramCounts
from interp.data.text import iterate_batches, to_sequences
from interp.io import read_json, write_json
from interp.masks import ContinuousSparsification, MaskSet, fit_masks
from interp.models.checkpoints import CheckpointStore
from interp.models.lm import PRESETS, TrainConfig, build_lm, load_hf_lm, train_lm
from interp.objectives import BigramObjective, SelfDistillationObjective

log = logging.getLogger(__name__)

GENERATION_PROMPT = "KING:\nWhat say you"


@dataclass
class StudyContext:
    """What the stages share: the config, the run directory and what earlier stages built."""

    cfg: object
    out: Path
    corpus: object = None
    tokenizer: object = None
    tokens: object = None
    model: object = None
    store: CheckpointStore | None = None
    lm_info: dict = field(default_factory=dict)
    counts: BigramCounts | None = None
    sweep: sweep.SweepResult | None = None
    bigram: MaskSet | None = None
    optimal: MaskSet | None = None
    random: MaskSet | None = None
    results: dict = field(default_factory=dict)
    figures: dict = field(default_factory=dict)

    @property
    def masks_dir(self) -> Path:
        return self.out / "masks"

    @property
    def is_preset(self) -> bool:
        return self.cfg.model in PRESETS

    def eval_sequences(self) -> torch.Tensor:
        seqs = to_sequences(self.tokens.validation, self.cfg.seq_len)
        return seqs[: self.cfg.eval_sequences]

    def eval_batches(self, n_sequences: int | None = None) -> list[torch.Tensor]:
        seqs = self.eval_sequences() if n_sequences is None else to_sequences(
            self.tokens.validation, self.cfg.seq_len)[:n_sequences]
        return list(seqs.split(self.cfg.mask_batch))

    def train_batches(self, seed: int):
        """A fresh, seeded, endless stream of training batches for mask fitting."""
        return iterate_batches(self.tokens.train, self.cfg.mask_batch, self.cfg.seq_len,
                               seed=seed)


# --------------------------------------------------------------------------- data and model


def prepare_data(ctx: StudyContext) -> None:
    cfg = ctx.cfg
    tokenizer_spec = None
    if not ctx.is_preset:  # an HF model brings its own tokenizer
        tokenizer_spec = cfg.model
    ctx.corpus, ctx.tokenizer, ctx.tokens = load_corpus_and_tokenizer(
        cfg.corpus, cfg.vocab_size, ctx.out, tokenizer_spec)


def _lm_identity(ctx: StudyContext) -> dict:
    cfg = ctx.cfg
    return {"preset": cfg.model, "arch": PRESETS[cfg.model].__dict__, "corpus": ctx.corpus.name,
            "corpus_fingerprint": ctx.corpus.fingerprint, "vocab": len(ctx.tokenizer),
            "train": _train_config(cfg).__dict__}


def _train_config(cfg) -> TrainConfig:
    return TrainConfig(steps=cfg.lm_steps, batch_size=cfg.lm_batch, seq_len=cfg.seq_len,
                       lr=cfg.lm_lr, checkpoint_every=cfg.lm_checkpoint_every,
                       eval_every=cfg.lm_checkpoint_every, seed=cfg.seed,
                       warmup_steps=min(100, cfg.lm_steps // 10))


def prepare_model(ctx: StudyContext) -> None:
    """Train the preset LM with checkpoints (resuming), or load the HF model."""
    cfg = ctx.cfg
    if not ctx.is_preset:
        ctx.model = load_hf_lm(cfg.model, device=cfg.device, tokenizer=ctx.tokenizer)
        ctx.lm_info = {"source": cfg.model}
        return
    ctx.store = CheckpointStore(ctx.out / "lm", _lm_identity(ctx))
    ctx.model = build_lm(cfg.model, ctx.tokenizer, seed=cfg.seed, device=cfg.device)
    result = train_lm(ctx.model, ctx.tokens.train, ctx.tokens.validation, _train_config(cfg),
                      store=ctx.store, device=cfg.device)
    ctx.model.eval()
    ctx.lm_info = {"source": f"preset {cfg.model}", "steps": result.steps,
                   "val_loss": result.val_loss, "resumed_from": result.resumed_from,
                   "steps_per_second": result.steps_per_second or None}
    for p in ctx.model.parameters():
        p.requires_grad_(False)


def prepare_counts(ctx: StudyContext) -> None:
    path = ctx.out / "bigram_counts.safetensors"
    if path.is_file():
        ctx.counts = BigramCounts.load(path, device=ctx.cfg.device)
    else:
        counts = BigramCounts.from_tokens(ctx.tokens.train, vocab_size=len(ctx.tokenizer),
                                          separator=ctx.tokenizer.bos_token_id)
        counts.save(path)
        ctx.counts = counts.to(ctx.cfg.device)


# --------------------------------------------------------------------------- subnetworks


def _fit(ctx: StudyContext, model, objective_factory, lam: float, steps: int, seed: int,
         name: str) -> tuple[MaskSet, dict]:
    cfg = ctx.cfg
    ms = MaskSet.for_model(model, kind=ContinuousSparsification(
        temperature_factor=cfg.temperature_factor), seed=seed)
    result = fit_masks(model, ms, objective_factory(ms), ctx.train_batches(seed), lam=lam,
                       lr=cfg.mask_lr, max_steps=steps, device=cfg.device, seed=seed)
    ms.metadata.update({"objective": name, "lambda": lam, "steps": result.steps,
                        "stopped_reason": result.stopped_reason})
    info = {"steps": result.steps, "stopped_reason": result.stopped_reason,
            "spike": result.spike, "seconds": round(result.seconds, 1),
            "final_task_loss": result.final.get("task_loss")}
    return ms, info


def _sufficiency(ctx: StudyContext, model, ms: MaskSet | None) -> dict:
    """Surprisal r (seen and smoothed) and CE to the bigram model, for a subnetwork or not."""
    res = sufficiency.sufficiency(model, ctx.counts, ctx.eval_batches(), maskset=ms,
                                  progress=False)
    return res.to_dict()


def run_sweep(ctx: StudyContext) -> None:
    cfg = ctx.cfg

    def train(lam):
        return _fit(ctx, ctx.model, lambda ms: BigramObjective(ctx.counts), lam, cfg.mask_steps,
                    cfg.seed, "bigram")

    def evaluate(ms):
        suff = _sufficiency(ctx, ctx.model, ms)
        return {"active_fraction": ms.active_fraction(), **suff}

    ctx.sweep = sweep.lambda_sweep(cfg.lambdas, train, evaluate, ctx.masks_dir, prefix="bigram",
                                   load=MaskSet.load, tolerance=cfg.tolerance)
    path = ctx.out / "sweep.json"
    if not path.is_file() or read_json(path) != ctx.sweep.to_dict():
        write_json(path, ctx.sweep.to_dict())
    ctx.bigram = MaskSet.load(ctx.masks_dir / ctx.sweep.selected.path)
    ctx.random = ctx.bigram.random_like(seed=cfg.seed + 1000)


def fit_optimal(ctx: StudyContext) -> None:
    """The optimal-pruning (self-distillation) subnetwork at the selected lambda."""
    cfg = ctx.cfg
    lam = ctx.sweep.selected_lambda
    path = ctx.masks_dir / f"optimal-lam{sweep.lam_tag(lam)}.safetensors"
    if path.is_file():
        ctx.optimal = MaskSet.load(path)
        return
    ctx.optimal, info = _fit(ctx, ctx.model, SelfDistillationObjective, lam, cfg.mask_steps,
                             cfg.seed, "self_distillation")
    ctx.optimal.metadata["fit"] = info
    ctx.optimal.save(path)


def run_controls(ctx: StudyContext) -> None:
    """The paper's cheap controls: the embeddings alone, and a random-init model's subnetwork."""
    cfg = ctx.cfg
    path = ctx.out / "controls.json"
    controls = read_json(path) if path.is_file() else {}
    if "embeddings_only" not in controls:
        empty = MaskSet.empty(ctx.model)
        controls["embeddings_only"] = _sufficiency(ctx, ctx.model, empty)
        write_json(path, controls)
    if cfg.random_init_control and ctx.is_preset and "random_init" not in controls:
        rand_model = build_lm(cfg.model, ctx.tokenizer, seed=cfg.seed + 1, device=cfg.device)
        rand_model.eval()
        for p in rand_model.parameters():
            p.requires_grad_(False)
        lam = ctx.sweep.selected_lambda
        ms, info = _fit(ctx, rand_model, lambda m: BigramObjective(ctx.counts), lam,
                        cfg.mask_steps, cfg.seed, "bigram_random_init")
        controls["random_init"] = {"lambda": lam, "active_fraction": ms.active_fraction(),
                                   "full_model": _sufficiency(ctx, rand_model, None),
                                   "subnetwork": _sufficiency(ctx, rand_model, ms), "fit": info}
        write_json(path, controls)
    ctx.results["controls"] = controls


# --------------------------------------------------------------------------- evaluation


def evaluate(ctx: StudyContext) -> None:
    """Sufficiency of every network, necessity (ablation), layout, overlap, generations."""
    path = ctx.out / "evaluation.json"
    if path.is_file():
        ctx.results.update(read_json(path))
        return
    model, batches = ctx.model, ctx.eval_batches()
    res = {"sufficiency": {
        "full": _sufficiency(ctx, model, None),
        "bigram": ctx.sweep.selected.metrics | {"surprisal_r": ctx.sweep.selected.surprisal_r},
        "optimal": _sufficiency(ctx, model, ctx.optimal),
        "random": _sufficiency(ctx, model, ctx.random),
    }}
    res["ablation"] = ablation.necessity(
        model, batches, {"bigram": ctx.bigram, "random": ctx.random, "optimal": ctx.optimal},
        progress=False).to_dict()
    bigram_masks, optimal_masks = ctx.bigram.hard_masks(), ctx.optimal.hard_masks()
    eligible = ctx.bigram.eligible_masks()
    res["layout"] = {name: layout.layout_analysis(ms.hard_masks(), label=name,
                                                  eligible=eligible).to_dict()
                     for name, ms in (("bigram", ctx.bigram), ("optimal", ctx.optimal),
                                      ("random", ctx.random))}
    res["overlap"] = overlap.overlap_analysis(
        bigram_masks, optimal_masks, label_a="bigram", label_b="optimal", eligible=eligible,
        n_permutations=2000, seed=ctx.cfg.seed).to_dict()
    res["generation"] = ablation.generations(model, GENERATION_PROMPT, {"bigram": ctx.bigram},
                                             max_new_tokens=40, seed=ctx.cfg.seed).to_dict()
    write_json(path, res)
    ctx.results.update(res)


def residual_stream(ctx: StudyContext) -> None:
    """Residual stream views for the full model, the bigram and the random subnetwork."""
    path = ctx.out / "residual.json"
    if path.is_file():
        ctx.results["residual"] = read_json(path)
        return
    batches = ctx.eval_batches(ctx.cfg.residual_sequences)
    out = {"full": residual.residual_analysis(ctx.model, batches, label="full model",
                                              progress=False).to_dict()}
    for name, ms in (("bigram", ctx.bigram), ("random", ctx.random)):
        with ms.applied(ctx.model, mode="keep"):
            out[name] = residual.residual_analysis(ctx.model, batches, label=f"{name} subnetwork",
                                                   progress=False).to_dict()
    write_json(path, out)
    ctx.results["residual"] = out


def across_checkpoints(ctx: StudyContext) -> None:
    """A bigram subnetwork on earlier checkpoints of the LM run (presets only)."""
    cfg = ctx.cfg
    if ctx.store is None:
        ctx.results["checkpoints"] = None
        return
    available = ctx.store.steps()
    steps = sorted({s for s in cfg.checkpoint_steps if s in available} | {available[-1]})
    lam = ctx.sweep.selected_lambda
    final = available[-1]

    def measure(step: int) -> ckpt_analysis.CheckpointEntry:
        if step == final:
            model, ms = ctx.model, ctx.bigram
            sub_r = ctx.sweep.selected.surprisal_r
        else:
            model = build_lm(cfg.model, ctx.tokenizer, seed=cfg.seed, device=cfg.device)
            ctx.store.load(step, model=model, device=cfg.device)
            model.eval()
            for p in model.parameters():
                p.requires_grad_(False)
            ms, _ = _fit(ctx, model, lambda m: BigramObjective(ctx.counts), lam,
                         cfg.checkpoint_mask_steps, cfg.seed, "bigram")
            sub_r = _sufficiency(ctx, model, ms)["surprisal_r"]
        lay = layout.layout_analysis(ms.hard_masks(), label=f"step {step}",
                                     eligible=ms.eligible_masks())
        meta = ctx.store.metadata(step)
        return ckpt_analysis.CheckpointEntry(
            step=step, val_loss=meta.get("val_loss"),
            full_r=_sufficiency(ctx, model, None)["surprisal_r"], subnetwork_r=sub_r,
            active_fraction=ms.active_fraction(), first_mlp_share=lay.first_mlp_share or 0.0,
            block_shares=dict(zip(lay.kinds, (sum(col) / max(1, lay.total_kept)
                                              for col in zip(*lay.kept)))))

    result = ckpt_analysis.across_checkpoints(steps, measure, ctx.out / "checkpoints", lam)
    ctx.results["checkpoints"] = result.to_dict()


#: The study's stages in order: (name in timings.json, function of the context).
STAGES = (
    ("data", prepare_data),
    ("lm", prepare_model),
    ("bigram_counts", prepare_counts),
    ("sweep", run_sweep),
    ("optimal", fit_optimal),
    ("controls", run_controls),
    ("evaluation", evaluate),
    ("residual", residual_stream),
    ("checkpoints", across_checkpoints),
)


# --------------------------------------------------------------------------- outputs


def collect_metrics(ctx: StudyContext) -> dict:
    """The run's ``metrics.json``: headline numbers first, details after."""
    r = ctx.results
    suff, ab = r["sufficiency"], r["ablation"]
    sel = ctx.sweep.selected
    full_res = r["residual"]["full"]
    return {
        "model": ctx.lm_info,
        "corpus": {"name": ctx.corpus.name, "train_tokens": int(ctx.tokens.train.numel()),
                   "validation_tokens": int(ctx.tokens.validation.numel()),
                   "vocab_size": len(ctx.tokenizer)},
        "full_model": {"surprisal_r": suff["full"]["surprisal_r"],
                       "surprisal_r_smoothed": suff["full"].get("surprisal_r_smoothed"),
                       "ce_to_bigram": suff["full"].get("ce_to_bigram")},
        "bigram_subnetwork": {"surprisal_r": sel.surprisal_r, "lambda": sel.lam,
                              "active_fraction": sel.active_fraction,
                              "active_weights": ctx.bigram.n_active(),
                              "surprisal_r_smoothed": sel.metrics.get("surprisal_r_smoothed"),
                              "ce_to_bigram": sel.metrics.get("ce_to_bigram")},
        "optimal_subnetwork": {"lambda": ctx.sweep.selected_lambda,
                               "active_fraction": ctx.optimal.active_fraction(),
                               "surprisal_r": suff["optimal"]["surprisal_r"]},
        "random_subnetwork": {"surprisal_r": suff["random"]["surprisal_r"]},
        "ablation": {"loss_full": ab["loss_full"],
                     "loss_without_bigram": ab["losses"]["bigram"],
                     "loss_without_random": ab["losses"]["random"],
                     "loss_without_optimal": ab["losses"]["optimal"]},
        "overlap": {"ratio": r["overlap"]["ratio"], "p_value": r["overlap"]["p_value"],
                    "observed_fraction": r["overlap"]["overlap_fraction"],
                    "expected_fraction": r["overlap"]["expected_fraction"],
                    "share_bigram_in_optimal": r["overlap"]["share_a_in_b"]},
        "layout": {"first_mlp_share": r["layout"]["bigram"]["first_mlp_share"],
                   "mlp_share": r["layout"]["bigram"]["mlp_share"]},
        "residual": {"rotation_to_input": full_res["rotation_to_input"],
                     "rotation_to_output": full_res["rotation_to_output"]},
        "sweep": [{"lambda": e.lam, "active_fraction": e.active_fraction,
                   "surprisal_r": e.surprisal_r} for e in ctx.sweep.entries],
        "controls": r.get("controls"),
        "checkpoints": r.get("checkpoints"),
    }


def _bar(title: str, labels: list[str], values: list[float], yaxis: str):
    import plotly.graph_objects as go

    from interp.plots import color_for, figure

    fig = figure(title=title, yaxis_title=yaxis, showlegend=False)
    fig.add_trace(go.Bar(x=labels, y=values, marker_color=[color_for(x, i)
                                                           for i, x in enumerate(labels)],
                         text=[f"{v:.3f}" for v in values], textposition="outside"))
    return fig


def build_figures(ctx: StudyContext) -> dict:
    """Every figure of the study, by name (plotly Figures; nothing is shown)."""
    r = ctx.results
    suff = r["sufficiency"]
    labels = ["full model", "bigram subnetwork", "optimal subnetwork", "random subnetwork"]
    values = [suff[k]["surprisal_r"] for k in ("full", "bigram", "optimal", "random")]
    controls = r.get("controls") or {}
    if "embeddings_only" in controls:
        labels.append("embeddings only")
        values.append(controls["embeddings_only"]["surprisal_r"])
    if "random_init" in controls:
        labels.append("subnetwork of an untrained model")
        values.append(controls["random_init"]["subnetwork"]["surprisal_r"])
    ab = r["ablation"]
    ab_labels = ["bigram", "random", "optimal"]
    res = {k: residual.ResidualResult.from_dict(v) for k, v in r["residual"].items()}
    figs = {
        "sweep": sweep.plot_sweep(ctx.sweep),
        "sufficiency": _bar("Sufficiency: surprisal correlation with the bigram model", labels,
                            values, "Pearson r (held-out tokens)"),
        "ablation": _bar("Necessity: validation loss with a subnetwork removed",
                         ["full model"] + [f"without {k}" for k in ab_labels],
                         [ab["loss_full"]] + [ab["losses"][k] for k in ab_labels],
                         "loss (nats/token)"),
        "layout": layout.plot_layout(layout.LayoutResult.from_dict(r["layout"]["bigram"])),
        "layout_optimal": layout.plot_layout(layout.LayoutResult.from_dict(r["layout"]["optimal"])),
        "overlap": overlap.plot_overlap(overlap.OverlapResult.from_dict(r["overlap"])),
        "rotations": residual.plot_rotations(list(res.values())),
        "cosines": residual.plot_cosines(list(res.values())),
        "cov_similarity": residual.plot_cov_similarity(list(res.values())),
    }
    if r.get("checkpoints"):
        cres = ckpt_analysis.CheckpointsResult.from_dict(r["checkpoints"])
        figs["checkpoints_r"] = ckpt_analysis.plot_checkpoint_r(cres)
        figs["checkpoints_layout"] = ckpt_analysis.plot_checkpoint_layout(cres)
    return figs


def write_figures(ctx: StudyContext) -> dict[str, Path]:
    from interp.plots import save_figure

    ctx.figures = build_figures(ctx)
    return {name: save_figure(fig, ctx.out / "figures" / f"{name}.html")[0]
            for name, fig in ctx.figures.items()}


def write_report(ctx: StudyContext, metrics: dict) -> Path:
    from analyses.studies._bigram_report import write_report as _write

    return _write(ctx, metrics)
