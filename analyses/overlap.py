"""Overlap of two subnetworks against a null of random subnetworks with the same layout.

The null keeps each subnetwork's count per block (per target weight matrix) and places the
kept weights uniformly at random among the block's elements (element-level shuffling, not the
row shuffling of the paper's public code). In a block of ``n`` weights with ``k_a`` and ``k_b``
kept, the overlap is then hypergeometric(n, k_a, k_b) with mean ``k_a k_b / n``; the total is
a sum of independent hypergeometrics. Its exact distribution is computed by convolving the
per-block pmfs (each cut to where it is not negligible), giving ``P(overlap >= observed)`` and
the mid-p value; a normal approximation and an optional Monte Carlo check come beside it.
The same test runs within each layer (``OverlapResult.layers``): is the overlap above chance
layer by layer? To draw a subnetwork from the null itself, use ``MaskSet.random_like`` or
``interp.masks.random_masks``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import plotly.graph_objects as go
from scipy import signal, special, stats

from analyses.layout import Masks, Positions, aligned, kind_label, layer_label, split_masks
from interp.errors import InterpError, MaskError
from interp.masks.targets import Target
from interp.plots import color_for, figure
from interp.report import format_p
from interp.results import Result, bulky

log = logging.getLogger(__name__)

#: Per-block pmfs are cut where they fall below this fraction of their peak.
_PMF_REL_FLOOR = 1e-40
#: FFT convolution is accurate to ~1e-16 of the peak; values below this are noise.
_FFT_REL_FLOOR = 1e-14
_DIRECT_MAX_WORK = 2_000_000
_MAX_SUPPORT = 50_000_000


@dataclass(repr=False)
class LayerOverlap(Result):
    """Overlap within one layer, against the same exact null restricted to its blocks."""

    layer: int | None
    n_weights: int
    size_a: int
    size_b: int
    overlap: int
    expected: float
    ratio: float
    p_value: float
    mid_p_value: float

    @property
    def label(self) -> str:
        return layer_label(self.layer)


@dataclass(repr=False)
class OverlapResult(Result):
    """Overlap of subnetworks A and B, with its expectation and p-value under the null;
    ``layers`` repeats the test layer by layer, ``blocks`` gives the per-block counts."""

    label_a: str
    label_b: str
    n_weights: int
    size_a: int
    size_b: int
    overlap: int
    overlap_fraction: float
    expected: float
    expected_fraction: float
    ratio: float
    p_value: float
    mid_p_value: float
    p_method: str
    z_score: float
    p_normal: float
    share_a_in_b: float | None
    share_b_in_a: float | None
    jaccard: float | None
    mc_p_value: float | None = None
    n_permutations: int = 0
    layers: list[LayerOverlap] = bulky(list)
    blocks: list[dict] = bulky(list)

    def layer_rows(self) -> list[dict]:
        """One row per layer (for report tables)."""
        return [{"layer": "-" if r.layer is None else r.layer, "shared": r.overlap,
                 "expected": r.expected, "ratio": r.ratio, "p": format_p(r.p_value)}
                for r in self.layers]


# ---------------------------------------------------------------------- the null


def block_counts(a, b, eligible: Masks | None = None,
                 targets: Sequence[Target] | Positions | None = None) -> list[dict]:
    """Per block: ``name, layer, block, n, size_a, size_b, overlap, expected``
    (n = eligible weights). ``a`` and ``b`` are MaskSets or plain masks on any devices;
    counting happens on the device of A's first mask."""
    a, eligible, positions = split_masks(a, eligible, targets)
    b, _, _ = split_masks(b, None, positions)
    _check_same_layout(a, b)
    device = next(iter(a.values())).device
    rows = []
    for name in a:
        ma, n = aligned(name, a[name], device, eligible)
        mb, _ = aligned(name, b[name], device, eligible)
        ka, kb, both = int(ma.sum()), int(mb.sum()), int((ma & mb).sum())
        layer, block = positions[name]
        rows.append(dict(name=name, layer=layer, block=block, n=n, size_a=ka, size_b=kb,
                         overlap=both, expected=ka * kb / n if n else 0.0))
    return rows


