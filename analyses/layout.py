"""Where a subnetwork's weights sit: kept weights per layer and block kind.

Takes plain masks (``Mapping[str, BoolTensor]`` keyed by target name, True = keep, as
``MaskSet.hard_masks()`` returns), so masks from any source work. The paper's headline
numbers are :attr:`LayoutResult.first_mlp_share` (plurality in the first MLP layer) and the
MLP vs attention split (V+O vs Q+K).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import plotly.graph_objects as go
from jaxtyping import Bool
from torch import Tensor

from analyses._results import JSONResult
from interp.errors import InterpError, MaskError
from interp.masks.targets import BLOCK_KINDS
from interp.plots import figure

log = logging.getLogger(__name__)

_MLP_KINDS = ("mlp_gate", "mlp_in", "mlp_out")
_TARGET = re.compile(r"^blocks\.(\d+)\.(?:attn\.([qkvo])|mlp\.(gate|in|out))$")


def parse_target(name: str) -> tuple[int, str]:
    """``"blocks.3.mlp.in"`` -> ``(3, "mlp_in")``; raise MaskError for other names."""
    m = _TARGET.match(name)
    if m is None:
        raise MaskError(
            f"Mask name {name!r} is not a target name. Expected 'blocks.{{l}}.attn.q|k|v|o' or "
            "'blocks.{l}.mlp.in|out|gate' (the keys of MaskSet.hard_masks())."
        )
    return int(m.group(1)), m.group(2) or f"mlp_{m.group(3)}"


def count_masks(
    masks: Mapping[str, Bool[Tensor, "*shape"]],
    eligible: Mapping[str, Bool[Tensor, "*shape"]] | None = None,
) -> dict[str, tuple[int, int]]:
    """``{name: (kept, total)}``; ``total`` counts ``eligible`` weights (default: all)."""
    out = {}
    for name, mask in masks.items():
        parse_target(name)
        elig = None if eligible is None else eligible.get(name)
        if elig is not None and tuple(elig.shape) != tuple(mask.shape):
            raise MaskError(f"Eligibility mask for {name!r} has shape {tuple(elig.shape)}, "
                            f"but the mask has {tuple(mask.shape)}.")
        kept = mask.bool() if elig is None else mask.bool() & elig.bool()
        total = mask.numel() if elig is None else int(elig.bool().sum())
        out[name] = (int(kept.sum()), total)
    return out


@dataclass
class LayoutResult(JSONResult):
    """Kept weights per layer (rows) and block kind (columns: the kinds present, in
    ``interp.masks.targets.BLOCK_KINDS`` order; ``mlp_gate`` only for gated MLPs)."""

    label: str
    layers: list[int]
    kinds: list[str]
    kept: list[list[int]]
    total: list[list[int]]
    fraction_kept: list[list[float | None]]
    share: list[list[float | None]]
    total_kept: int
    total_weights: int
    active_fraction: float
    first_mlp_share: float | None
    mlp_share: float | None
    attention_share: float | None
    vo_share: float | None
    qk_share: float | None

    def cell(self, layer: int, kind: str) -> dict:
        """Counts of one block, e.g. ``cell(0, "mlp_in")``."""
        i, j = self.layers.index(layer), self.kinds.index(kind)
        return {"kept": self.kept[i][j], "total": self.total[i][j],
                "fraction_kept": self.fraction_kept[i][j], "share": self.share[i][j]}


def layout_analysis(
    masks: Mapping[str, Bool[Tensor, "*shape"]],
    *,
    label: str = "subnetwork",
    eligible: Mapping[str, Bool[Tensor, "*shape"]] | None = None,
) -> LayoutResult:
    """Count a subnetwork's weights per layer x block kind, and its MLP / attention shares.

    Args:
        masks: target name -> boolean mask (True = keep).
        eligible: optional target name -> boolean mask of weights that can be kept (e.g.
            non-zero weights); totals then count only those. Default: every element.
    """
    if not masks:
        raise MaskError("No masks given: pass a mapping of target name -> boolean mask.")
    counts = count_masks(masks, eligible)
    positions = {name: parse_target(name) for name in counts}
    layers = sorted({layer for layer, _ in positions.values()})
    present = {kind for _, kind in positions.values()}
    kinds = [k for k in BLOCK_KINDS if k in present]
    kept = np.zeros((len(layers), len(kinds)), dtype=np.int64)
    total = np.zeros_like(kept)
    for name, (k, n) in counts.items():
        layer, kind = positions[name]
        i, j = layers.index(layer), kinds.index(kind)
        kept[i, j] += k
        total[i, j] += n
    all_kept, all_total = int(kept.sum()), int(total.sum())
    col = {kind: int(kept[:, kinds.index(kind)].sum()) if kind in kinds else 0
           for kind in BLOCK_KINDS}
    mlp_cols = [j for j, kind in enumerate(kinds) if kind in _MLP_KINDS]
    first_mlp = int(kept[0, mlp_cols].sum()) if layers[0] == 0 else 0

    def share_of(x: int) -> float | None:
        return x / all_kept if all_kept else None

    result = LayoutResult(
        label=label, layers=layers, kinds=kinds,
        kept=kept.tolist(), total=total.tolist(),
        fraction_kept=_ratio(kept, total), share=_ratio(kept, np.full_like(kept, all_kept)),
        total_kept=all_kept, total_weights=all_total,
        active_fraction=all_kept / all_total if all_total else float("nan"),
        first_mlp_share=share_of(first_mlp),
        mlp_share=share_of(sum(col[k] for k in _MLP_KINDS)),
        attention_share=share_of(col["q"] + col["k"] + col["v"] + col["o"]),
        vo_share=share_of(col["v"] + col["o"]),
        qk_share=share_of(col["q"] + col["k"]),
    )
    log.info("layout %r: %d of %d weights kept; first-MLP share %s, MLP share %s", label,
             all_kept, all_total, result.first_mlp_share, result.mlp_share)
    return result


def _ratio(num: np.ndarray, den: np.ndarray) -> list[list[float | None]]:
    return [[float(a / b) if b else None for a, b in zip(rn, rd)] for rn, rd in zip(num, den)]


_KIND_LABELS = {"q": "Q", "k": "K", "v": "V", "o": "O", "mlp_gate": "MLP gate", "mlp_in": "MLP in",
                "mlp_out": "MLP out"}


def plot_layout(result: LayoutResult, *, value: str = "share") -> go.Figure:
    """Heatmap of layers x block kinds with % annotations.

    ``value="share"``: each block's share of the subnetwork's kept weights (where it sits);
    ``"fraction_kept"``: the fraction of each block's weights kept (how dense it is).
    """
    if value not in ("share", "fraction_kept"):
        raise InterpError(f"value must be 'share' or 'fraction_kept', not {value!r}.")
    z = np.array([[np.nan if v is None else v for v in row] for row in getattr(result, value)],
                 dtype=float)
    text = [[("" if np.isnan(v) else f"{100 * v:.1f}%") for v in row] for row in z]
    x = [_KIND_LABELS[k] for k in result.kinds]
    y = [f"layer {layer}" for layer in result.layers]
    what = "share of kept weights" if value == "share" else "fraction of block kept"
    fig = figure(
        title=f"Where the weights sit: {result.label} ({result.total_kept:,} weights, "
              f"{100 * result.active_fraction:.2f}% of masked)",
        height=180 + 48 * len(y), width=760,
    )
    fig.add_trace(go.Heatmap(
        z=z, x=x, y=y, text=text, texttemplate="%{text}", colorscale="Blues", zmin=0,
        colorbar=dict(title=what, tickformat=".0%"),
        customdata=np.array(result.kept), hovertemplate="%{y}, %{x}: %{text} "
        "(%{customdata:,} kept)<extra></extra>",
    ))
    fig.update_yaxes(autorange="reversed", showgrid=False)
    fig.update_xaxes(showgrid=False, side="bottom", title_text="block")
    return fig
