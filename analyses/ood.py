"""Out-of-distribution (OOD) scores from per-image likelihoods, and how well they separate.

Everything here works on per-image numbers, never on a model: compute each image's negative
log-likelihood under whatever model you have, pass the arrays (NumPy, torch or lists), and
get scores, metrics and figures.

Conventions:

- **Inputs are bits per dimension (bpd)**: an image's negative log-likelihood in bits divided
  by its number of subpixels ``D = C*H*W``, i.e. ``-log2 p(x) / D``. Use the discrete
  likelihood of the 8-bit values (what an autoregressive model over 256 levels, or a
  discretized logistic, gives). A model that reports nats per image converts with
  :func:`nats_to_bpd`.
- **A score is "higher = more in-distribution"**, so in-distribution is the positive class
  of every metric (AUROC, AUPRC, FPR at 80% TPR). All scores are in bits/dim.

Scores (Zhang, Zhang & McDonagh 2021, "On the Out-of-distribution Generalization of
Probabilistic Image Modelling", and the baselines it compares with):

- :func:`likelihood_score`: ``-bpd``; the classic baseline that fails on CIFAR10 vs SVHN.
- :func:`nonlocal_score`: ``bpd_local - bpd_full`` = ``(log p_full - log p_local)/(D ln 2)``,
  the non-local likelihood: what the full model knows beyond local pixel statistics.
- :func:`input_complexity_score`: ``compressor_bpd - bpd`` (Serra et al. 2020), the
  likelihood corrected by a generic lossless compressor's code length
  (:func:`codec_bits_per_dim`: PNG, WebP lossless, zlib, lzma, bz2).
- :func:`typicality_scores` / :func:`typicality_test`: the batch typicality test
  (Nalisnick et al. 2019), ``|mean batch bpd - mean reference bpd|``, on batches of M images.

:func:`ood_metrics` and :func:`evaluate_scores` give AUROC, AUPRC and FPR at 80% TPR (via
scikit-learn); :func:`plot_roc` and :func:`plot_score_histograms` draw them.
"""

from __future__ import annotations

import bz2
import io
import logging
import lzma
import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import plotly.graph_objects as go
import torch
from jaxtyping import Float, UInt8
from numpy.typing import ArrayLike
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from interp.errors import ConfigError, DataError, check_number, suggest
from interp.plots import color_for, figure, subplots
from interp.results import Result, bulky

log = logging.getLogger(__name__)

#: Generic lossless compressors :func:`codec_bits_per_dim` knows.
CODECS: tuple[str, ...] = ("png", "webp", "zlib", "lzma", "bz2")
#: Pillow modes for images with C channels (PNG and WebP need one of them).
_MODES = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}
#: The TPR at which the false positive rate is reported.
TPR_LEVEL = 0.8
#: ROC curves stored in results (and plotted) are cut to at most this many points.
MAX_ROC_POINTS = 200
_SCORE_UNIT = "bits/dim"

Images = UInt8[np.ndarray, "n c h w"] | UInt8[torch.Tensor, "n c h w"]


# ---------------------------------------------------------------------- inputs


def _vector(name: str, x: ArrayLike) -> np.ndarray:
    """``x`` as a finite 1-D float64 array, or a DataError saying what is wrong with it."""
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise DataError(f"{name} must be numbers, one per image; could not read it ({e}).") from e
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim != 1:
        raise DataError(f"{name} must hold one number per image (1-D), got shape "
                        f"{tuple(arr.shape)}. Flatten or reduce it per image first.")
    if arr.size == 0:
        raise DataError(f"{name} is empty: it needs at least one image's value.")
    bad = int((~np.isfinite(arr)).sum())
    if bad:
        n_nan = int(np.isnan(arr).sum())
        raise DataError(
            f"{name} has {bad} non-finite value{'s' if bad > 1 else ''} ({n_nan} NaN, "
            f"{bad - n_nan} inf) out of {arr.size}. Drop those images or fix the model output "
            "that produced them (e.g. a zero probability gives an infinite NLL) before scoring."
        )
    return arr


