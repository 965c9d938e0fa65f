"""Subnetworks across training: one bigram subnetwork per checkpoint of an LM training run.

For each checkpoint step: the full model's surprisal r, the subnetwork's r and size, and
where the subnetwork sits (share per block kind, share in the first MLP). Each step's record
is written as soon as it is done, so an interrupted analysis resumes at the next step.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import plotly.graph_objects as go

from analyses._results import JSONResult
from interp.io import read_json, write_json
from interp.masks.targets import BLOCK_KINDS

log = logging.getLogger(__name__)

@dataclass
class CheckpointEntry(JSONResult):
    """One checkpoint: its step, validation loss and its subnetwork's measurements."""

    step: int
    val_loss: float | None
    full_r: float
    subnetwork_r: float
    active_fraction: float
    first_mlp_share: float
    block_shares: dict[str, float] = field(default_factory=dict)


@dataclass
class CheckpointsResult(JSONResult):
    """Entries in ascending step order, and the lambda used for every subnetwork."""

    lam: float
    entries: list[CheckpointEntry]

    @classmethod
    def from_dict(cls, data: dict) -> CheckpointsResult:
        return cls(data["lam"], [CheckpointEntry.from_dict(e) for e in data["entries"]])

    def rows(self) -> list[dict]:
        return [{"step": e.step, "val loss": e.val_loss if e.val_loss is not None else float("nan"),
                 "r full": e.full_r, "r subnetwork": e.subnetwork_r,
                 "active %": 100 * e.active_fraction, "first MLP %": 100 * e.first_mlp_share}
                for e in self.entries]


def across_checkpoints(
    steps: Sequence[int],
    measure: Callable[[int], CheckpointEntry],
    out_dir: str | Path,
    lam: float,
) -> CheckpointsResult:
    """Measure every checkpoint step with ``measure`` (reusing finished ones) and collect."""
    out_dir = Path(out_dir)
    entries = []
    for step in sorted(steps):
        path = out_dir / f"checkpoint-{step:06d}.json"
        if path.is_file():
            entry = CheckpointEntry.from_dict(read_json(path))
        else:
            entry = measure(step)
            write_json(path, entry.to_dict())
        log.info("step %d: full r %.3f, subnetwork r %.3f", step, entry.full_r, entry.subnetwork_r)
        entries.append(entry)
    return CheckpointsResult(lam, entries)


def plot_checkpoint_r(result: CheckpointsResult) -> go.Figure:
    """Full-model and subnetwork surprisal r against the training step."""
    from interp.plots import color_for, figure

    steps = [e.step for e in result.entries]
    fig = figure(title=f"Bigram sufficiency over training (λ={result.lam:g})",
                 xaxis_title="training step", yaxis_title="surprisal r vs bigram model")
    fig.add_trace(go.Scatter(x=steps, y=[e.full_r for e in result.entries], mode="lines+markers",
                             name="full model", line=dict(color=color_for("full"))))
    fig.add_trace(go.Scatter(
        x=steps, y=[e.subnetwork_r for e in result.entries], mode="lines+markers",
        name="bigram subnetwork", line=dict(color=color_for("bigram")),
        customdata=[100 * e.active_fraction for e in result.entries],
        hovertemplate="step %{x}<br>r %{y:.3f}<br>%{customdata:.2f}% active<extra></extra>",
    ))
    return fig


def plot_checkpoint_layout(result: CheckpointsResult) -> go.Figure:
    """Where the subnetwork sits over training: share per block kind (stacked)."""
    from interp.plots import figure

    steps = [str(e.step) for e in result.entries]
    fig = figure(title="Where the bigram subnetwork sits over training", barmode="stack",
                 xaxis_title="training step", yaxis_title="share of subnetwork weights (%)")
    fig.update_xaxes(type="category")
    for kind in BLOCK_KINDS:
        shares = [100 * e.block_shares.get(kind, 0.0) for e in result.entries]
        if any(shares):  # e.g. no mlp_gate trace for models without gated MLPs
            fig.add_trace(go.Bar(x=steps, y=shares, name=kind))
    return fig
