"""Subnetworks across training: one subnetwork per checkpoint of an LM training run.

For each checkpoint step: the full model's surprisal r, the subnetwork's r and size, and
where it sits (share per block kind and per layer, the plurality claims). Consecutive
checkpoints' subnetworks are then compared layer by layer with the overlap test
(:func:`analyses.overlap.overlap_analysis`): how stable is the subnetwork over training?
Each step's record is written as soon as it is done, so an interrupted analysis resumes at
the next step.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import plotly.graph_objects as go

from analyses.layout import layout_analysis
from analyses.overlap import OverlapResult, overlap_analysis, plot_overlap_layers
from interp.masks.targets import BLOCK_KINDS
from interp.plots import color_for, figure
from interp.report import format_p
from interp.results import Result, bulky

log = logging.getLogger(__name__)


@dataclass(repr=False)
class CheckpointEntry(Result):
    """One checkpoint: its step, validation loss and its subnetwork's measurements.

    ``mask_path`` locates the saved subnetwork (for the overlap between checkpoints).
    """

    step: int
    val_loss: float | None
    full_r: float
    subnetwork_r: float
    active_fraction: float
    first_mlp_share: float | None = None
    plurality_in_first_layer: bool | None = None
    plurality_in_first_mlp: bool | None = None
    block_shares: dict[str, float | None] = bulky(dict)
    layer_shares: list[float | None] = bulky(list)
    mask_path: str = ""


@dataclass(repr=False)
class CheckpointsResult(Result):
    """Entries in ascending step order, the lambda and recipe of every subnetwork, and the
    overlap of each pair of consecutive checkpoints' subnetworks."""

    lam: float
    entries: list[CheckpointEntry] = field(default_factory=list)
    recipe: dict = bulky(dict)
    overlaps: list[OverlapResult] = bulky(list)

    def rows(self) -> list[dict]:
        return [{"step": e.step, "val loss": e.val_loss if e.val_loss is not None else float("nan"),
                 "r full": e.full_r, "r subnetwork": e.subnetwork_r,
                 "active %": 100 * e.active_fraction,
                 "first MLP %": float("nan") if e.first_mlp_share is None
                 else 100 * e.first_mlp_share,
                 "plurality in first MLP": _yes_no(e.plurality_in_first_mlp)}
                for e in self.entries]

    def overlap_rows(self) -> list[dict]:
        """One row per consecutive pair and layer: observed / expected and p."""
        rows = []
        for ov in self.overlaps:
            for lo in ov.layers:
                rows.append({"pair": f"{ov.label_a} → {ov.label_b}",
                             "layer": "-" if lo.layer is None else lo.layer,
                             "shared": lo.overlap, "expected": lo.expected, "ratio": lo.ratio,
                             "p": format_p(lo.p_value)})
        return rows


def _yes_no(v: bool | None) -> str:
    return "n/a" if v is None else ("yes" if v else "no")


def measure_entry(step: int, maskset, *, val_loss: float | None, full_r: float,
                  subnetwork_r: float, mask_path: str = "") -> CheckpointEntry:
    """A :class:`CheckpointEntry` from a checkpoint's subnetwork and its sufficiency."""
    lay = layout_analysis(maskset, label=f"step {step}")
    return CheckpointEntry(
        step=step, val_loss=val_loss, full_r=full_r, subnetwork_r=subnetwork_r,
        active_fraction=lay.active_fraction, first_mlp_share=lay.first_mlp_share,
        plurality_in_first_layer=lay.plurality_in_first_layer,
        plurality_in_first_mlp=lay.plurality_in_first_mlp,
        block_shares=dict(lay.kind_share), layer_shares=list(lay.layer_share),
        mask_path=mask_path)