def _same_length(**arrays: np.ndarray) -> None:
    sizes = {k: v.size for k, v in arrays.items()}
    if len(set(sizes.values())) > 1:
        raise DataError(f"These must have one value per image for the same images, but their "
                        f"lengths differ: {sizes}.")


def nats_to_bpd(nll_nats: ArrayLike, dims: int) -> Float[np.ndarray, "n"]:
    """Per-image negative log-likelihood in nats (summed over the image) -> bits/dim, for
    images of ``dims = C*H*W`` subpixels."""
    check_number("dims", dims, low=1, integer=True)
    return _vector("nll_nats", nll_nats) / (dims * math.log(2))


# ---------------------------------------------------------------------- scores


def likelihood_score(bpd: ArrayLike) -> Float[np.ndarray, "n"]:
    """Raw likelihood: ``-bpd`` (higher = more likely = more in-distribution)."""
    return -_vector("bpd", bpd)


def nonlocal_score(bpd_full: ArrayLike, bpd_local: ArrayLike) -> Float[np.ndarray, "n"]:
    """The non-local likelihood, ``bpd_local - bpd_full``.

    Equals ``(log p_full(x) - log p_local(x)) / (D ln 2)``: positive where the full model
    (whole causal context) explains the image better than the local one (a few neighbouring
    pixels), which is what training-set semantics buy. Both arrays are per image, same order.
    """
    full, local = _vector("bpd_full", bpd_full), _vector("bpd_local", bpd_local)
    _same_length(bpd_full=full, bpd_local=local)
    return local - full


def _encode(image: np.ndarray, codec: str) -> bytes:
    """One [C, H, W] uint8 image as the whole file/stream the codec writes."""
    if codec in ("png", "webp"):
        from PIL import Image

        c = image.shape[0]
        if c not in _MODES:
            raise DataError(f"{codec.upper()} stores 1 to 4 channels, got {c}. Use codec='zlib' "
                            "or 'lzma' for other channel counts.")
        hwc = np.ascontiguousarray(image.transpose(1, 2, 0))
        pil = Image.fromarray(hwc[:, :, 0] if c == 1 else hwc)
        buf = io.BytesIO()
        if codec == "png":
            pil.save(buf, format="PNG", optimize=True)
        else:
            pil.save(buf, format="WEBP", lossless=True, quality=100, method=6, exact=True)
        return buf.getvalue()
    raw = np.ascontiguousarray(image.transpose(1, 2, 0)).tobytes()
    if codec == "zlib":
        return zlib.compress(raw, 9)
    if codec == "lzma":
        return lzma.compress(raw, preset=9 | lzma.PRESET_EXTREME)
    return bz2.compress(raw, 9)


def codec_bits_per_dim(images: Images, codec: str = "png") -> Float[np.ndarray, "n"]:
    """Each image's code length under a generic lossless compressor, in bits per subpixel.

    Every image is compressed on its own and the whole output is counted (file headers and
    checksums included), then divided by ``C*H*W``: ``8 * len(file) / (C*H*W)``. An
    incompressible image costs a little over 8 bits/dim; a constant one far less.

    Args:
        images: ``uint8 [N, C, H, W]`` (NumPy or torch), values 0..255.
        codec: ``"png"`` (Pillow, ``optimize=True``: zlib level 9 and the smallest
            encoding; 1, 2, 3 or 4 channels as L, LA, RGB, RGBA), ``"webp"`` (Pillow
            lossless, ``quality=100, method=6``: the slowest, smallest setting; Pillow stores
            1- and 2-channel images as RGB/RGBA), or ``"zlib"`` (level 9), ``"lzma"``
            (.xz container, preset 9 extreme), ``"bz2"`` (level 9) applied to the raw
            bytes in H, W, C order (channels interleaved, as image files store them).

    Returns:
        float64 ``[N]``, bits per dimension.
    """
    if codec not in CODECS:
        raise ConfigError(f"Unknown codec {codec!r}; choose one of {', '.join(CODECS)}."
                          + suggest(str(codec), CODECS))
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    if images.dtype != np.uint8 or images.ndim != 4:
        raise DataError(f"images must be uint8 [N, C, H, W], got {images.dtype} with shape "
                        f"{tuple(images.shape)}.")
    n, c, h, w = images.shape
    if n == 0 or c * h * w == 0:
        raise DataError(f"images of shape {tuple(images.shape)} hold no pixels to compress.")
    lengths = np.array([len(_encode(img, codec)) for img in images], dtype=np.float64)
    return 8.0 * lengths / (c * h * w)


