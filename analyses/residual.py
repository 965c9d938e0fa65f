"""Residual stream: does each layer represent the current token or predict the next one?

Three views per layer (layer 0 = embedding output, then each block's output, the last one
before the final layer norm), all from one streaming pass over token batches:

1. Ridge maps (alpha = 1, with intercept) from the layer's activations to the raw input-token
   embeddings ``W_E[token]`` and to the last layer's activations. A map's rotation is the
   median ``|arg(eigenvalue)|`` in degrees: ~0 when the layer still looks like its target, large
   when the map must turn it. Bigram subnetworks show a sharp jump at the first layer.
2. Mean cosine similarity of the residual to the current token's embedding and to the next
   token's unembedding ``W_U[:, next]``, beside a baseline with the tokens shuffled (which
   measures how much of the cosine any token direction would get).
3. Cross-layer covariance similarity: the Frobenius cosine between layers' covariance matrices
   after removing each covariance's top singular direction.

To study a subnetwork, attach its mask before calling :func:`residual_analysis`
(``with maskset.applied(model, mode="keep"): ...``) and pass a label; the plotting functions
overlay any number of labelled results (full model, bigram, random, optimal).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import plotly.graph_objects as go
import torch
import torch.nn.functional as F
from einops import rearrange
from jaxtyping import Float, Int
from torch import Tensor

from interp.errors import InterpError
from interp.plots import color_for, subplots
from interp.probes import StreamingStats, iter_activations, residual_hook_names, ridge_from_stats
from interp.results import Result, bulky

log = logging.getLogger(__name__)

TOKEN_EMBEDDING = "token_embedding"


@dataclass(repr=False)
class ResidualResult(Result):
    """Per-layer residual-stream measurements of one model or subnetwork (index 0 = embeddings)."""

    label: str
    layers: list[str]
    n_tokens: int
    alpha: float
    rotation_to_input: list[float]
    rotation_to_output: list[float]
    r2_to_input: list[float]
    r2_to_output: list[float]
    cos_embed_current: list[float]
    cos_unembed_next: list[float]
    cos_embed_shuffled: list[float]
    cos_unembed_shuffled: list[float]
    cov_similarity: list[list[float]] = bulky(list)
    eigen_rel_tol: float = 0.0

    @property
    def n_layers(self) -> int:
        return len(self.layers)


# ---------------------------------------------------------------------- pure maths


def rotation_angles(
    weight: Float[Tensor, "d d"], *, rel_tol: float = 0.0
) -> Float[np.ndarray, " k"]:
    """``|arg(eigenvalue)|`` in degrees of a square map: every eigenvalue, as the paper.

    ``rel_tol > 0`` skips eigenvalues whose magnitude is below ``rel_tol`` x the largest:
    their angle is numerical noise (a map that drops a direction does not rotate it), so a
    map of low rank otherwise gets a median driven by noise. Off by default to match the
    paper's statistic; ``residual_analysis(..., eigen_rel_tol=1e-8)`` turns it on."""
    w = weight.detach().to("cpu", torch.float64).numpy()
    if w.ndim != 2 or w.shape[0] != w.shape[1]:
        raise InterpError(f"Rotation needs a square map; got shape {tuple(w.shape)}.")
    eig = np.linalg.eigvals(w)
    mag = np.abs(eig)
    keep = mag > rel_tol * max(mag.max(), np.finfo(float).tiny)
    return np.degrees(np.abs(np.angle(eig[keep])))


def median_rotation(weight: Float[Tensor, "d d"], *, rel_tol: float = 0.0) -> float:
    """Median ``|arg(eigenvalue)|`` in degrees (the paper's per-layer summary)."""
    return float(np.median(rotation_angles(weight, rel_tol=rel_tol)))


