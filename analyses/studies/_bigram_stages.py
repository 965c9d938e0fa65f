"""The stages of the bigram study as one ordered table, each reusing its artifacts.

Kept apart from :mod:`analyses.studies.bigram` (orchestration, result) and
:mod:`analyses.studies._bigram_report` (figures, report) so each stage is a short function a
notebook user can read and call alone with a :class:`StudyContext`. Every subnetwork of a run
is trained with one recipe and one budget (:func:`fit_subnetwork`), at every LM checkpoint too.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from analyses import ablation, layout, overlap, residual, sufficiency, sweep
from analyses import checkpoints as ckpt_analysis
from analyses.studies._bigram_config import BigramStudyConfig, model_kind
from analyses.studies.common import load_corpus_and_tokenizer, read_artifact
from interp.data.bigram import BigramCounts
from interp.data.text import Corpus, TokenizedCorpus, iterate_batches, to_sequences
from interp.io import write_json
from interp.masks import ContinuousSparsification, FitResult, MaskSet, fit_masks
from interp.models.checkpoints import CheckpointStore
from interp.models.lm import PRESETS, TrainConfig, build_lm, load_hf_lm, train_lm
from interp.objectives import BigramObjective, SelfDistillationObjective

log = logging.getLogger(__name__)

GENERATION_PROMPT = "KING:\nWhat say you"


@dataclass
class StudyContext:
    """What the stages share: the config, the run directory and what earlier stages built."""

    cfg: BigramStudyConfig
    out: Path
    corpus: Corpus | None = None
    tokenizer: object = None  # an HF PreTrainedTokenizerFast
    tokens: TokenizedCorpus | None = None
    model: torch.nn.Module | None = None  # a TransformerBridge
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
        return model_kind(self.cfg.model) == "preset"

    def eval_sequences(self) -> Tensor:
        seqs = to_sequences(self.tokens.validation, self.cfg.seq_len)
        return seqs[: self.cfg.eval_sequences]

    def eval_batches(self, n_sequences: int | None = None) -> list[Tensor]:
        seqs = self.eval_sequences() if n_sequences is None else to_sequences(
            self.tokens.validation, self.cfg.seq_len)[:n_sequences]
        return list(seqs.split(self.cfg.mask_batch))

    def train_batches(self, seed: int) -> Iterator[Tensor]:
        """A fresh, seeded, endless stream of training batches for mask fitting."""
        return iterate_batches(self.tokens.train, self.cfg.mask_batch, self.cfg.seq_len,
                               seed=seed)



# --------------------------------------------------------------------------- data and model


def prepare_data(ctx: StudyContext) -> None:
    cfg = ctx.cfg
    tokenizer_spec = None if ctx.is_preset else cfg.model  # an HF model brings its tokenizer
    ctx.corpus, ctx.tokenizer, ctx.tokens = load_corpus_and_tokenizer(
        cfg.corpus, cfg.vocab_size, ctx.out, tokenizer_spec)


def _lm_identity(ctx: StudyContext) -> dict:
    cfg = ctx.cfg
    ident = {"preset": cfg.model, "arch": PRESETS[cfg.model].__dict__, "corpus": ctx.corpus.name,
             "corpus_fingerprint": ctx.corpus.fingerprint, "vocab": len(ctx.tokenizer),
             "train": _train_config(cfg).__dict__}
    if cfg.dtype != "float32":  # float32 stores from before the option keep their identity
        ident["dtype"] = cfg.dtype
    return ident


def _train_config(cfg: BigramStudyConfig) -> TrainConfig:
    return TrainConfig(steps=cfg.lm_steps, batch_size=cfg.lm_batch, seq_len=cfg.seq_len,
                       lr=cfg.lm_lr, checkpoint_every=cfg.lm_checkpoint_every,
                       eval_every=cfg.lm_checkpoint_every, seed=cfg.seed,
                       warmup_steps=min(100, cfg.lm_steps // 10))


def _frozen(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def prepare_model(ctx: StudyContext) -> None:
    """Train the preset LM with checkpoints (resuming), or load the HF model."""
    cfg = ctx.cfg
    if not ctx.is_preset:
        ctx.model = _frozen(load_hf_lm(cfg.model, device=cfg.device, tokenizer=ctx.tokenizer))
        ctx.lm_info = {"source": cfg.model}
        return
    ctx.store = CheckpointStore(ctx.out / "lm", _lm_identity(ctx))
    ctx.model = build_lm(cfg.model, ctx.tokenizer, seed=cfg.seed, device=cfg.device)
    result = train_lm(ctx.model, ctx.tokens.train, ctx.tokens.validation, _train_config(cfg),
                      store=ctx.store, device=cfg.device, dtype=cfg.dtype)
    _frozen(ctx.model)
    ctx.lm_info = {"source": f"preset {cfg.model}", "steps": result.steps,
                   "val_loss": result.val_loss, "resumed_from": result.resumed_from,
                   "steps_per_second": result.steps_per_second or None,
                   "epochs": result.epochs, "overfit_step": result.overfit_step}


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


def fit_subnetwork(
    ctx: StudyContext, model: torch.nn.Module,
    objective_factory: Callable[[MaskSet], Callable], lam: float, name: str,
) -> tuple[MaskSet, dict]:
    """Train one subnetwork of ``model`` with the run's recipe (lr, temperature schedule,
    step budget, batch, spike retries, seed): the same procedure for every subnetwork."""
    cfg = ctx.cfg
    ms = MaskSet.for_model(model, kind=ContinuousSparsification(
        temperature_factor=cfg.temperature_factor), seed=cfg.seed)
    result: FitResult = fit_masks(
        model, ms, objective_factory(ms), ctx.train_batches, lam=lam, lr=cfg.mask_lr,
        max_steps=cfg.mask_steps, device=cfg.device, seed=cfg.seed,
        spike_retries=cfg.spike_retries, dtype=cfg.dtype)
    ms.metadata.update({"objective": name, "lambda": lam, "steps": result.steps,
                        "stopped_reason": result.stopped_reason, "recipe": cfg.recipe,
                        "dtype": result.dtype})
    info = {"steps": result.steps, "stopped_reason": result.stopped_reason,
            "spike": result.spike, "attempts": result.attempts,
            "seconds": round(result.seconds, 1),
            "final_task_loss": result.final.get("task_loss")}
    return ms, info


def _bigram_objective(ctx: StudyContext) -> Callable[[MaskSet], Callable]:
    return lambda ms: BigramObjective(ctx.counts)


def _sufficiency(ctx: StudyContext, model, ms: MaskSet | None) -> dict:
    """Surprisal r (all variants) and CE to the bigram model, for a subnetwork or not."""
    res = sufficiency.sufficiency(model, ctx.counts, ctx.eval_batches(), maskset=ms,
                                  progress=False)
    return res.to_dict()


def run_sweep(ctx: StudyContext) -> None:
    cfg = ctx.cfg

    def train(lam: float) -> tuple[MaskSet, dict]:
        return fit_subnetwork(ctx, ctx.model, _bigram_objective(ctx), lam, "bigram")

    def evaluate(ms: MaskSet) -> dict:
        return {"active_fraction": ms.active_fraction(), **_sufficiency(ctx, ctx.model, ms)}

    ctx.sweep = sweep.lambda_sweep(cfg.lambdas, train, evaluate, ctx.masks_dir, prefix="bigram",
                                   load=MaskSet.load, tolerance=cfg.tolerance)
    path = ctx.out / "sweep.json"
    if not path.is_file() or read_artifact(path) != ctx.sweep.to_dict():
        ctx.sweep.save(path)
    ctx.bigram = MaskSet.load(ctx.masks_dir / ctx.sweep.selected.path)
    ctx.random = ctx.bigram.random_like(seed=cfg.seed + 1000)


def fit_optimal(ctx: StudyContext) -> None:
    """The optimal-pruning (self-distillation) subnetwork at the selected lambda."""
    lam = ctx.sweep.selected_lambda
    path = ctx.masks_dir / f"optimal-lam{sweep.lam_tag(lam)}.safetensors"
    if path.is_file():
        ctx.optimal = MaskSet.load(path)
        return
    ctx.optimal, info = fit_subnetwork(ctx, ctx.model, SelfDistillationObjective, lam,
                                       "self_distillation")
    ctx.optimal.metadata["fit"] = info
    ctx.optimal.save(path)


def run_controls(ctx: StudyContext) -> None:
    """The paper's cheap controls: the embeddings alone, and a random-init model's subnetwork."""
    cfg = ctx.cfg
    path = ctx.out / "controls.json"
    controls = read_artifact(path) if path.is_file() else {}
    if "embeddings_only" not in controls:
        controls["embeddings_only"] = _sufficiency(ctx, ctx.model, MaskSet.empty(ctx.model))
        write_json(path, controls)
    if cfg.random_init_control and ctx.is_preset and "random_init" not in controls:
        rand_model = _frozen(build_lm(cfg.model, ctx.tokenizer, seed=cfg.seed + 1,
                                      device=cfg.device))
        lam = ctx.sweep.selected_lambda
        ms, info = fit_subnetwork(ctx, rand_model, _bigram_objective(ctx), lam,
                                  "bigram_random_init")
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
        ctx.results.update(read_artifact(path))
        return
    model, batches = ctx.model, ctx.eval_batches()
    res = {"sufficiency": {
        "full": _sufficiency(ctx, model, None),
        "bigram": _sufficiency(ctx, model, ctx.bigram),
        "optimal": _sufficiency(ctx, model, ctx.optimal),
        "random": _sufficiency(ctx, model, ctx.random),
    }}
    res["ablation"] = ablation.necessity(
        model, batches, {"bigram": ctx.bigram, "random": ctx.random, "optimal": ctx.optimal},
        progress=False).to_dict()
    res["layout"] = {name: layout.layout_analysis(ms, label=name).to_dict()
                     for name, ms in (("bigram", ctx.bigram), ("optimal", ctx.optimal),
                                      ("random", ctx.random))}
    res["overlap"] = overlap.overlap_analysis(
        ctx.bigram, ctx.optimal, label_a="bigram", label_b="optimal", n_permutations=2000,
        seed=ctx.cfg.seed).to_dict()
    res["generation"] = ablation.generations(model, GENERATION_PROMPT, {"bigram": ctx.bigram},
                                             max_new_tokens=40, seed=ctx.cfg.seed).to_dict()
    write_json(path, res)
    ctx.results.update(res)


def residual_stream(ctx: StudyContext) -> None:
    """Residual stream views for the full model, the bigram and the random subnetwork."""
    path = ctx.out / "residual.json"
    if path.is_file():
        ctx.results["residual"] = read_artifact(path)
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
    """A bigram subnetwork at the selected λ on each LM checkpoint (presets only), trained
    with the run's recipe and budget at every checkpoint; consecutive subnetworks compared
    layer by layer. The final checkpoint is the analysed model, whose subnetwork the sweep
    already trained with that same recipe, budget and seed, so it is reused, not refitted."""
    cfg = ctx.cfg
    if ctx.store is None:
        ctx.results["checkpoints"] = None
        return
    available = ctx.store.steps()
    steps = sorted({s for s in cfg.checkpoint_steps if s in available} | {available[-1]})
    lam = ctx.sweep.selected_lambda
    final = available[-1]
    mask_dir = ctx.out / "checkpoints"

    def measure(step: int) -> ckpt_analysis.CheckpointEntry:
        if step == final:
            model, ms = ctx.model, ctx.bigram
            mask_path = ctx.masks_dir / ctx.sweep.selected.path
        else:
            model = build_lm(cfg.model, ctx.tokenizer, seed=cfg.seed, device=cfg.device)
            ctx.store.load(step, model=model, device=cfg.device)
            _frozen(model)
            ms, _ = fit_subnetwork(ctx, model, _bigram_objective(ctx), lam, "bigram")
            mask_path = ms.save(mask_dir / f"bigram-step{step:06d}-lam{sweep.lam_tag(lam)}")
        return ckpt_analysis.measure_entry(
            step, ms, val_loss=ctx.store.metadata(step).get("val_loss"),
            full_r=_sufficiency(ctx, model, None)["surprisal_r"],
            subnetwork_r=_sufficiency(ctx, model, ms)["surprisal_r"],
            mask_path=str(mask_path.relative_to(ctx.out)))

    result = ckpt_analysis.across_checkpoints(
        steps, measure, mask_dir, lam, recipe=cfg.recipe_record(),
        load_masks=lambda p: MaskSet.load(ctx.out / p), seed=cfg.seed)
    ctx.results["checkpoints"] = result.to_dict()


#: The study's stages in order: (name in timings.json, function of the context).
STAGES: tuple[tuple[str, Callable[[StudyContext], None]], ...] = (
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


# --------------------------------------------------------------------------- metrics

_LAYOUT_KEYS = ("first_mlp_share", "mlp_share", "attention_share", "vo_share", "qk_share",
                "layer_share", "layer_density", "kind_share", "kind_density", "plurality_layer",
                "plurality_group", "plurality_in_first_layer", "plurality_in_first_mlp")
_SUFF_KEYS = ("surprisal_r", "surprisal_r_capped", "surprisal_r_smoothed", "ce_to_bigram",
              "n_finite", "n_tokens")


def _overlap_record(ov: dict) -> dict:
    return {"ratio": ov["ratio"], "p_value": ov["p_value"],
            "observed_fraction": ov["overlap_fraction"],
            "expected_fraction": ov["expected_fraction"],
            "share_bigram_in_optimal": ov["share_a_in_b"],
            "layers": [{k: lo[k] for k in ("layer", "overlap", "expected", "ratio", "p_value")}
                       for lo in ov["layers"]]}


def collect_metrics(ctx: StudyContext) -> dict:
    """The run's ``metrics.json``: headline numbers first, details after."""
    r = ctx.results
    suff, ab = r["sufficiency"], r["ablation"]
    sel = ctx.sweep.selected
    full_res = r["residual"]["full"]
    lay = r["layout"]["bigram"]
    return {
        "model": ctx.lm_info,
        "recipe": ctx.cfg.recipe_record(),
        "corpus": {"name": ctx.corpus.name, "train_tokens": int(ctx.tokens.train.numel()),
                   "validation_tokens": int(ctx.tokens.validation.numel()),
                   "vocab_size": len(ctx.tokenizer)},
        "full_model": {k: suff["full"].get(k) for k in _SUFF_KEYS},
        "bigram_subnetwork": {"lambda": sel.lam, "active_fraction": sel.active_fraction,
                              "active_weights": ctx.bigram.n_active(),
                              **{k: suff["bigram"].get(k) for k in _SUFF_KEYS}},
        "optimal_subnetwork": {"lambda": ctx.sweep.selected_lambda,
                               "active_fraction": ctx.optimal.active_fraction(),
                               "surprisal_r": suff["optimal"]["surprisal_r"]},
        "random_subnetwork": {"surprisal_r": suff["random"]["surprisal_r"]},
        "ablation": {"loss_full": ab["loss_full"],
                     "loss_without_bigram": ab["losses"]["bigram"],
                     "loss_without_random": ab["losses"]["random"],
                     "loss_without_optimal": ab["losses"]["optimal"]},
        "overlap": _overlap_record(r["overlap"]),
        "layout": {"layers": lay["layers"], "kinds": lay["kinds"],
                   **{k: lay[k] for k in _LAYOUT_KEYS}},
        "residual": {"rotation_to_input": full_res["rotation_to_input"],
                     "rotation_to_output": full_res["rotation_to_output"],
                     "eigen_rel_tol": full_res.get("eigen_rel_tol", 0.0)},
        "sweep": [{"lambda": e.lam, "active_fraction": e.active_fraction,
                   "surprisal_r": e.surprisal_r} for e in ctx.sweep.entries],
        "controls": r.get("controls"),
        "checkpoints": ckpt_analysis.metrics_record(r["checkpoints"])
        if r.get("checkpoints") else None,
    }