def input_complexity_score(bpd: ArrayLike, images: Images,
                           codec: str = "png") -> Float[np.ndarray, "n"]:
    """Input complexity (Serra et al. 2020): ``codec_bpd - bpd``, i.e. ``-(bpd - codec_bpd)``.

    Simple images (flat, few colours) are likely under any model; subtracting what a
    generic compressor needs for the same image (:func:`codec_bits_per_dim`) leaves how much
    better the model does than a dataset-agnostic code. ``bpd[i]`` must belong to
    ``images[i]``.
    """
    arr = _vector("bpd", bpd)
    comp = codec_bits_per_dim(images, codec)
    _same_length(bpd=arr, images=comp)
    return comp - arr


# ---------------------------------------------------------------------- metrics


@dataclass(repr=False)
class OODMetrics(Result):
    """How well one score separates in-distribution (positive class) from OOD inputs.

    ``fpr_at_80_tpr``: the fraction of OOD inputs scored above the threshold that keeps 80%
    of in-distribution ones (lower is better). ``fpr``/``tpr``: the ROC curve, at most
    ``MAX_ROC_POINTS`` points.
    """

    auroc: float
    auprc: float
    fpr_at_80_tpr: float
    n_in: int
    n_out: int
    fpr: list[float] = bulky(list)
    tpr: list[float] = bulky(list)


def _subsample(n: int, k: int) -> np.ndarray:
    """Up to ``k`` indices into ``n`` points, evenly spread, first and last included."""
    return np.arange(n) if n <= k else np.unique(np.round(np.linspace(0, n - 1, k)).astype(int))


def ood_metrics(score_in: ArrayLike, score_out: ArrayLike) -> OODMetrics:
    """AUROC, AUPRC and FPR at 80% TPR of a score (higher = more in-distribution), with
    in-distribution as the positive class: AUROC 1 = perfect, 0.5 = chance, 0 = reversed."""
    s_in, s_out = _vector("score_in", score_in), _vector("score_out", score_out)
    y = np.concatenate([np.ones(s_in.size), np.zeros(s_out.size)])
    s = np.concatenate([s_in, s_out])
    # every threshold: sklearn's dropped collinear points could hide where TPR reaches 80%
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    fpr80 = float(fpr[np.argmax(tpr >= TPR_LEVEL)])
    fpr_c, tpr_c, _ = roc_curve(y, s, drop_intermediate=True)
    keep = _subsample(fpr_c.size, MAX_ROC_POINTS)
    return OODMetrics(auroc=float(roc_auc_score(y, s)), auprc=float(average_precision_score(y, s)),
                      fpr_at_80_tpr=fpr80, n_in=int(s_in.size), n_out=int(s_out.size),
                      fpr=fpr_c[keep].tolist(), tpr=tpr_c[keep].tolist())