def covariance_similarity(
    covs: Sequence[Float[Tensor, "d d"]], *, remove_top: int = 1
) -> Float[np.ndarray, "n n"]:
    """Frobenius cosine between every pair of covariance matrices, each with its top
    ``remove_top`` singular directions projected out (they are shared outlier directions that
    would otherwise make every pair look alike)."""
    flat = []
    for cov in covs:
        c = cov.detach().to("cpu", torch.float64)
        c = (c + c.T) / 2
        _, vecs = torch.linalg.eigh(c)  # ascending; PSD, so eigen = singular directions
        if remove_top:
            top = vecs[:, -remove_top:]
            proj = torch.eye(c.shape[0], dtype=c.dtype) - top @ top.T
            c = proj @ c @ proj
        flat.append(c.flatten())
    m = F.normalize(torch.stack(flat), dim=1)
    return (m @ m.T).numpy()


# ---------------------------------------------------------------------- the analysis


class _CosineSums:
    """Running sums of per-token cosines for each layer."""

    def __init__(self, n_layers: int):
        self.sums = {k: np.zeros(n_layers) for k in ("cur", "next", "cur_shuf", "next_shuf")}
        self.counts = {k: 0 for k in self.sums}

    def add(self, key: str, layer: int, cos: Float[Tensor, " n"]) -> None:
        self.sums[key][layer] += float(cos.double().sum())
        if layer == 0:
            self.counts[key] += cos.numel()

    def means(self, key: str) -> list[float]:
        n = self.counts[key]
        return [float(v / n) if n else float("nan") for v in self.sums[key]]


def _rows(x: Float[Tensor, "batch pos d"]) -> Float[Tensor, "rows d"]:
    return rearrange(x.float(), "batch pos d -> (batch pos) d")


def _shuffled(tokens: Int[Tensor, "batch pos"], gen: torch.Generator) -> Int[Tensor, "batch pos"]:
    perm = torch.randperm(tokens.numel(), generator=gen).to(tokens.device)
    return tokens.flatten()[perm].view_as(tokens)


def residual_analysis(
    model,
    batches: Iterable[Int[Tensor, "_batch _pos"]],
    *,
    label: str = "full",
    alpha: float = 1.0,
    hook_names: Sequence[str] | None = None,
    skip_positions: int = 0,
    device: str | torch.device | None = None,
    progress: bool = True,
    seed: int = 0,
    eigen_rel_tol: float = 0.0,
) -> ResidualResult:
    """Rotation, cosine and covariance views of the residual stream over token batches.

    Runs the model as it is (attach a mask first to study a subnetwork). One pass; memory is
    O(layers * d_model^2) whatever the number of tokens.

    Args:
        label: names the result in figures ("full", "bigram", "random", ...).
        alpha: ridge penalty (the paper's 1.0); the intercept is not penalised.
        hook_names: the layers; default :func:`interp.probes.residual_hook_names`.
        skip_positions: leading positions of each sequence left out of every statistic
            (e.g. 1 to drop a BOS position with outlier norms); 0 keeps all, as the paper.
        device: where the model runs and the statistics accumulate (float64).
        seed: for the shuffled-token baselines.
        eigen_rel_tol: drop eigenvalues below this fraction of the largest before the median
            rotation (0: all of them, the paper's statistic; see :func:`rotation_angles`).

    The ridge penalty is absolute, not relative to activation scale: with few tokens or tiny
    activations (n * variance not >> alpha) the maps shrink toward zero; ``r2_to_*`` shows it.
    """
    names = list(hook_names) if hook_names is not None else residual_hook_names(model)
    if len(names) < 2:
        raise InterpError("Residual analysis needs at least two layers (e.g. embeddings + one).")
    last = names[-1]
    pairs = [(h, h) for h in names] + [(h, TOKEN_EMBEDDING) for h in names]
    pairs += [(h, last) for h in names]
    stats = StreamingStats(pairs)
    cos = _CosineSums(len(names))
    if device is not None:
        model.to(device)
    w_e = model.W_E.detach()
    w_u_rows = model.W_U.detach().T  # [d_vocab, d_model]: row t is token t's unembedding
    gen = torch.Generator().manual_seed(seed)
    for tokens, acts in iter_activations(model, batches, names, device=device,
                                         progress=progress, desc=f"residual ({label})"):
        if tokens.shape[1] - skip_positions < 2:
            raise InterpError(
                f"Sequences of length {tokens.shape[1]} leave no next tokens after skipping "
                f"{skip_positions} positions; use longer sequences."
            )
        cur = tokens[:, skip_positions:]
        acts = {h: a[:, skip_positions:] for h, a in acts.items()}
        emb = w_e[cur]
        stats.update({**acts, TOKEN_EMBEDDING: emb})
        targets = {
            "cur": _rows(emb),
            "cur_shuf": _rows(w_e[_shuffled(cur, gen)]),
            "next": _rows(w_u_rows[cur[:, 1:]]),
            "next_shuf": _rows(w_u_rows[_shuffled(cur[:, 1:], gen)]),
        }
        for i, h in enumerate(names):
            x_all, x_next = _rows(acts[h]), _rows(acts[h][:, :-1])
            for key, target in targets.items():
                x = x_all if key.startswith("cur") else x_next
                cos.add(key, i, F.cosine_similarity(x, target.to(x), dim=-1))
    return _result_from(stats, cos, names, label=label, alpha=alpha, rel_tol=eigen_rel_tol)


