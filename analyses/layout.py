"""Where a subnetwork's weights sit: kept weights per layer and block kind.

Takes a :class:`~interp.masks.MaskSet` or plain masks (``Mapping[str, BoolTensor]`` keyed by
target name, True = keep, as ``MaskSet.hard_masks()`` returns), so masks from any source and
any model work: layer and block come from the mask set's :class:`~interp.masks.Target`s (or a
``targets=`` list or mapping), so custom targets such as conv kernels are placed where their
targets say. Masks and eligibility masks may live on any devices and dtypes; everything is
counted on the device of the first mask.

Headline numbers: the share of kept weights per layer and per block kind (where it sits), the
density per block (how much of it is kept), the paper's plurality claims (the most kept
weights in layer 0, and in the first MLP) stated as measured, and the MLP vs attention split
(V+O vs Q+K).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import plotly.graph_objects as go
import torch
from torch import Tensor

from interp.errors import InterpError, MaskError
from interp.masks.targets import BLOCK_KINDS, Target
from interp.plots import figure
from interp.results import Result, bulky

log = logging.getLogger(__name__)

Masks = Mapping[str, Tensor]  # any dtype: nonzero = keep; any device
#: Target name -> (layer or None, block kind).
Positions = Mapping[str, "tuple[int | None, str]"]

_MLP_KINDS = ("mlp_gate", "mlp_in", "mlp_out")
_ATTN_KINDS = ("q", "k", "v", "o")
_TL_NAME = re.compile(r"^blocks\.(\d+)\.(?:attn\.([qkvo])|mlp\.(gate|in|out))$")


def parse_target(name: str) -> tuple[int | None, str]:
    """(layer, block) of a target name: ``"blocks.3.mlp.in"`` -> ``(3, "mlp_in")``.

    Other names (custom targets) give the first integer part as the layer (None if there is
    none) and the last other part as the block: ``"convs.2.weight"`` -> ``(2, "convs")``.
    Pass ``targets=`` to the analyses to use the targets' own layer and block instead.
    """
    m = _TL_NAME.match(name)
    if m is not None:
        return int(m.group(1)), m.group(2) or f"mlp_{m.group(3)}"
    parts = [p for p in name.split(".") if p and p not in ("weight", "_original_component")]
    layer = next((int(p) for p in parts if p.isdigit()), None)
    words = [p for p in parts if not p.isdigit()]
    return layer, (words[-1] if words else name)


def split_masks(
    masks, eligible: Masks | None = None, targets: Sequence[Target] | Positions | None = None
) -> tuple[dict[str, Tensor], dict[str, Tensor] | None, dict[str, tuple[int | None, str]]]:
    """Plain masks, eligibility and positions from a MaskSet or plain masks.

    A MaskSet gives its hard masks, its eligible masks (unless ``eligible`` is given) and its
    targets' positions; plain masks take positions from ``targets`` or :func:`parse_target`.
    """
    if hasattr(masks, "hard_masks") and hasattr(masks, "targets"):
        if targets is None:
            targets = masks.targets
        if eligible is None:
            eligible = masks.eligible_masks()
        masks = masks.hard_masks()
    if not isinstance(masks, Mapping) or not masks:
        raise MaskError("No masks given: pass a MaskSet or a mapping target name -> bool mask.")
    if targets is None:
        positions = {name: parse_target(name) for name in masks}
    elif isinstance(targets, Mapping):
        positions = {name: tuple(pos) for name, pos in targets.items()}
    else:
        positions = {t.name: (t.layer, t.block) for t in targets}
    missing = [n for n in masks if n not in positions]
    if missing:
        raise MaskError(f"No layer/block known for mask {missing[0]!r}: pass targets= with an "
                        "entry for every mask name.")
    return dict(masks), None if eligible is None else dict(eligible), positions


def aligned(name: str, mask: Tensor, device: torch.device,
            eligible: Masks | None = None) -> tuple[Tensor, int]:
    """``(mask & eligible on device, number of eligible weights)`` for one target."""
    if mask.device.type == "meta":
        raise MaskError(f"Mask {name!r} is on the meta device and holds no values; load or "
                        "move the masks to a real device first.")
    m = mask.to(device=device, dtype=torch.bool)
    elig = None if eligible is None else eligible.get(name)
    if elig is None:
        return m, m.numel()
    if tuple(elig.shape) != tuple(mask.shape):
        raise MaskError(f"Eligibility mask for {name!r} has shape {tuple(elig.shape)}, "
                        f"but the mask has {tuple(mask.shape)}.")
    if elig.device.type == "meta":
        raise MaskError(f"Eligibility mask for {name!r} is on the meta device and holds no "
                        "values.")
    e = elig.to(device=device, dtype=torch.bool)
    return m & e, int(e.sum())


def count_masks(masks: Masks, eligible: Masks | None = None) -> dict[str, tuple[int, int]]:
    """``{name: (kept, total)}``; ``total`` counts ``eligible`` weights (default: all)."""
    device = next(iter(masks.values())).device if masks else torch.device("cpu")
    out = {}
    for name, mask in masks.items():
        m, total = aligned(name, mask, device, eligible)
        out[name] = (int(m.sum()), total)
    return out


@dataclass(repr=False)
class LayoutResult(Result):
    """Kept weights per layer (rows) and block kind (columns: the kinds present, transformer
    kinds in ``interp.masks.targets.BLOCK_KINDS`` order, then others as they appear).

    Attributes:
        kept, total, fraction_kept, share: per layer x kind; ``fraction_kept`` is the density
            (kept / eligible in that block), ``share`` the block's part of all kept weights.
        layer_share, layer_density: per layer; kind_share, kind_density: per block kind.
        plurality_layer: the layer with the most kept weights; ``plurality_group`` the
            (layer, attention|mlp) group with the most, e.g. ``"layer 0 mlp"``.
        plurality_in_first_layer / plurality_in_first_mlp: the paper's claims, as measured
            (None for an empty subnetwork or a model without MLP targets).
    """

    label: str
    layers: list[int | None]
    kinds: list[str]
    kept: list[list[int]] = bulky(list)
    total: list[list[int]] = bulky(list)
    fraction_kept: list[list[float | None]] = bulky(list)
    share: list[list[float | None]] = bulky(list)
    total_kept: int = 0
    total_weights: int = 0
    active_fraction: float = float("nan")
    first_mlp_share: float | None = None
    mlp_share: float | None = None
    attention_share: float | None = None
    vo_share: float | None = None
    qk_share: float | None = None
    layer_share: list[float | None] = bulky(list)
    layer_density: list[float | None] = bulky(list)
    kind_share: dict[str, float | None] = bulky(dict)
    kind_density: dict[str, float | None] = bulky(dict)
    plurality_layer: int | None = None
    plurality_group: str | None = None
    plurality_in_first_layer: bool | None = None
    plurality_in_first_mlp: bool | None = None

    def cell(self, layer: int | None, kind: str) -> dict:
        """Counts of one block, e.g. ``cell(0, "mlp_in")``."""
        i, j = self.layers.index(layer), self.kinds.index(kind)
        return {"kept": self.kept[i][j], "total": self.total[i][j],
                "fraction_kept": self.fraction_kept[i][j], "share": self.share[i][j]}

    def rows(self) -> list[dict]:
        """One row per layer: kept, share and density (for report tables)."""
        return [{"layer": "-" if layer is None else layer, "kept": int(sum(self.kept[i])),
                 "share %": _pct(self.layer_share[i]), "density %": _pct(self.layer_density[i])}
                for i, layer in enumerate(self.layers)]


def _pct(v: float | None) -> float:
    return float("nan") if v is None else 100 * v


def _layer_key(layer: int | None) -> tuple[bool, int]:
    return (layer is None, layer if layer is not None else 0)


def layout_analysis(
    masks,
    *,
    label: str = "subnetwork",
    eligible: Masks | None = None,
    targets: Sequence[Target] | Positions | None = None,
) -> LayoutResult:
    """Count a subnetwork's weights per layer x block kind, with shares and densities.

    Args:
        masks: a MaskSet, or target name -> boolean mask (True = keep).
        eligible: optional target name -> boolean mask of weights that can be kept (e.g.
            non-zero weights); totals then count only those. Default: the mask set's
            eligible masks, or every element for plain masks.
        targets: where each mask sits: the Targets (e.g. ``maskset.targets``) or a mapping
            name -> (layer, block). Default: the mask set's targets, or parsed from names.
    """
    masks, eligible, positions = split_masks(masks, eligible, targets)
    counts = count_masks(masks, eligible)
    layers = sorted({positions[n][0] for n in counts}, key=_layer_key)
    present = list(dict.fromkeys(positions[n][1] for n in counts))
    kinds = [k for k in BLOCK_KINDS if k in present] + [k for k in present
                                                         if k not in BLOCK_KINDS]
    kept = np.zeros((len(layers), len(kinds)), dtype=np.int64)
    total = np.zeros_like(kept)
    for name, (k, n) in counts.items():
        layer, kind = positions[name]
        i, j = layers.index(layer), kinds.index(kind)
        kept[i, j] += k
        total[i, j] += n
    all_kept, all_total = int(kept.sum()), int(total.sum())
    col = dict(zip(kinds, kept.sum(0).tolist()))

    def share_of(x: int) -> float | None:
        return x / all_kept if all_kept else None

    mlp_cols = [j for j, kind in enumerate(kinds) if kind in _MLP_KINDS]
    attn_cols = [j for j, kind in enumerate(kinds) if kind in _ATTN_KINDS]
    first_mlp = int(kept[0, mlp_cols].sum()) if mlp_cols else 0
    per_layer = kept.sum(1)
    plurality_layer = layers[int(per_layer.argmax())] if all_kept else None
    groups = {}
    for i, layer in enumerate(layers):
        for part, cols in (("attention", attn_cols), ("mlp", mlp_cols)):
            if cols:
                groups[(layer, part)] = int(kept[i, cols].sum())
        other = [j for j in range(len(kinds)) if j not in attn_cols and j not in mlp_cols]
        if other:
            groups[(layer, "other")] = int(kept[i, other].sum())
    best = max(groups, key=groups.get) if all_kept and groups else None
    result = LayoutResult(
        label=label, layers=layers, kinds=kinds,
        kept=kept.tolist(), total=total.tolist(),
        fraction_kept=_ratio(kept, total), share=_ratio(kept, np.full_like(kept, all_kept)),
        total_kept=all_kept, total_weights=all_total,
        active_fraction=all_kept / all_total if all_total else float("nan"),
        first_mlp_share=share_of(first_mlp) if mlp_cols else None,
        mlp_share=share_of(sum(col.get(k, 0) for k in _MLP_KINDS)) if mlp_cols else None,
        attention_share=share_of(sum(col.get(k, 0) for k in _ATTN_KINDS)) if attn_cols else None,
        vo_share=share_of(col.get("v", 0) + col.get("o", 0)) if attn_cols else None,
        qk_share=share_of(col.get("q", 0) + col.get("k", 0)) if attn_cols else None,
        layer_share=[share_of(int(x)) for x in per_layer],
        layer_density=[int(a) / int(b) if b else None
                       for a, b in zip(per_layer, total.sum(1))],
        kind_share={k: share_of(int(col[k])) for k in kinds},
        kind_density={k: int(col[k]) / int(t) if t else None
                      for k, t in zip(kinds, total.sum(0).tolist())},
        plurality_layer=plurality_layer,
        plurality_group=None if best is None else f"layer {best[0]} {best[1]}",
        plurality_in_first_layer=None if plurality_layer is None
        else plurality_layer == layers[0],
        plurality_in_first_mlp=None if best is None or not mlp_cols
        else best == (layers[0], "mlp"),
    )
    log.info("layout %r: %d of %d weights kept; plurality %s; first-MLP share %s", label,
             all_kept, all_total, result.plurality_group, result.first_mlp_share)
    return result


def _ratio(num: np.ndarray, den: np.ndarray) -> list[list[float | None]]:
    return [[float(a / b) if b else None for a, b in zip(rn, rd)] for rn, rd in zip(num, den)]


_KIND_LABELS = {"q": "Q", "k": "K", "v": "V", "o": "O", "mlp_gate": "MLP gate", "mlp_in": "MLP in",
                "mlp_out": "MLP out"}


def kind_label(kind: str) -> str:
    """How a block kind reads on an axis: ``"mlp_in"`` -> ``"MLP in"``."""
    return _KIND_LABELS.get(kind, kind.replace("_", " "))


def layer_label(layer: int | None) -> str:
    return "-" if layer is None else f"layer {layer}"


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
    x = [kind_label(k) for k in result.kinds]
    y = [layer_label(layer) for layer in result.layers]
    what = "share of kept weights" if value == "share" else "fraction of block kept"
    fig = figure(
        title=f"{'Where the weights sit' if value == 'share' else 'How dense each block is'}: "
              f"{result.label} ({result.total_kept:,} weights, "
              f"{100 * result.active_fraction:.2f}% of masked)",
        height=180 + 48 * len(y), width=760,
    )
    fig.add_trace(go.Heatmap(
        z=z, x=x, y=y, text=text, texttemplate="%{text}", colorscale="Blues", zmin=0,
        colorbar=dict(title=what, tickformat=".0%"),
        customdata=np.array(result.kept), hovertemplate="%{y}, %{x}: %{text} "
        "(%{customdata:,} kept)<extra></extra>",
    ))
    fig.update_yaxes(autorange="reversed", showgrid=False, title_text="layer")
    fig.update_xaxes(showgrid=False, side="bottom", title_text="block")
    return fig