@dataclass(repr=False)
class OODResult(Result):
    """Metrics of several OOD scores on the same in-distribution / OOD pair."""

    metrics: dict[str, OODMetrics]
    in_label: str = "in-distribution"
    out_label: str = "OOD"

    def table(self) -> list[dict[str, Any]]:
        """One row per score (for report tables)."""
        return [{"score": name, "AUROC": m.auroc, "AUPRC": m.auprc, "FPR@80%TPR": m.fpr_at_80_tpr,
                 "n_in": m.n_in, "n_out": m.n_out} for name, m in self.metrics.items()]

    def summary_rows(self) -> list[tuple[str, Any]]:
        rows: list[tuple[str, Any]] = [("in vs out", f"{self.in_label} vs {self.out_label}")]
        rows += [(name, {"AUROC": m.auroc, "AUPRC": m.auprc, "FPR@80%TPR": m.fpr_at_80_tpr})
                 for name, m in self.metrics.items()]
        return rows


def evaluate_scores(
    scores: Mapping[str, tuple[ArrayLike, ArrayLike]],
    *,
    in_label: str = "in-distribution",
    out_label: str = "OOD",
) -> OODResult:
    """:func:`ood_metrics` for each ``name -> (score_in, score_out)``, in the given order."""
    if not scores:
        raise DataError("No scores to evaluate: pass name -> (score_in, score_out).")
    metrics = {}
    for name, pair in scores.items():
        if len(pair) != 2:
            raise DataError(f"Score {name!r} must be a pair (score_in, score_out), got "
                            f"{len(pair)} items.")
        try:
            metrics[name] = ood_metrics(*pair)
        except DataError as e:
            raise DataError(f"Score {name!r}: {e}") from e
        log.info("OOD %s: AUROC %.3f, FPR@80%%TPR %.3f", name, metrics[name].auroc,
                 metrics[name].fpr_at_80_tpr)
    return OODResult(metrics=metrics, in_label=in_label, out_label=out_label)


# ---------------------------------------------------------------------- typicality


def _check_batches(batch_size: int, n_batches: int, **sets: np.ndarray) -> None:
    check_number("batch_size", batch_size, low=1, integer=True)
    check_number("n_batches", n_batches, low=1, integer=True)
    for name, arr in sets.items():
        if arr.size < batch_size:
            raise ConfigError(f"batch_size={batch_size} is larger than {name} ({arr.size} "
                              "images); use a smaller batch or more images.")


def _draw_batches(values: np.ndarray, batch_size: int, n_batches: int,
                  rng: np.random.Generator) -> np.ndarray:
    """[n_batches, batch_size]: each batch drawn without replacement, batches independent."""
    return np.stack([values[rng.choice(values.size, batch_size, replace=False)]
                     for _ in range(n_batches)])


def typicality_statistic(batch_bpd: ArrayLike, reference_mean: float) -> Float[np.ndarray, "b"]:
    """``|mean(batch bpd) - reference_mean|`` per batch; ``batch_bpd`` is ``[M]`` (one batch)
    or ``[B, M]``. ``reference_mean`` estimates the entropy rate: the mean bpd of the
    training set (or a held-out in-distribution set)."""
    if isinstance(batch_bpd, torch.Tensor):
        batch_bpd = batch_bpd.detach().to("cpu", torch.float64).numpy()
    arr = np.asarray(batch_bpd, dtype=np.float64)
    arr = arr.reshape(1, -1) if arr.ndim == 1 else arr
    if arr.ndim != 2 or arr.size == 0:
        raise DataError(f"batch_bpd must be [M] or [B, M] with M > 0, got shape {arr.shape}.")
    _vector("batch_bpd", arr.ravel())
    return np.abs(arr.mean(axis=1) - float(reference_mean))


def typicality_threshold(bpd_validation: ArrayLike, reference_mean: float, batch_size: int, *,
                         alpha: float = 0.01, n_bootstrap: int = 1000, seed: int = 0) -> float:
    """The test's threshold: the ``1 - alpha`` quantile of the statistic over ``n_bootstrap``
    batches of ``batch_size`` in-distribution images drawn from ``bpd_validation``. A batch
    whose statistic exceeds it is declared OOD (false alarm rate about ``alpha``)."""
    check_number("alpha", alpha, low=0, high=1, low_open=True, high_open=True)
    val = _vector("bpd_validation", bpd_validation)
    _check_batches(batch_size, n_bootstrap, bpd_validation=val)
    batches = _draw_batches(val, batch_size, n_bootstrap, np.random.default_rng(seed))
    return float(np.quantile(typicality_statistic(batches, reference_mean), 1 - alpha))