def _result_from(
    stats: StreamingStats, cos: _CosineSums, names: list[str], *, label: str, alpha: float,
    rel_tol: float,
) -> ResidualResult:
    fits_in = [ridge_from_stats(stats, h, TOKEN_EMBEDDING, alpha=alpha) for h in names]
    fits_out = [ridge_from_stats(stats, h, names[-1], alpha=alpha) for h in names]
    sim = covariance_similarity([stats.cov(h) for h in names])
    result = ResidualResult(
        label=label,
        layers=names,
        n_tokens=stats.n,
        alpha=float(alpha),
        rotation_to_input=[median_rotation(f.weight, rel_tol=rel_tol) for f in fits_in],
        rotation_to_output=[median_rotation(f.weight, rel_tol=rel_tol) for f in fits_out],
        r2_to_input=[f.r2 for f in fits_in],
        r2_to_output=[f.r2 for f in fits_out],
        cos_embed_current=cos.means("cur"),
        cos_unembed_next=cos.means("next"),
        cos_embed_shuffled=cos.means("cur_shuf"),
        cos_unembed_shuffled=cos.means("next_shuf"),
        cov_similarity=[[float(v) for v in row] for row in sim],
        eigen_rel_tol=float(rel_tol),
    )
    log.info("residual analysis %r over %d tokens: rotation to input %s, to output %s", label,
             stats.n, _fmt(result.rotation_to_input), _fmt(result.rotation_to_output))
    return result


def _fmt(values: Sequence[float]) -> str:
    return "[" + ", ".join(f"{v:.1f}" for v in values) + "]"


# ---------------------------------------------------------------------- figures


def _as_list(results: ResidualResult | Sequence[ResidualResult]) -> list[ResidualResult]:
    out = [results] if isinstance(results, ResidualResult) else list(results)
    if not out:
        raise InterpError("Nothing to plot: pass at least one ResidualResult.")
    return out


def _layer_names(n: int) -> list[str]:
    """Hover names of the residual positions: the embedding output, then each block's."""
    return ["embeddings", *(f"layer {i} (after block {i - 1})" for i in range(1, n))]


def _layer_ticks(n: int) -> dict:
    return dict(tickmode="array", tickvals=list(range(n)), ticktext=["emb", *map(str, range(1, n))])


