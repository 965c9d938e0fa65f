"""The stages of the image-likelihood study as one ordered table, each reusing its artifacts.

data -> per seed: local model, full model (warm-started from it), bits/dim on the in- and
out-of-distribution test sets -> OOD scores -> lossless compression -> local subnetwork of
the full model. Models train with a checkpoint store under ``models/`` (so an interrupted
run resumes mid-training); every stage writes its artifact before the next one starts.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from analyses import compression, layout, ood, overlap
from analyses.studies._ood_config import OODStudyConfig
from analyses.studies.common import ARTIFACT_FIX, read_artifact, resolve_workers, run_parallel
from interp.compress import QuantizedLocalModel, save_quantized
from interp.data.images import ImageSet, builtin_images
from interp.io import read_tensors, save_tensors, write_json
from interp.masks import ContinuousSparsification, MaskSet, fit_masks
from interp.masks.files import mask_path
from interp.models.checkpoints import CheckpointStore
from interp.models.pixel import FullPixelCNN, LocalPixelCNN, build_pixel_model, pixel_targets
from interp.models.pixel_train import evaluate_bpd, train_pixel_model
from interp.objectives import PixelMatchObjective

log = logging.getLogger(__name__)

#: bits/dim arrays saved per seed
BPD_KEYS = ("local_in", "full_in", "local_out", "full_out", "full_reference")


@dataclass
class OODContext:
    """What the stages share: the config, the run directory and what earlier stages built."""

    cfg: OODStudyConfig
    out: Path
    in_train: ImageSet | None = None
    in_test: ImageSet | None = None
    out_test: ImageSet | None = None
    models: dict[int, tuple[LocalPixelCNN, FullPixelCNN]] = field(default_factory=dict)
    bpd: dict[int, dict[str, Tensor]] = field(default_factory=dict)
    results: dict = field(default_factory=dict)
    masks: dict[str, MaskSet] = field(default_factory=dict)
    figures: dict = field(default_factory=dict)
    progress: bool = True

    @property
    def device(self) -> str:
        return self.cfg.device



def _reuse_json(ctx: OODContext, name: str, compute: Callable[[], dict]) -> dict:
    path = ctx.out / name
    if path.is_file():
        return read_artifact(path)
    value = compute()
    write_json(path, value)
    return value


# --------------------------------------------------------------------------- data


def prepare_data(ctx: OODContext) -> None:
    cfg = ctx.cfg
    ctx.in_train = builtin_images(cfg.in_data, "train", n=cfg.n_train, seed=0)
    ctx.in_test = builtin_images(cfg.in_data, "test", n=cfg.n_test, seed=0)
    n_out = min(cfg.n_test, len(builtin_images(cfg.out_data, "test")))
    ctx.out_test = builtin_images(cfg.out_data, "test", n=n_out, seed=0)


# --------------------------------------------------------------------------- models


def _train(ctx: OODContext, model, images: Tensor, val: Tensor, train_cfg, name: str,
           identity: dict) -> None:
    store = CheckpointStore(ctx.out / "models" / name, identity={
        **identity, "train": train_cfg.__dict__})
    train_pixel_model(model, images, val, train_cfg, store=store, device=ctx.device,
                      desc=f"train {name}", progress=ctx.progress)
    model.eval()


def _data_identity(ctx: OODContext) -> dict:
    cfg = ctx.cfg
    return {"in_data": cfg.in_data, "n_train": cfg.n_train}


def train_seed(ctx: OODContext, seed: int) -> tuple[LocalPixelCNN, FullPixelCNN]:
    """The local model and the full model warm-started from it, for one seed."""
    cfg = ctx.cfg
    torch.manual_seed(seed)
    local = build_pixel_model(cfg.pixel_config("local")).to(ctx.device)
    val = ctx.in_test.images[:200]
    ident = {**_data_identity(ctx), "arch": cfg.pixel_config("local").to_dict(), "seed": seed}
    _train(ctx, local, ctx.in_train.images, val, cfg.local_training(seed), f"local-seed{seed}",
           ident)
    full = FullPixelCNN.from_local(local, **{k: v for k, v in cfg.pixel_config("full")
                                              .to_dict().items() if k != "kind"})
    ident = {**ident, "arch": cfg.pixel_config("full").to_dict(), "warm_start": True}
    _train(ctx, full, ctx.in_train.images, val, cfg.full_training(seed), f"full-seed{seed}",
           ident)
    return local, full


def _bpd_path(ctx: OODContext, seed: int) -> Path:
    return ctx.out / "scores" / f"bpd-seed{seed}.safetensors"


def _train_job(cfg: OODStudyConfig, out: str, in_train: ImageSet, in_test: ImageSet,
               seed: int | None) -> None:
    """One worker's job: a seed's two models, or (``seed`` None) the compression model."""
    ctx = OODContext(cfg=cfg, out=Path(out), in_train=in_train, in_test=in_test,
                     progress=False)
    if seed is None:
        compression_model(ctx)
    else:
        train_seed(ctx, seed)


def train_models(ctx: OODContext) -> None:
    """Per seed: train (or resume) both models, then save their bits/dim on every set.

    The seeds' models and the compression model are independent jobs: with more than one
    worker (``cfg.workers``, default one per core) they train in parallel processes first,
    and the loop below then only loads them from their checkpoint stores.
    """
    cfg = ctx.cfg
    jobs = [(_train_job, (cfg, str(ctx.out), ctx.in_train, ctx.in_test, seed))
            for seed in cfg.seeds if not _bpd_path(ctx, seed).is_file()]
    if not (ctx.out / "compression.json").is_file():
        jobs.append((_train_job, (cfg, str(ctx.out), ctx.in_train, ctx.in_test, None)))
    workers = resolve_workers(cfg.workers, len(jobs), cfg.device)
    if workers > 1:
        log.info("training %d model jobs in %d processes", len(jobs), workers)
        run_parallel(jobs, workers)
    for seed in cfg.seeds:
        path = _bpd_path(ctx, seed)
        local, full = train_seed(ctx, seed)
        ctx.models[seed] = (local, full)
        if path.is_file():
            ctx.bpd[seed] = read_tensors(path, required=BPD_KEYS, what="Bits/dim artifact",
                                         fix=ARTIFACT_FIX)
            continue
        dev = ctx.device
        bpd = {"local_in": evaluate_bpd(local, ctx.in_test.images, device=dev),
               "full_in": evaluate_bpd(full, ctx.in_test.images, device=dev),
               "local_out": evaluate_bpd(local, ctx.out_test.images, device=dev),
               "full_out": evaluate_bpd(full, ctx.out_test.images, device=dev),
               # typicality reference: in-distribution training images the test never saw
               "full_reference": evaluate_bpd(full, ctx.in_train.images[:1000], device=dev)}
        save_tensors(path, bpd)
        ctx.bpd[seed] = bpd


# --------------------------------------------------------------------------- scores


def ood_scores(ctx: OODContext, seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    b = {k: v.numpy() for k, v in ctx.bpd[seed].items()}
    return {
        "likelihood": (ood.likelihood_score(b["full_in"]), ood.likelihood_score(b["full_out"])),
        "likelihood_local": (ood.likelihood_score(b["local_in"]),
                             ood.likelihood_score(b["local_out"])),
        "nonlocal": (ood.nonlocal_score(b["full_in"], b["local_in"]),
                     ood.nonlocal_score(b["full_out"], b["local_out"])),
        "input_complexity": (ood.input_complexity_score(b["full_in"], ctx.in_test.images),
                             ood.input_complexity_score(b["full_out"], ctx.out_test.images)),
    }


def score_ood(ctx: OODContext) -> None:
    """AUROC/AUPRC/FPR@80%TPR of every score per seed, and the batch typicality test."""
    def compute() -> dict:
        per_seed = {}
        for seed in ctx.cfg.seeds:
            res = ood.evaluate_scores(ood_scores(ctx, seed), in_label=ctx.cfg.in_data,
                                      out_label=ctx.cfg.out_data)
            b = ctx.bpd[seed]
            typ = ood.typicality_test(b["full_in"].numpy(), b["full_out"].numpy(),
                                      b["full_reference"].numpy(),
                                      batch_size=ctx.cfg.typicality_batch, seed=seed)
            bpd = {k: float(v.mean()) for k, v in b.items()}
            per_seed[str(seed)] = {"metrics": res.to_dict(), "typicality": typ.to_dict(),
                                   "bpd": bpd}
        return {"seeds": per_seed}
    ctx.results["ood"] = _reuse_json(ctx, "ood.json", compute)


# --------------------------------------------------------------------------- compression


def _compress_sets(cfg: OODStudyConfig) -> tuple[ImageSet, ImageSet]:
    return (builtin_images(cfg.compress_data, "train", n=cfg.compress_train, seed=0),
            builtin_images(cfg.compress_data, "test", n=cfg.compress_test, seed=0))


def compression_model(ctx: OODContext) -> LocalPixelCNN:
    """The local model that codes the compression set, trained on its training split (or
    loaded from its finished checkpoint store)."""
    cfg = ctx.cfg
    train, test = _compress_sets(cfg)
    torch.manual_seed(0)
    arch = cfg.pixel_config("local", head=cfg.compress_head)
    arch.channels = train.shape[1]
    local = build_pixel_model(arch).to(cfg.device)
    _train(ctx, local, train.images, test.images[:200], cfg.compress_training(),
           "compress-local", {"data": cfg.compress_data, "n_train": cfg.compress_train,
                              "arch": arch.to_dict()})
    return local.cpu()


def run_compression(ctx: OODContext) -> None:
    """A local model trained on the compression set, quantized, compared with PNG/WebP/..."""
    cfg = ctx.cfg

    def compute() -> dict:
        local = compression_model(ctx)
        save_quantized(QuantizedLocalModel.from_model(local),
                       ctx.out / "models" / "compress-quantized")
        res = compression.compare_codecs(local, _compress_sets(cfg)[1].images)
        return {"data": cfg.compress_data, **res.to_dict()}
    ctx.results["compression"] = _reuse_json(ctx, "compression.json", compute)


# --------------------------------------------------------------------------- subnetwork


def _fit(ctx: OODContext, model: FullPixelCNN, teacher, label: str) -> tuple[MaskSet, dict]:
    """One subnetwork of the full model: the same recipe for every one."""
    cfg = ctx.cfg
    path = ctx.out / "masks" / label
    if mask_path(path).is_file():
        ms = MaskSet.load(path, model=model)
        return ms, ms.metadata.get("fit", {})
    ms = MaskSet(pixel_targets(model), ContinuousSparsification(
        temperature_factor=cfg.temperature_factor))
    images = ctx.in_train.images

    def batches(seed: int):
        gen = torch.Generator().manual_seed(seed)
        while True:
            yield images[torch.randint(images.shape[0], (cfg.mask_batch,), generator=gen)]

    res = fit_masks(model, ms, PixelMatchObjective(teacher, label), batches,
                    lam=cfg.mask_lambda, lr=cfg.mask_lr, max_steps=cfg.mask_steps,
                    device=cfg.device, seed=0)
    info = {"steps": res.steps, "stopped_reason": res.stopped_reason,
            "seconds": round(res.seconds, 1), "final_kl_bits": res.final.get("task_loss")}
    ms.metadata.update({"objective": label, "lambda": cfg.mask_lambda, "fit": info})
    ms.save(path)
    return ms, info


def local_subnetwork(ctx: OODContext) -> None:
    """Inside the first seed's full model: a subnetwork trained to predict like the local
    model, and (the analogue of the bigram study's optimal subnetwork) one trained to predict
    like the full model itself; their size, layout and overlap, and the OOD score
    ``bpd_subnetwork - bpd_full``."""
    cfg = ctx.cfg
    if not cfg.subnetwork:
        return
    seed = cfg.seeds[0]
    local, full = ctx.models[seed]

    def compute() -> dict:
        sub, sub_info = _fit(ctx, full, local, "local_subnetwork")
        opt, opt_info = _fit(ctx, full, copy.deepcopy(full), "optimal_subnetwork")
        out = {"seed": seed, "fit": sub_info, "optimal_fit": opt_info,
               "active_fraction": sub.active_fraction(),
               "optimal_active_fraction": opt.active_fraction(),
               "layout": layout.layout_analysis(sub, label="local subnetwork").to_dict(),
               "optimal_layout": layout.layout_analysis(opt, label="optimal").to_dict(),
               "overlap": overlap.overlap_analysis(sub, opt, label_a="local subnetwork",
                                                   label_b="optimal").to_dict()}
        sub.attach(full)
        sub.mode = "keep"
        try:
            b_in = evaluate_bpd(full, ctx.in_test.images, device=cfg.device).numpy()
            b_out = evaluate_bpd(full, ctx.out_test.images, device=cfg.device).numpy()
        finally:
            sub.detach()
        full_b = ctx.bpd[seed]
        res = ood.evaluate_scores({"nonlocal_subnetwork": (
            ood.nonlocal_score(full_b["full_in"].numpy(), b_in),
            ood.nonlocal_score(full_b["full_out"].numpy(), b_out))})
        out.update({"bpd_in": float(b_in.mean()), "bpd_out": float(b_out.mean()),
                    "ood": res.to_dict()})
        return out
    ctx.results["subnetwork"] = _reuse_json(ctx, "subnetwork.json", compute)


#: The study's stages, in order: (name, function of the context).
STAGES: list[tuple[str, Callable[[OODContext], None]]] = [
    ("data", prepare_data),
    ("models", train_models),
    ("scores", score_ood),
    ("compression", run_compression),
    ("subnetwork", local_subnetwork),
]


# --------------------------------------------------------------------------- metrics


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


def _reach(cfg: OODStudyConfig, hw: tuple[int, int]) -> dict:
    """How far the full model's stacks see (rows up and pixels sideways), and whether that
    covers the whole causal past of an image of this size."""
    reach = 1 + sum(cfg.dilations)
    return {"dilations": list(cfg.dilations), "stack_channels": cfg.stack_channels,
            "reach_pixels": reach, "whole_causal_past": reach >= max(hw) - 1,
            "local_horizon": cfg.horizon}


def compression_metrics(c: dict) -> dict:
    """The compression block of ``metrics.json`` from the stage's artifact."""
    codecs = c["codec_bpd"]
    whole_set = {k: v for k, v in codecs.items() if k.endswith("_set")}
    best = min(whole_set or codecs, key=(whole_set or codecs).get)
    return {
        "data": c["data"], "n_images": c["n_images"], "head": c["head"],
        "bpd_model": c["stream_bpd"], "bpd_model_one_stream": c["set_stream_bpd"],
        "bpd_payload": c["payload_bpd"], "bpd_float_nll": c["float_nll_bpd"],
        "bpd_quantized_nll": c["quantized_nll_bpd"], "quantization_gap": c["quantization_gap"],
        "coder_overhead": c["coder_overhead"],
        **{f"bpd_{k}": v for k, v in codecs.items()},
        "best_codec": best, "bpd_best_codec": codecs[best], "codecs": codecs,
        "roundtrip_exact": c["roundtrip_exact"],
        "encode_images_per_s": c["encode_images_per_s"],
        "decode_images_per_s": c["decode_images_per_s"].get("wavefront", float("nan")),
        "decode_sequential_images_per_s": c["decode_images_per_s"].get("sequential",
                                                                       float("nan")),
    }


def collect_metrics(ctx: OODContext) -> dict:
    """``metrics.json``: means over seeds with the per-seed values beside them."""
    cfg, r = ctx.cfg, ctx.results
    seeds = r["ood"]["seeds"]
    per = {name: [seeds[s]["metrics"]["metrics"][name] for s in seeds]
           for name in next(iter(seeds.values()))["metrics"]["metrics"]}
    bpd_keys = ("local_in", "full_in", "local_out", "full_out")
    metrics = {
        "pair": {"in": cfg.in_data, "out": cfg.out_data, "n_train": len(ctx.in_train),
                 "n_in_test": len(ctx.in_test), "n_out_test": len(ctx.out_test)},
        "seeds": list(cfg.seeds),
        "full_model": _reach(cfg, ctx.in_test.shape[2:]),
        "bpd": {k: _mean([seeds[s]["bpd"][k] for s in seeds]) for k in bpd_keys},
        "bpd_per_seed": {k: [seeds[s]["bpd"][k] for s in seeds] for k in bpd_keys},
        "auroc": {name: _mean([m["auroc"] for m in ms]) for name, ms in per.items()},
        "auroc_per_seed": {name: [m["auroc"] for m in ms] for name, ms in per.items()},
        "auprc": {name: _mean([m["auprc"] for m in ms]) for name, ms in per.items()},
        "fpr_at_80_tpr": {name: _mean([m["fpr_at_80_tpr"] for m in ms])
                          for name, ms in per.items()},
        "typicality": {
            "batch_size": cfg.typicality_batch,
            "auroc": _mean([seeds[s]["typicality"]["metrics"]["auroc"] for s in seeds]),
            "auroc_per_seed": [seeds[s]["typicality"]["metrics"]["auroc"] for s in seeds]},
    }
    sub = r.get("subnetwork")
    if sub:
        m = sub["ood"]["metrics"]["nonlocal_subnetwork"]
        metrics["auroc"]["nonlocal_subnetwork"] = m["auroc"]
        metrics["auprc"]["nonlocal_subnetwork"] = m["auprc"]
        metrics["fpr_at_80_tpr"]["nonlocal_subnetwork"] = m["fpr_at_80_tpr"]
        metrics["local_subnetwork"] = {
            "seed": sub["seed"], "active_fraction": sub["active_fraction"],
            "optimal_active_fraction": sub["optimal_active_fraction"],
            "bpd_in": sub["bpd_in"], "bpd_out": sub["bpd_out"],
            "auroc_nonlocal": m["auroc"],
            "auroc_nonlocal_local_model_same_seed":
                seeds[str(sub["seed"])]["metrics"]["metrics"]["nonlocal"]["auroc"],
            "final_kl_bits": sub["fit"].get("final_kl_bits"),
            "kind_share": sub["layout"].get("kind_share"),
            "overlap_ratio": sub["overlap"]["ratio"], "overlap_p": sub["overlap"]["p_value"],
        }
    metrics["compression"] = compression_metrics(r["compression"])
    return metrics