def _typicality_stats(bpd_in_test: ArrayLike, bpd_out: ArrayLike, bpd_reference: ArrayLike,
                      batch_size: int, n_batches: int, seed: int
                      ) -> tuple[float, np.ndarray, np.ndarray]:
    ins, outs = _vector("bpd_in_test", bpd_in_test), _vector("bpd_out", bpd_out)
    ref = _vector("bpd_reference", bpd_reference)
    _check_batches(batch_size, n_batches, bpd_in_test=ins, bpd_out=outs)
    rng = np.random.default_rng(seed)
    mean = float(ref.mean())
    stat_in = typicality_statistic(_draw_batches(ins, batch_size, n_batches, rng), mean)
    stat_out = typicality_statistic(_draw_batches(outs, batch_size, n_batches, rng), mean)
    return mean, stat_in, stat_out


def typicality_scores(
    bpd_in_test: ArrayLike,
    bpd_out: ArrayLike,
    bpd_reference: ArrayLike,
    batch_size: int,
    n_batches: int = 200,
    seed: int = 0,
) -> tuple[Float[np.ndarray, "b"], Float[np.ndarray, "b"]]:
    """Batch-level scores ``-|mean(batch bpd) - mean(bpd_reference)|`` (Nalisnick et al. 2019)
    for ``n_batches`` batches of ``batch_size`` images drawn from the in-distribution test set
    and from the OOD set: ``(score_in, score_out)``, ready for :func:`ood_metrics` (which then
    measures batch-level detection). Batches are drawn without replacement within a batch,
    independently across batches; the same ``seed`` gives the same batches."""
    _, stat_in, stat_out = _typicality_stats(bpd_in_test, bpd_out, bpd_reference, batch_size,
                                             n_batches, seed)
    return -stat_in, -stat_out


@dataclass(repr=False)
class TypicalityResult(Result):
    """The batch typicality test: threshold, how often it fires on each side, and the
    batch-level metrics of the score ``-statistic``."""

    batch_size: int
    n_batches: int
    alpha: float
    reference_mean: float
    threshold: float
    rejected_in: float
    rejected_out: float
    metrics: OODMetrics
    statistic_in: list[float] = bulky(list)
    statistic_out: list[float] = bulky(list)