def _overlay(
    results: Sequence[ResidualResult], panels: Sequence[tuple[str, str, str | None]],
    *, title: str, y_title: str,
) -> go.Figure:
    """One subplot per (title, field, baseline field); one coloured line per result."""
    fig = subplots(1, len(panels), titles=[p[0] for p in panels], horizontal_spacing=0.1)
    for i, r in enumerate(results):
        color = color_for(r.label, i)
        x = list(range(r.n_layers))
        names = _layer_names(r.n_layers)
        for col, (_, field, baseline) in enumerate(panels, start=1):
            fig.add_trace(go.Scatter(
                x=x, y=getattr(r, field), mode="lines+markers", name=r.label, legendgroup=r.label,
                showlegend=col == 1, line=dict(color=color, width=2.5), customdata=names,
                hovertemplate=f"%{{customdata}}: %{{y:.3f}} ({y_title})<extra>{r.label}</extra>",
            ), row=1, col=col)
            if baseline:
                fig.add_trace(go.Scatter(
                    x=x, y=getattr(r, baseline), mode="lines", name=f"{r.label} (shuffled)",
                    legendgroup=f"{r.label} (shuffled)", showlegend=col == 1,
                    line=dict(color=color, width=1.5, dash="dot"), customdata=names,
                    hovertemplate=f"%{{customdata}}: %{{y:.3f}} ({y_title})"
                                  f"<extra>{r.label} (shuffled tokens)</extra>",
                ), row=1, col=col)
    n = max(r.n_layers for r in results)
    fig.update_xaxes(title_text="layer (emb = embedding output)", **_layer_ticks(n))
    fig.update_yaxes(title_text=y_title, row=1, col=1)
    fig.update_layout(title=title, height=420, width=460 * len(panels) + 120)
    return fig


def plot_rotations(results: ResidualResult | Sequence[ResidualResult]) -> go.Figure:
    """Median rotation of the ridge maps to the input embeddings and to the last layer."""
    return _overlay(
        _as_list(results),
        [("to input-token embeddings", "rotation_to_input", None),
         ("to last-layer activations", "rotation_to_output", None)],
        title="Residual stream: rotation of ridge maps", y_title="median |arg λ| (degrees)",
    )


def plot_cosines(results: ResidualResult | Sequence[ResidualResult]) -> go.Figure:
    """Mean cosine to the current token's embedding and the next token's unembedding
    (dotted: the same with shuffled tokens)."""
    return _overlay(
        _as_list(results),
        [("current token embedding", "cos_embed_current", "cos_embed_shuffled"),
         ("next token unembedding", "cos_unembed_next", "cos_unembed_shuffled")],
        title="Residual stream: current vs next token", y_title="mean cosine similarity",
    )


def plot_cov_similarity(results: ResidualResult | Sequence[ResidualResult]) -> go.Figure:
    """Heatmaps of cross-layer covariance similarity (top direction removed), one per result."""
    results = _as_list(results)
    fig = subplots(1, len(results), titles=[r.label for r in results], horizontal_spacing=0.08)
    for col, r in enumerate(results, start=1):
        idx = list(range(r.n_layers))
        z = np.array(r.cov_similarity, dtype=float)
        names = _layer_names(r.n_layers)
        fig.add_trace(go.Heatmap(
            z=z, x=idx, y=idx, coloraxis="coloraxis", text=np.round(z, 2),
            texttemplate="%{text}" if r.n_layers <= 16 else None,
            customdata=[[f"{a} vs {b}" for b in names] for a in names],
            hovertemplate="%{customdata}: %{z:.3f}<extra>" + r.label + "</extra>",
        ), row=1, col=col)
        fig.update_xaxes(**_layer_ticks(r.n_layers), row=1, col=col)
        fig.update_yaxes(autorange="reversed", **_layer_ticks(r.n_layers), row=1, col=col)
    fig.update_xaxes(title_text="layer (emb = embedding output)", showgrid=False)
    fig.update_yaxes(title_text="layer", showgrid=False, row=1, col=1)
    fig.update_yaxes(showgrid=False)
    fig.update_layout(
        title="Covariance similarity across layers (top singular direction removed)",
        coloraxis=dict(colorscale="Viridis", cmin=0, cmax=1, colorbar=dict(title="cosine")),
        height=440, width=400 * len(results) + 160,
    )
    return fig