def _check_same_layout(a: Masks, b: Masks) -> None:
    if set(a) != set(b):
        only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
        raise MaskError(
            f"The two subnetworks mask different weights: only in A {only_a[:3]}, only in B "
            f"{only_b[:3]}. Compare masks of the same model and targets."
        )
    for name in a:
        if tuple(a[name].shape) != tuple(b[name].shape):
            raise MaskError(f"Mask {name!r} has shape {tuple(a[name].shape)} in A but "
                            f"{tuple(b[name].shape)} in B. Compare masks of the same model.")


def _block_pmf(n: int, ka: int, kb: int) -> tuple[int, np.ndarray]:
    """(offset, pmf) of hypergeometric(n, ka, kb), cut to its non-negligible window."""
    lo, hi = max(0, ka + kb - n), min(ka, kb)
    mean = ka * kb / n
    sd = np.sqrt(ka * kb * (n - ka) * (n - kb) / (n * n * max(n - 1, 1)))
    w_lo, w_hi = max(lo, int(mean - 40 * sd - 50)), min(hi, int(mean + 40 * sd + 50) + 1)
    x = np.arange(w_lo, w_hi + 1)
    logpmf = _log_comb(ka, x) + _log_comb(n - ka, kb - x) - _log_comb(n, kb)
    pmf = np.exp(logpmf - logpmf.max())  # scipy's hypergeom.pmf is ~100x slower
    return _trim(w_lo, pmf / pmf.sum(), _PMF_REL_FLOOR)


def _log_comb(a, b):
    return special.gammaln(a + 1) - special.gammaln(b + 1) - special.gammaln(a - b + 1)


def _trim(offset: int, pmf: np.ndarray, rel_floor: float) -> tuple[int, np.ndarray]:
    pmf = np.where(pmf >= rel_floor * pmf.max(), pmf, 0.0)
    nz = np.flatnonzero(pmf)
    return offset + int(nz[0]), pmf[nz[0]: nz[-1] + 1]


def null_distribution(blocks: Sequence[tuple[int, int, int]]) -> tuple[int, np.ndarray]:
    """Exact distribution of the total overlap, a sum of hypergeometric(n, k_a, k_b) over
    blocks: ``(offset, pmf)`` with ``pmf[i] = P(total = offset + i)``."""
    offset, pmf = 0, np.ones(1)
    for n, ka, kb in blocks:
        if n == 0 or ka == 0 or kb == 0:
            continue
        o, p = _block_pmf(n, ka, kb)
        if pmf.size * p.size <= _DIRECT_MAX_WORK:
            offset, pmf = _trim(offset + o, np.convolve(pmf, p), _PMF_REL_FLOOR)
        else:
            conv = np.clip(signal.fftconvolve(pmf, p), 0.0, None)
            offset, pmf = _trim(offset + o, conv, _FFT_REL_FLOOR)
        if pmf.size > _MAX_SUPPORT:
            raise InterpError("Null distribution too wide for an exact convolution.")
    return offset, pmf / pmf.sum()


def overlap_pvalues(blocks: Sequence[tuple[int, int, int]], observed: int) -> dict:
    """``P(total >= observed)`` (exact), the mid-p value and a normal approximation.

    Exact values below ~1e-14 are reliable only in order of magnitude when the blocks are
    large (FFT convolution); 0.0 means smaller than the distribution resolves.
    """
    mean = sum(ka * kb / n for n, ka, kb in blocks if n)
    var = sum(ka * kb * (n - ka) * (n - kb) / (n * n * (n - 1)) for n, ka, kb in blocks if n > 1)
    sd = float(np.sqrt(var))
    z = (observed - mean) / sd if sd > 0 else (0.0 if observed <= mean else float("inf"))
    z_cc = (observed - 0.5 - mean) / sd if sd > 0 else z
    out = dict(z_score=float(z), p_normal=float(stats.norm.sf(z_cc)))
    try:
        offset, pmf = null_distribution(blocks)
        i = observed - offset
        tail = np.concatenate([np.cumsum(pmf[::-1])[::-1], [0.0]])  # tail[j] = P(X >= offset+j)
        p_ge, p_gt = (1.0 if j <= 0 else float(tail[min(j, pmf.size)]) for j in (i, i + 1))
        out.update(p_value=min(p_ge, 1.0), mid_p_value=min(p_gt + 0.5 * (p_ge - p_gt), 1.0),
                   p_method="exact")
    except (InterpError, MemoryError):
        log.warning("exact overlap null too large; using the normal approximation")
        mid = float(stats.norm.sf(z))
        out.update(p_value=out["p_normal"], mid_p_value=mid, p_method="normal")
    return out