def typicality_test(
    bpd_in_test: ArrayLike,
    bpd_out: ArrayLike,
    bpd_reference: ArrayLike,
    *,
    batch_size: int,
    n_batches: int = 200,
    alpha: float = 0.01,
    bpd_validation: ArrayLike | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> TypicalityResult:
    """Run the typicality test on batches of the in-distribution test set and of the OOD set.

    Args:
        bpd_in_test, bpd_out: per-image bpd of in-distribution test images and OOD images.
        bpd_reference: per-image bpd of the training set; its mean estimates the entropy.
        batch_size: M, images per batch (the test needs a few; the paper used M >= 2).
        alpha: false alarm rate the threshold is set for.
        bpd_validation: held-out in-distribution bpd for the bootstrap threshold; default
            ``bpd_reference`` (then the threshold is slightly optimistic).
        n_bootstrap: batches drawn for the threshold.
    """
    mean, stat_in, stat_out = _typicality_stats(bpd_in_test, bpd_out, bpd_reference,
                                                batch_size, n_batches, seed)
    val = bpd_reference if bpd_validation is None else bpd_validation
    thr = typicality_threshold(val, mean, batch_size, alpha=alpha, n_bootstrap=n_bootstrap,
                               seed=seed + 1)
    result = TypicalityResult(
        batch_size=batch_size, n_batches=n_batches, alpha=alpha, reference_mean=mean,
        threshold=thr, rejected_in=float((stat_in > thr).mean()),
        rejected_out=float((stat_out > thr).mean()), metrics=ood_metrics(-stat_in, -stat_out),
        statistic_in=stat_in.tolist(), statistic_out=stat_out.tolist(),
    )
    log.info("typicality (M=%d): OOD batches rejected %.1f%%, in-distribution %.1f%%",
             batch_size, 100 * result.rejected_out, 100 * result.rejected_in)
    return result


# ---------------------------------------------------------------------- figures


def plot_roc(result: OODResult) -> go.Figure:
    """ROC curves, one per score, with the chance diagonal; legend and hover name the
    score and its AUROC."""
    fig = figure(title=f"ROC: {result.in_label} (positive) vs {result.out_label}",
                 height=520, width=620)
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="chance (AUROC 0.5)",
                             line={"color": "#9CA3AF", "dash": "dot"}, hoverinfo="skip"))
    for i, (name, m) in enumerate(result.metrics.items()):
        fig.add_trace(go.Scatter(
            x=m.fpr, y=m.tpr, mode="lines", name=f"{name} (AUROC {m.auroc:.3f})",
            line={"color": color_for(name, i), "shape": "hv"},
            hovertemplate=f"<b>{name}</b>, AUROC {m.auroc:.3f}<br>FPR %{{x:.3f}}, "
                          "TPR %{y:.3f}<extra></extra>",
        ))
    fig.update_xaxes(title_text=f"false positive rate (fraction of {result.out_label} kept)",
                     range=[0, 1], constrain="domain")
    fig.update_yaxes(title_text=f"true positive rate (fraction of {result.in_label} kept)",
                     range=[0, 1], scaleanchor="x", scaleratio=1)
    return fig


def plot_score_histograms(
    scores: Mapping[str, tuple[ArrayLike, ArrayLike]],
    names: Sequence[str] = ("in-distribution", "OOD"),
) -> go.Figure:
    """Overlaid histograms of each score (one subplot per score) for the in-distribution
    and OOD images; ``names`` labels the two sets. Both share bins within a subplot and are
    normalised to probability, so sets of different sizes compare."""
    if not scores:
        raise DataError("Nothing to plot: pass name -> (score_in, score_out).")
    if len(names) != 2:
        raise ConfigError(f"names must name the two sets (in, out), got {list(names)}.")
    cols = min(3, len(scores))
    rows = -(-len(scores) // cols)
    fig = subplots(rows, cols, titles=list(scores))
    fig.update_layout(title="Score distributions (higher = more in-distribution)",
                      barmode="overlay", height=320 * rows + 120, width=380 * cols + 160)
    for k, (score, (s_in, s_out)) in enumerate(scores.items()):
        sides = (_vector(f"{score} {names[0]}", s_in), _vector(f"{score} {names[1]}", s_out))
        lo, hi = min(a.min() for a in sides), max(a.max() for a in sides)
        size = (hi - lo) / 40 if hi > lo else 1.0
        r, c = k // cols + 1, k % cols + 1
        for j, (label, arr) in enumerate(zip(names, sides)):
            fig.add_trace(go.Histogram(
                x=arr, name=label, legendgroup=label, showlegend=k == 0, opacity=0.6,
                histnorm="probability", marker_color=color_for(label, j),
                xbins={"start": lo, "end": hi + size, "size": size},
                hovertemplate=f"{score}, {label}: %{{x}}<br>%{{y:.1%}} of images<extra></extra>",
            ), row=r, col=c)
        fig.update_xaxes(title_text=f"score ({_SCORE_UNIT})", row=r, col=c)
        fig.update_yaxes(title_text="fraction of images" if c == 1 else None, row=r, col=c)
    return fig
