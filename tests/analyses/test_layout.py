"""Where a subnetwork's weights sit: counts, fractions and shares per layer and block."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from analyses.layout import LayoutResult, layout_analysis, parse_target, plot_layout
from interp.errors import MaskError

SHAPES = {"attn.q": (8, 8), "attn.k": (8, 8), "attn.v": (8, 8), "attn.o": (8, 8),
          "mlp.in": (16, 8), "mlp.out": (8, 16)}
# kept weights per (layer, suffix); 200 in all
KEPT = {(0, "mlp.in"): 60, (0, "mlp.out"): 40, (0, "attn.v"): 10, (0, "attn.o"): 10,
        (0, "attn.q"): 5, (1, "mlp.in"): 30, (1, "mlp.out"): 30, (1, "attn.k"): 15}


def _masks():
    out = {}
    for layer in range(2):
        for suffix, shape in SHAPES.items():
            m = torch.zeros(shape, dtype=torch.bool).flatten()
            m[: KEPT.get((layer, suffix), 0)] = True
            out[f"blocks.{layer}.{suffix}"] = m.view(shape)
    return out


def test_counts_fractions_and_shares():
    res = layout_analysis(_masks(), label="bigram")
    assert res.layers == [0, 1] and res.kinds == ["q", "k", "v", "o", "mlp_in", "mlp_out"]
    assert res.total_kept == 200 and res.total_weights == 2 * (4 * 64 + 2 * 128)
    assert res.active_fraction == pytest.approx(200 / 1024)
    assert res.cell(0, "mlp_in") == {"kept": 60, "total": 128, "fraction_kept": 60 / 128,
                                     "share": 60 / 200}
    assert res.cell(1, "k")["kept"] == 15 and res.cell(1, "q")["fraction_kept"] == 0.0
    assert res.first_mlp_share == pytest.approx(100 / 200)
    assert res.mlp_share == pytest.approx(160 / 200)
    assert res.attention_share == pytest.approx(40 / 200)
    assert res.vo_share == pytest.approx(20 / 200) and res.qk_share == pytest.approx(20 / 200)
    assert res.mlp_share + res.attention_share == pytest.approx(1.0)
    assert np.nansum(np.array(res.share, dtype=float)) == pytest.approx(1.0)
    assert LayoutResult.from_json(res.to_json()) == res


def test_eligible_weights_set_the_totals():
    masks = _masks()
    eligible = {k: torch.ones_like(v) for k, v in masks.items()}
    eligible["blocks.0.mlp.in"].view(-1)[100:] = False  # 28 exact-zero weights
    res = layout_analysis(masks, eligible=eligible)
    assert res.cell(0, "mlp_in")["total"] == 100
    assert res.total_weights == 1024 - 28 and res.total_kept == 200


def test_empty_subnetwork_has_no_shares():
    masks = {k: torch.zeros_like(v) for k, v in _masks().items()}
    res = layout_analysis(masks)
    assert res.total_kept == 0 and res.first_mlp_share is None
    json_ok = LayoutResult.from_json(res.to_json())
    assert json_ok.share[0][0] is None


def test_names_positions_and_bad_shapes():
    assert parse_target("blocks.12.attn.o") == (12, "o")
    assert parse_target("blocks.0.mlp.gate") == (0, "mlp_gate")
    assert parse_target("convs.2.weight") == (2, "convs")
    assert parse_target("head") == (None, "head")
    with pytest.raises(MaskError, match="No layer/block known"):
        layout_analysis({"a": torch.ones(2, dtype=torch.bool)}, targets={"b": (0, "x")})
    with pytest.raises(MaskError, match="No masks"):
        layout_analysis({})
    masks = _masks()
    with pytest.raises(MaskError, match="shape"):
        layout_analysis(masks, eligible={"blocks.0.mlp.in": torch.ones(3, dtype=torch.bool)})


def test_heatmap_annotates_percentages():
    res = layout_analysis(_masks(), label="bigram")
    fig = plot_layout(res)
    heat = fig.data[0]
    assert heat.type == "heatmap" and np.asarray(heat.z).shape == (2, 6)
    assert heat.text[0][4] == "30.0%"  # layer 0 MLP in: 60 of 200 kept weights
    dense = plot_layout(res, value="fraction_kept").data[0]
    assert dense.text[0][4] == f"{100 * 60 / 128:.1f}%"


def test_gated_mlp_counts_as_mlp():
    masks = _masks()
    masks["blocks.0.mlp.gate"] = torch.ones(16, 8, dtype=torch.bool)  # 128 more kept
    res = layout_analysis(masks)
    assert res.kinds == ["q", "k", "v", "o", "mlp_gate", "mlp_in", "mlp_out"]
    assert res.cell(0, "mlp_gate")["kept"] == 128 and res.cell(1, "mlp_gate")["total"] == 0
    assert res.first_mlp_share == pytest.approx(228 / 328)
    assert res.mlp_share == pytest.approx(288 / 328)


def test_layout_of_a_mask_set(native_model):
    from interp.masks import MaskSet

    ms = MaskSet.for_model(native_model, seed=0)
    res = layout_analysis(ms.hard_masks(), eligible=ms.eligible_masks())
    assert res.layers == [0, 1] and res.kinds == ["q", "k", "v", "o", "mlp_in", "mlp_out"]
    assert res.total_weights == ms.n_weights
    assert layout_analysis(ms).to_dict() == res.to_dict()  # a MaskSet brings its own eligibility


def test_plurality_claims_and_densities_as_measured():
    res = layout_analysis(_masks())
    assert res.plurality_layer == 0 and res.plurality_in_first_layer is True
    assert res.plurality_group == "layer 0 mlp" and res.plurality_in_first_mlp is True
    assert res.layer_share == pytest.approx([125 / 200, 75 / 200])
    assert res.layer_density == pytest.approx([125 / 512, 75 / 512])
    assert res.kind_share["mlp_in"] == pytest.approx(90 / 200)
    assert res.kind_density["k"] == pytest.approx(15 / 128)
    # move the plurality to layer 1's attention: the claims must read false
    masks = _masks()
    masks["blocks.1.attn.q"] = torch.ones(8, 8, dtype=torch.bool)
    masks["blocks.1.attn.v"] = torch.ones(8, 8, dtype=torch.bool)
    masks["blocks.1.attn.o"] = torch.ones(8, 8, dtype=torch.bool)
    res = layout_analysis(masks)
    assert res.plurality_layer == 1 and res.plurality_in_first_layer is False
    assert res.plurality_group == "layer 1 attention" and res.plurality_in_first_mlp is False
    empty = layout_analysis({k: torch.zeros_like(v) for k, v in masks.items()})
    assert empty.plurality_in_first_mlp is None and empty.plurality_layer is None


def test_conv_targets_are_placed_by_their_targets(conv_net):
    """Custom targets (conv kernels) work: layer and block come from the Target."""
    from interp.masks import MaskSet

    ms = MaskSet.for_model(conv_net, targets={"stem": (conv_net.conv, "weight"),
                                              "readout": (conv_net.head, "weight")})
    res = layout_analysis(ms)
    assert res.kinds == ["stem", "readout"] and res.layers == [None]
    assert res.total_weights == conv_net.conv.weight.numel() + conv_net.head.weight.numel()
    assert res.mlp_share is None and res.plurality_in_first_mlp is None
    placed = layout_analysis(ms, targets={"stem": (0, "conv"), "readout": (1, "linear")})
    assert placed.layers == [0, 1] and placed.kinds == ["conv", "linear"]


def test_mixed_devices_and_dtypes():
    """Masks and eligibility on different devices/dtypes are aligned, not a crash; meta masks
    (no values) give a clear MaskError."""
    masks = _masks()
    eligible = {k: torch.ones_like(v, dtype=torch.uint8) for k, v in masks.items()}
    ref = layout_analysis(masks)
    assert layout_analysis({k: v.float() for k, v in masks.items()},
                           eligible=eligible).to_dict() == ref.to_dict()
    with pytest.raises(MaskError, match="meta device"):
        layout_analysis({k: v.to("meta") for k, v in masks.items()},
                        eligible={k: v.bool() for k, v in eligible.items()})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_masks_with_cpu_eligibility():
    masks = _masks()
    eligible = {k: torch.ones_like(v) for k, v in masks.items()}
    ref = layout_analysis(masks, eligible=eligible)
    gpu = layout_analysis({k: v.cuda() for k, v in masks.items()}, eligible=eligible)
    assert gpu.to_dict() == ref.to_dict()