def across_checkpoints(
    steps: Sequence[int],
    measure: Callable[[int], CheckpointEntry],
    out_dir: str | Path,
    lam: float,
    *,
    recipe: dict | None = None,
    load_masks: Callable[[str], object] | None = None,
    seed: int = 0,
) -> CheckpointsResult:
    """Measure every checkpoint step with ``measure`` (reusing finished ones), then, with
    ``load_masks`` (``entry.mask_path -> MaskSet``), the overlap of consecutive subnetworks."""
    out_dir = Path(out_dir)
    entries = []
    for step in sorted(steps):
        path = out_dir / f"checkpoint-{step:06d}.json"
        if path.is_file():
            entry = CheckpointEntry.load(path)
        else:
            entry = measure(step)
            entry.save(path)
        log.info("step %d: full r %.3f, subnetwork r %.3f", step, entry.full_r, entry.subnetwork_r)
        entries.append(entry)
    overlaps = []
    if load_masks is not None:
        for a, b in zip(entries, entries[1:]):
            overlaps.append(overlap_analysis(
                load_masks(a.mask_path), load_masks(b.mask_path), label_a=f"step {a.step}",
                label_b=f"step {b.step}", seed=seed))
    return CheckpointsResult(lam, entries, dict(recipe or {}), overlaps)


def metrics_record(result: dict) -> dict:
    """The compact form of a :class:`CheckpointsResult` dict for ``metrics.json``."""
    res = CheckpointsResult.from_dict(result)
    return {
        "lam": res.lam,
        "entries": [{k: v for k, v in e.to_dict().items() if k != "mask_path"}
                    for e in res.entries],
        "overlaps": [{"step_a": int(o.label_a.split()[-1]), "step_b": int(o.label_b.split()[-1]),
                      "ratio": o.ratio, "p_value": o.p_value,
                      "layers": [{"layer": lo.layer, "overlap": lo.overlap,
                                  "expected": lo.expected, "ratio": lo.ratio,
                                  "p_value": lo.p_value} for lo in o.layers]}
                     for o in res.overlaps],
    }


def plot_checkpoint_r(result: CheckpointsResult) -> go.Figure:
    """Full-model and subnetwork surprisal r against the training step."""
    steps = [e.step for e in result.entries]
    fig = figure(title=f"Bigram sufficiency over training (λ={result.lam:g})",
                 xaxis_title="training step", yaxis_title="surprisal r vs bigram model")
    fig.add_trace(go.Scatter(x=steps, y=[e.full_r for e in result.entries], mode="lines+markers",
                             name="full model", line=dict(color=color_for("full")),
                             hovertemplate="step %{x}<br>r %{y:.3f}<extra>full model</extra>"))
    fig.add_trace(go.Scatter(
        x=steps, y=[e.subnetwork_r for e in result.entries], mode="lines+markers",
        name="bigram subnetwork", line=dict(color=color_for("bigram")),
        customdata=[100 * e.active_fraction for e in result.entries],
        hovertemplate="step %{x}<br>r %{y:.3f}<br>%{customdata:.2f}% active"
                      "<extra>bigram subnetwork</extra>",
    ))
    return fig


def plot_checkpoint_layout(result: CheckpointsResult) -> go.Figure:
    """Where the subnetwork sits over training: share per block kind (stacked)."""
    steps = [str(e.step) for e in result.entries]
    fig = figure(title="Where the bigram subnetwork sits over training", barmode="stack",
                 xaxis_title="training step", yaxis_title="share of subnetwork weights (%)")
    fig.update_xaxes(type="category")
    kinds = [k for k in BLOCK_KINDS if any(k in e.block_shares for e in result.entries)]
    kinds += sorted({k for e in result.entries for k in e.block_shares} - set(kinds))
    for kind in kinds:
        shares = [100 * (e.block_shares.get(kind) or 0.0) for e in result.entries]
        if any(shares):  # e.g. no mlp_gate trace for models without gated MLPs
            fig.add_trace(go.Bar(x=steps, y=shares, name=kind,
                                 hovertemplate=f"{kind}: %{{y:.1f}}%<extra>step %{{x}}</extra>"))
    return fig


def plot_checkpoint_overlap(result: CheckpointsResult) -> go.Figure:
    """Overlap of consecutive checkpoints' subnetworks, layer by layer (x chance)."""
    fig = plot_overlap_layers(result.overlaps)
    fig.update_layout(title="Stability over training: overlap of consecutive checkpoints' "
                            "subnetworks per layer")
    return fig