def monte_carlo_pvalue(
    blocks: Sequence[tuple[int, int, int]], observed: int, *, n_permutations: int, seed: int = 0
) -> float:
    """``(1 + #{null overlap >= observed}) / (1 + n_permutations)``, sampling each block's
    overlap of two random masks with the block's counts (equivalent to shuffling elements)."""
    rng = np.random.default_rng(seed)
    live = [(n, ka, kb) for n, ka, kb in blocks if n and ka and kb]
    if not live:
        return 1.0
    n, ka, kb = (np.array(c, dtype=np.int64) for c in zip(*live))
    sims = rng.hypergeometric(ka, n - ka, kb, size=(n_permutations, len(live))).sum(1)
    return float((1 + (sims >= observed).sum()) / (1 + n_permutations))


# ---------------------------------------------------------------------- the analysis


def layer_overlaps(rows: Sequence[dict]) -> list[LayerOverlap]:
    """The overlap test within each layer, from :func:`block_counts` rows."""
    out = []
    for layer in dict.fromkeys(r["layer"] for r in rows):
        mine = [r for r in rows if r["layer"] == layer]
        both = sum(r["overlap"] for r in mine)
        expected = sum(r["expected"] for r in mine)
        p = overlap_pvalues([(r["n"], r["size_a"], r["size_b"]) for r in mine], both)
        out.append(LayerOverlap(
            layer=layer, n_weights=sum(r["n"] for r in mine),
            size_a=sum(r["size_a"] for r in mine), size_b=sum(r["size_b"] for r in mine),
            overlap=both, expected=expected,
            ratio=both / expected if expected > 0 else float("nan"),
            p_value=p["p_value"], mid_p_value=p["mid_p_value"]))
    return out


def overlap_analysis(
    a,
    b,
    *,
    label_a: str = "A",
    label_b: str = "B",
    eligible: Masks | None = None,
    targets: Sequence[Target] | Positions | None = None,
    n_permutations: int = 0,
    seed: int = 0,
) -> OverlapResult:
    """How much subnetworks A and B overlap, overall and per layer, and how surprising that
    is under the null.

    Args:
        a, b: MaskSets or target name -> boolean mask (True = keep), same names and shapes,
            on any devices.
        eligible: optional weights that can be kept at all (e.g. non-zero ones); the null
            places weights only there and ``n_weights`` counts only them. Default: A's
            eligible masks when A is a MaskSet.
        targets: where each mask sits (Targets or name -> (layer, block)); default: A's
            targets, or parsed from the names.
        n_permutations: if > 0, also a Monte Carlo p-value from that many null draws.
    """
    rows = block_counts(a, b, eligible, targets)
    triples = [(r["n"], r["size_a"], r["size_b"]) for r in rows]
    n = sum(r["n"] for r in rows)
    ka, kb = sum(r["size_a"] for r in rows), sum(r["size_b"] for r in rows)
    both = sum(r["overlap"] for r in rows)
    expected = sum(r["expected"] for r in rows)
    if n == 0:
        raise MaskError("The masks cover no weights.")
    p = overlap_pvalues(triples, both)
    union = ka + kb - both
    result = OverlapResult(
        label_a=label_a, label_b=label_b, n_weights=n, size_a=ka, size_b=kb, overlap=both,
        overlap_fraction=both / n, expected=expected, expected_fraction=expected / n,
        ratio=both / expected if expected > 0 else float("nan"),
        **p,
        share_a_in_b=both / ka if ka else None, share_b_in_a=both / kb if kb else None,
        jaccard=both / union if union else None,
        mc_p_value=(monte_carlo_pvalue(triples, both, n_permutations=n_permutations, seed=seed)
                    if n_permutations > 0 else None),
        n_permutations=n_permutations, layers=layer_overlaps(rows), blocks=rows,
    )
    log.info("overlap %s/%s: %d weights (%.2fx expected %.1f), p=%.3g", label_a, label_b, both,
             result.ratio, expected, result.p_value)
    return result


# ---------------------------------------------------------------------- figures


def _pair(r: OverlapResult) -> str:
    return f"{r.label_a} ∩ {r.label_b}"


def _p_text(p: float) -> str:
    return format_p(p).replace("p = ", "p=").replace("p < ", "p<")


