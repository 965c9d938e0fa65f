"""A sparsity sweep: one subnetwork per lambda, resumable, and the paper's selection rule.

Each lambda's mask set is saved as soon as it is trained (``{prefix}-lam{lambda}``), together
with its evaluation, so a rerun or a resumed run trains only the lambdas that are missing.
The analysed subnetwork is the sparsest one whose correlation is within ``tolerance``
(0.04 in the paper) of the least-regularised one's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import plotly.graph_objects as go

from interp.errors import InterpError
from interp.results import Result, bulky

log = logging.getLogger(__name__)


@dataclass(repr=False)
class SweepEntry(Result):
    """One trained subnetwork of the sweep and its evaluation."""

    lam: float
    active_fraction: float
    surprisal_r: float
    path: str
    metrics: dict = bulky(dict)
    fit: dict = bulky(dict)


@dataclass(repr=False)
class SweepResult(Result):
    """All entries (ascending lambda) and the selected one."""

    entries: list[SweepEntry]
    selected_lambda: float
    tolerance: float = 0.04
    metric: str = "surprisal_r"

    @property
    def selected(self) -> SweepEntry:
        return next(e for e in self.entries if e.lam == self.selected_lambda)

    def rows(self) -> list[dict]:
        return [
            {"lambda": e.lam, "active %": 100 * e.active_fraction, "r": e.surprisal_r,
             "r capped": e.metrics.get("surprisal_r_capped", float("nan")),
             "CE to bigram": e.metrics.get("ce_to_bigram", float("nan")),
             "steps": e.fit.get("steps", ""), "stopped by": e.fit.get("stopped_reason", ""),
             "selected": "yes" if e.lam == self.selected_lambda else ""}
            for e in self.entries
        ]


def select_lambda(entries: Sequence[SweepEntry], tolerance: float = 0.04) -> float:
    """The sparsest entry whose r is within ``tolerance`` of the smallest lambda's r."""
    if not entries:
        raise InterpError("select_lambda needs at least one sweep entry; pass lambdas.")
    base = min(entries, key=lambda e: e.lam)
    # a relative slack, so r exactly `tolerance` below the base counts despite float rounding
    # (0.40 - 0.04 is 0.36000000000000004)
    floor = base.surprisal_r - tolerance - 1e-12 * max(1.0, abs(base.surprisal_r))
    ok = [e for e in entries if e.surprisal_r >= floor]
    return min(ok, key=lambda e: (e.active_fraction, -e.lam)).lam


def lam_tag(lam: float) -> str:
    """File-name-safe lambda: 0.5 -> '0.5', 10 -> '10'."""
    return f"{lam:g}"


def lambda_sweep(
    lambdas: Sequence[float],
    train: Callable[[float], tuple[object, dict]],
    evaluate: Callable[[object], dict],
    out_dir: str | Path,
    *,
    prefix: str = "bigram",
    load: Callable[[Path], object],
    tolerance: float = 0.04,
) -> SweepResult:
    """Train (or reuse) one mask set per lambda, evaluate each, and select one.

    Args:
        lambdas: sparsity weights; trained in ascending order.
        train: ``lam -> (maskset, fit_info)``; the mask set must have ``save(path)``.
        evaluate: ``maskset -> dict`` with at least ``surprisal_r`` and ``active_fraction``.
        out_dir: where ``{prefix}-lam{lambda}.safetensors`` and its ``.eval.json`` live.
        load: ``path -> maskset`` for finished lambdas (e.g. ``MaskSet.load``).
    """
    out_dir = Path(out_dir)
    entries = []
    for lam in sorted(lambdas):
        stem = f"{prefix}-lam{lam_tag(lam)}"  # may contain a dot (0.5): never use with_suffix
        record = out_dir / f"{stem}.eval.json"
        if record.is_file() and (out_dir / f"{stem}.safetensors").is_file():
            entry = SweepEntry.load(record)
            log.info("reusing %s (r=%.3f)", stem, entry.surprisal_r)
        else:
            maskset, fit_info = train(lam)
            path = maskset.save(out_dir / f"{stem}.safetensors")
            metrics = evaluate(maskset)
            entry = SweepEntry(lam, metrics.pop("active_fraction"), metrics.pop("surprisal_r"),
                               str(Path(path).name), metrics, fit_info)
            entry.save(record)  # written last: marks the lambda finished
        entries.append(entry)
    return SweepResult(entries, select_lambda(entries, tolerance), tolerance)


def load_selected(result: SweepResult, out_dir: str | Path, load: Callable[[Path], object]):
    """The selected mask set, loaded from the sweep directory."""
    return load(Path(out_dir) / result.selected.path)


def plot_sweep(result: SweepResult) -> go.Figure:
    """Surprisal r against the active fraction, one point per lambda, the selection marked."""
    from interp.plots import figure

    xs = [100 * e.active_fraction for e in result.entries]
    ys = [e.surprisal_r for e in result.entries]
    fig = figure()
    fig.add_trace(go.Scatter(
        x=xs, y=ys, mode="lines+markers+text", text=[f"λ={lam_tag(e.lam)}" for e in result.entries],
        textposition="top center", name="bigram subnetworks",
        hovertemplate="%{text}: %{x:.2f}% of masked weights active, r = %{y:.3f}<extra></extra>",
    ))
    sel = result.selected
    fig.add_trace(go.Scatter(x=[100 * sel.active_fraction], y=[sel.surprisal_r], mode="markers",
                             marker=dict(size=16, symbol="star"), name="selected",
                             hovertemplate=f"selected: λ={lam_tag(sel.lam)}, %{{x:.2f}}% active, "
                                           "r = %{y:.3f}<extra></extra>"))
    base = min(result.entries, key=lambda e: e.lam).surprisal_r
    fig.add_hline(y=base - result.tolerance, line_dash="dot",
                  annotation_text=f"λ=min r − {result.tolerance}")
    fig.update_layout(title="Sparsity sweep: sufficiency vs size",
                      xaxis_title="active masked weights (%)", yaxis_title="surprisal r vs bigram",
                      xaxis_type="log")
    return fig
