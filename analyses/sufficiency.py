"""Sufficiency: does a (sub)network predict like the bigram model on held-out text?

The paper's measure is the Pearson correlation between per-token surprisals of the network and
of the bigram model. Two variants, both reported:

- ``surprisal_r`` (headline, the paper's drop-infinite variant): only tokens whose bigram
  occurred in the counts, so the raw bigram surprisal is finite;
- ``surprisal_r_smoothed``: every token, with the bigram model smoothed 0.99 / 0.01 toward the
  unigram (tokens never seen at all are still infinite and dropped; ``n_smoothed`` says how
  many were kept).

Also the mean cross-entropy of the network's next-token distribution to the bigram
distribution (the bigram objective, over every position) and the KL divergence, which is that
minus the bigram entropy at the same positions. Everything streams over batches: Pearson
statistics are merged batch by batch, nothing is cached.

The network is whatever ``model`` computes: the full model, or a subnetwork when called inside
``maskset.applied(model, mode="keep")`` (or pass ``maskset=``).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass

import plotly.graph_objects as go
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from interp.data.bigram import BigramCounts
from interp.errors import InterpError
from interp.models.lm import resolve_device
from interp.results import Result, bulky

__all__ = ["SufficiencyResult", "model_surprisal", "pearson", "plot_sufficiency",
           "plot_sufficiency_r", "sufficiency"]

log = logging.getLogger(__name__)


@dataclass(repr=False)
class SufficiencyResult(Result):
    """Surprisal correlations and cross-entropy of one network against the bigram model.

    Attributes:
        surprisal_r: Pearson r over tokens with a finite bigram surprisal (headline; the
            paper's drop-infinite variant).
        surprisal_r_capped: Pearson r over all tokens, infinite surprisals capped at the
            largest finite one (the paper's other variant); ``cap`` is that value.
        surprisal_r_smoothed: Pearson r over all tokens, bigram smoothed toward the unigram
            (this project's variant).
        ce_to_bigram: mean cross-entropy (nats) to the bigram distribution, all positions.
        kl_to_bigram: ``ce_to_bigram`` minus the mean bigram entropy at those positions.
        n_tokens: scored next-token predictions; ``n_finite`` of them had a finite bigram
            surprisal (the headline's tokens), ``n_seen`` a bigram seen in the counts,
            ``n_smoothed`` a finite smoothed surprisal.
        mean_surprisal: the network's mean surprisal over all tokens (its LM loss).
        sample_model, sample_bigram: the first ``n_sample`` finite surprisal pairs (for a
            scatter plot; empty unless asked for).
    """

    surprisal_r: float
    surprisal_r_capped: float
    surprisal_r_smoothed: float
    ce_to_bigram: float
    kl_to_bigram: float
    n_tokens: int
    n_finite: int
    n_seen: int
    n_smoothed: int
    mean_surprisal: float
    cap: float = math.nan
    smoothing: float = 0.01
    headline: str = "drop_infinite"
    sample_model: list[float] = bulky(list)
    sample_bigram: list[float] = bulky(list)

    @property
    def finite_fraction(self) -> float:
        """Share of tokens the headline r scores."""
        return self.n_finite / self.n_tokens if self.n_tokens else math.nan


# --------------------------------------------------------------------------- streaming Pearson


class _Pearson:
    """Streaming Pearson r: per-batch means and co-moments merged exactly (Chan et al.)."""

    def __init__(self):
        self.n, self.mx, self.my, self.sxx, self.syy, self.sxy = 0, 0.0, 0.0, 0.0, 0.0, 0.0

    def update(self, x: Float[Tensor, " k"], y: Float[Tensor, " k"]) -> None:
        k = x.numel()
        if k == 0:
            return
        x, y = x.double(), y.double()
        bx, by = float(x.mean()), float(y.mean())
        dx, dy = x - bx, y - by
        bxx, byy, bxy = float(dx @ dx), float(dy @ dy), float(dx @ dy)
        n = self.n + k
        ddx, ddy = bx - self.mx, by - self.my
        w = self.n * k / n
        self.sxx += bxx + ddx * ddx * w
        self.syy += byy + ddy * ddy * w
        self.sxy += bxy + ddx * ddy * w
        self.mx += ddx * k / n
        self.my += ddy * k / n
        self.n = n

    @property
    def r(self) -> float:
        if self.n < 2 or self.sxx <= 0 or self.syy <= 0:
            return math.nan
        return self.sxy / math.sqrt(self.sxx * self.syy)


def pearson(x: Float[Tensor, " n"], y: Float[Tensor, " n"]) -> float:
    """Pearson r of two 1-D tensors (float64), NaN when either is constant."""
    acc = _Pearson()
    acc.update(x.reshape(-1), y.reshape(-1))
    return acc.r


# --------------------------------------------------------------------------- evaluation


def model_surprisal(
    logits: Float[Tensor, "batch pos V"], tokens: Int[Tensor, "batch pos"]
) -> Float[Tensor, "batch pos_minus_1"]:
    """The network's surprisal ``-log p(tokens[i+1] | tokens[:i+1])`` in nats (float64)."""
    logp = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    return -logp.gather(-1, tokens[:, 1:, None]).squeeze(-1)


@torch.no_grad()
def sufficiency(
    model,
    counts: BigramCounts,
    batches: Iterable[Int[Tensor, "_batch _pos"]],
    *,
    maskset=None,
    smoothing: float = 0.01,
    n_sample: int = 0,
    max_batches: int | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> SufficiencyResult:
    """Correlate the network's per-token surprisal with the bigram model's on held-out batches.

    Args:
        model: ``model(tokens) -> logits [batch, pos, V]`` (a bridge, or any such module).
        counts: bigram counts from the *training* text, with the model's tokenizer.
        batches: ``[batch, pos]`` token tensors of held-out text.
        maskset: if given, evaluated as ``maskset.applied(model, mode="keep")`` (the
            subnetwork alone); otherwise the model as it is.
        smoothing: unigram weight of this project's smoothed variant.
        n_sample: keep this many (model, bigram) finite surprisal pairs for plots.
        max_batches: stop after this many batches.
    """
    if maskset is not None:
        with maskset.applied(model, mode="keep"):
            return sufficiency(model, counts, batches, smoothing=smoothing, n_sample=n_sample,
                               max_batches=max_batches, device=device, progress=progress)
    if counts.interpolate != 0.0:
        raise InterpError(
            "sufficiency needs raw bigram counts (interpolate=0) for the headline drop-infinite "
            "variant; pass the counts as counted and set smoothing= for the smoothed one."
        )
    dev = resolve_device(model, device)
    raw, smooth = counts.to(dev), counts.smoothed(smoothing).to(dev)
    h_context = raw.entropy(per_context=True).to(dev)
    finite_r, smooth_r = _Pearson(), _Pearson()
    # model surprisals of infinite-bigram tokens: paired with the cap once it is known
    infinite_model: list[Tensor] = []
    cap = -math.inf
    ce_sum = h_sum = loss_sum = 0.0
    n_pos = n_tok = n_smoothed = n_seen = 0
    sample_m: list[float] = []
    sample_b: list[float] = []
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        for i, tokens in enumerate(tqdm(batches, desc="sufficiency", disable=not progress,
                                        leave=False)):
            if max_batches is not None and i >= max_batches:
                break
            tokens = tokens.to(dev).long()
            if tokens.ndim != 2 or tokens.shape[1] < 2:
                raise InterpError(
                    f"Batches must be [batch, pos] token tensors with pos >= 2, got shape "
                    f"{tuple(tokens.shape)}."
                )
            logits = model(tokens)
            s_model = model_surprisal(logits, tokens)
            s_raw, s_smooth = raw.surprisal(tokens), smooth.surprisal(tokens)
            ok = torch.isfinite(s_raw)
            finite_r.update(s_model[ok], s_raw[ok])
            infinite_model.append(s_model[~ok].cpu())
            if bool(ok.any()):
                cap = max(cap, float(s_raw[ok].max()))
            n_seen += int(raw.seen(tokens).sum())
            finite = torch.isfinite(s_smooth)
            smooth_r.update(s_model[finite], s_smooth[finite])
            ce_sum += float(raw.soft_cross_entropy(logits, tokens).double().sum())
            h_sum += float(h_context[tokens].sum())
            loss_sum += float(s_model.sum())
            n_pos += tokens.numel()
            n_tok += s_model.numel()
            n_smoothed += int(finite.sum())
            if len(sample_m) < n_sample:
                take = n_sample - len(sample_m)
                sample_m += s_model[ok][:take].tolist()
                sample_b += s_raw[ok][:take].tolist()
    finally:
        if hasattr(model, "train"):
            model.train(was_training)
    if n_tok == 0:
        raise InterpError("sufficiency got no batches; pass held-out [batch, pos] token tensors.")
    ce = ce_sum / n_pos
    capped_r = copy.deepcopy(finite_r)
    inf_model = torch.cat(infinite_model) if infinite_model else torch.zeros(0)
    if inf_model.numel() and math.isfinite(cap):
        capped_r.update(inf_model, torch.full_like(inf_model, cap, dtype=torch.float64))
    result = SufficiencyResult(
        surprisal_r=finite_r.r, surprisal_r_capped=capped_r.r if math.isfinite(cap) else math.nan,
        surprisal_r_smoothed=smooth_r.r, ce_to_bigram=ce, kl_to_bigram=ce - h_sum / n_pos,
        n_tokens=n_tok, n_finite=finite_r.n, n_seen=n_seen, n_smoothed=n_smoothed,
        mean_surprisal=loss_sum / n_tok, cap=cap if math.isfinite(cap) else math.nan,
        smoothing=smoothing, sample_model=sample_m, sample_bigram=sample_b,
    )
    log.info("sufficiency: r=%.4f (drop-infinite, %d of %d tokens), r_capped=%.4f, "
             "r_smoothed=%.4f, CE to bigram %.4f", result.surprisal_r, result.n_finite, n_tok,
             result.surprisal_r_capped, result.surprisal_r_smoothed, ce)
    return result


# --------------------------------------------------------------------------- figures


def plot_sufficiency(results: dict[str, SufficiencyResult]) -> go.Figure:
    """Scatter of network vs bigram surprisal (finite ones), one trace per labelled result.

    Needs results computed with ``n_sample > 0``.
    """
    from interp.plots import color_for, figure

    fig = figure(title="Sufficiency: network vs bigram surprisal (held-out, finite bigram "
                       "surprisal)",
                 xaxis_title="bigram surprisal (nats)", yaxis_title="network surprisal (nats)")
    for i, (label, res) in enumerate(results.items()):
        if not res.sample_model:
            raise InterpError(
                f"Result {label!r} holds no surprisal sample; compute it with "
                "sufficiency(..., n_sample=2000)."
            )
        fig.add_trace(go.Scattergl(
            x=res.sample_bigram, y=res.sample_model, mode="markers", opacity=0.35,
            marker={"size": 4, "color": color_for(label, i)},
            name=f"{label} (r = {res.surprisal_r:.3f})",
            hovertemplate="bigram %{x:.2f} nats, network %{y:.2f} nats<extra>" + label
                          + "</extra>",
        ))
    top = max(max(r.sample_bigram + r.sample_model) for r in results.values())
    fig.add_trace(go.Scatter(x=[0, top], y=[0, top], mode="lines", name="y = x",
                             line={"color": "#6B7280", "dash": "dot"}, hoverinfo="skip"))
    return fig


def plot_sufficiency_r(results: dict[str, SufficiencyResult | dict]) -> go.Figure:
    """Bars: each network's surprisal r against the bigram model, headline (drop-infinite)
    beside the capped variant; hover shows how many tokens each scored."""
    from interp.plots import color_for, figure

    if not results:
        raise InterpError("Nothing to plot: pass {label: SufficiencyResult}.")
    res = {k: v if isinstance(v, SufficiencyResult) else SufficiencyResult.from_dict(v)
           for k, v in results.items()}
    labels = list(res)
    fig = figure(title="Sufficiency: surprisal correlation with the bigram model",
                 yaxis_title="Pearson r (held-out tokens)", xaxis_title="network",
                 barmode="group")
    fig.add_trace(go.Bar(
        x=labels, y=[r.surprisal_r for r in res.values()], name="drop-infinite (headline)",
        marker_color=[color_for(x, i) for i, x in enumerate(labels)],
        text=[f"{r.surprisal_r:.3f}" for r in res.values()], textposition="outside",
        customdata=[[r.n_finite, r.n_tokens] for r in res.values()],
        hovertemplate="%{x}: r = %{y:.3f} over %{customdata[0]:,} of %{customdata[1]:,} "
                      "tokens<extra>drop-infinite</extra>"))
    fig.add_trace(go.Bar(
        x=labels, y=[r.surprisal_r_capped for r in res.values()], name="capped (all tokens)",
        marker={"color": "white", "line": {"color": "#4B5563", "width": 1.5}},
        hovertemplate="%{x}: r = %{y:.3f}<extra>capped</extra>"))
    fig.update_yaxes(range=[min(0.0, *[r.surprisal_r_capped for r in res.values()
                                       if r.surprisal_r_capped == r.surprisal_r_capped]), 1.08])
    return fig