def plot_overlap(results: OverlapResult | Sequence[OverlapResult]) -> go.Figure:
    """Observed vs expected overlap (fraction of masked weights) for one or more pairs,
    annotated with the ratio and p-value."""
    results = [results] if isinstance(results, OverlapResult) else list(results)
    if not results:
        raise InterpError("Nothing to plot: pass at least one OverlapResult.")
    x = [_pair(r) for r in results]
    fig = figure(title="Subnetwork overlap vs random subnetworks with the same layout",
                 barmode="group", height=440, width=max(520, 220 * len(results) + 240))
    fig.add_trace(go.Bar(
        x=x, y=[r.overlap_fraction for r in results], name="observed",
        marker_color=[color_for(r.label_b, i) for i, r in enumerate(results)],
        text=[f"{r.ratio:.1f}x, {_p_text(r.p_value)}" for r in results],
        textposition="outside", cliponaxis=False,
        customdata=[r.overlap for r in results],
        hovertemplate="%{x}: %{customdata:,} weights (%{y:.3%})<extra>observed</extra>",
    ))
    fig.add_trace(go.Bar(
        x=x, y=[r.expected_fraction for r in results], name="expected (null)", **_NULL_STYLE,
        hovertemplate="%{x}: %{y:.3%}<extra>expected</extra>",
    ))
    fig.update_yaxes(title_text="overlap / masked weights", tickformat=".2~%", rangemode="tozero")
    fig.update_xaxes(title_text="pair of subnetworks")
    return fig


def plot_overlap_layers(results: OverlapResult | Sequence[OverlapResult]) -> go.Figure:
    """Layer by layer: observed shared weights over expected under the null (ratio, log
    scale), one line per pair, hover with counts and p-values; 1 = chance."""
    results = [results] if isinstance(results, OverlapResult) else list(results)
    if not results:
        raise InterpError("Nothing to plot: pass at least one OverlapResult.")
    fig = figure(title="Overlap per layer vs random subnetworks with the same layout",
                 height=440, width=760)
    for i, r in enumerate(results):
        xs = [lo.label for lo in r.layers]
        fig.add_trace(go.Scatter(
            x=xs, y=[lo.ratio if lo.ratio == lo.ratio and lo.ratio > 0 else None
                     for lo in r.layers],
            mode="lines+markers+text", name=_pair(r),
            line={"color": color_for(r.label_b, i)},
            text=[_p_text(lo.p_value) for lo in r.layers], textposition="top center",
            customdata=[[lo.overlap, lo.expected] for lo in r.layers],
            hovertemplate="%{x}: %{customdata[0]:,} shared, %{customdata[1]:,.1f} expected "
                          "(%{y:.2f}x)<extra>%{fullData.name}</extra>",
        ))
    fig.add_hline(y=1.0, line_dash="dot", annotation_text="chance")
    fig.update_yaxes(title_text="shared / expected (x chance)", type="log")
    fig.update_xaxes(title_text="layer", type="category")
    return fig


def plot_overlap_blocks(result: OverlapResult) -> go.Figure:
    """Observed vs expected overlap per block (which matrices the shared weights sit in)."""
    names = [f"{layer_label(r['layer'])} {kind_label(r['block'])}" for r in result.blocks]
    fig = figure(title=f"Overlap per block: {_pair(result)}", barmode="group", height=480,
                 width=max(600, 36 * len(names) + 200), margin={"b": 130})
    fig.add_trace(go.Bar(x=names, y=[r["overlap"] for r in result.blocks], name="observed",
                         marker_color=color_for(result.label_b, 0),
                         hovertemplate="%{x}: %{y:,} shared weights<extra>observed</extra>"))
    fig.add_trace(go.Bar(x=names, y=[r["expected"] for r in result.blocks],
                         name="expected (null)", **_NULL_STYLE,
                         hovertemplate="%{x}: %{y:,.1f} expected by chance<extra>null</extra>"))
    fig.update_yaxes(title_text="shared weights", rangemode="tozero")
    fig.update_xaxes(tickangle=-45, title_text="block")
    return fig


#: Expected (null) bars: outlined, so they differ from every subnetwork colour (grey = random).
_NULL_STYLE = {"marker": {"color": "white", "line": {"color": "#4B5563", "width": 1.5}}}
