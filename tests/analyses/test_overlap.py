"""Overlap of subnetworks: expected overlap, exact null and calibrated p-values."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from analyses.overlap import (
    OverlapResult,
    monte_carlo_pvalue,
    null_distribution,
    overlap_analysis,
    overlap_pvalues,
    plot_overlap,
    plot_overlap_blocks,
    plot_overlap_layers,
)
from interp.errors import MaskError
from interp.masks import random_masks

NAMES = ["blocks.0.attn.q", "blocks.0.attn.v", "blocks.0.mlp.in", "blocks.0.mlp.out",
         "blocks.1.mlp.in", "blocks.1.mlp.out"]


def _random_masks(sizes, n=3000, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, k in zip(NAMES, sizes):
        m = torch.zeros(n, dtype=torch.bool)
        m[torch.randperm(n, generator=g)[:k]] = True
        out[name] = m.view(30, 100)
    return out


def test_counts_expectation_and_shares():
    a = {"blocks.0.mlp.in": torch.tensor([1, 1, 1, 1, 0, 0, 0, 0, 0, 0], dtype=torch.bool),
         "blocks.0.mlp.out": torch.tensor([1, 1, 0, 0, 0], dtype=torch.bool)}
    b = {"blocks.0.mlp.in": torch.tensor([1, 1, 0, 0, 0, 0, 0, 0, 1, 1], dtype=torch.bool),
         "blocks.0.mlp.out": torch.tensor([0, 1, 1, 1, 1], dtype=torch.bool)}
    res = overlap_analysis(a, b, label_a="bigram", label_b="optimal")
    assert (res.n_weights, res.size_a, res.size_b, res.overlap) == (15, 6, 8, 3)
    assert res.expected == pytest.approx(4 * 4 / 10 + 2 * 4 / 5)
    assert res.ratio == pytest.approx(3 / res.expected)
    assert res.overlap_fraction == pytest.approx(3 / 15)
    assert res.share_a_in_b == pytest.approx(3 / 6) and res.share_b_in_a == pytest.approx(3 / 8)
    assert res.jaccard == pytest.approx(3 / 11)
    # exact p by brute force over the two hypergeometric blocks
    x1, x2 = np.arange(5), np.arange(3)
    p1, p2 = stats.hypergeom.pmf(x1, 10, 4, 4), stats.hypergeom.pmf(x2, 5, 2, 4)
    joint = np.add.outer(x1, x2)
    probs = np.outer(p1, p2)
    assert res.p_value == pytest.approx(probs[joint >= 3].sum())
    assert res.mid_p_value == pytest.approx(probs[joint > 3].sum() + 0.5 * probs[joint == 3].sum())
    assert OverlapResult.from_json(res.to_json()) == res


def test_mask_with_itself():
    a = _random_masks([300] * 6)
    res = overlap_analysis(a, a)
    assert res.ratio == pytest.approx(3000 / 300)
    assert res.p_value < 1e-30 and res.share_a_in_b == 1.0 and res.jaccard == 1.0


def test_null_distribution_is_exact_for_one_block_and_fast_for_large_blocks():
    off, pmf = null_distribution([(50, 20, 30)])
    x = np.arange(off, off + pmf.size)
    np.testing.assert_allclose(pmf, stats.hypergeom.pmf(x, 50, 20, 30), rtol=1e-10, atol=1e-300)
    # large blocks take the FFT path; mean and variance must still match
    blocks = [(1_000_000, 400_000, 500_000), (2_000_000, 300_000, 1_000_000),
              (500_000, 1_000, 2_000)]
    off, pmf = null_distribution(blocks)
    x = off + np.arange(pmf.size)
    mean = sum(ka * kb / n for n, ka, kb in blocks)
    var = sum(ka * kb * (n - ka) * (n - kb) / (n * n * (n - 1)) for n, ka, kb in blocks)
    assert pmf.sum() == pytest.approx(1.0)
    assert (pmf * x).sum() == pytest.approx(mean, rel=1e-9)
    assert (pmf * (x - mean) ** 2).sum() == pytest.approx(var, rel=1e-6)


def test_monte_carlo_agrees_with_exact():
    a = _random_masks([400, 100, 900, 600, 300, 50], seed=1)
    b = _random_masks([500, 200, 800, 700, 100, 80], seed=2)
    blocks = [(3000, int(a[k].sum()), int(b[k].sum())) for k in NAMES]
    res = overlap_analysis(a, b, n_permutations=20000, seed=0)
    target = round(res.expected + 20)  # a moderately surprising overlap
    exact = overlap_pvalues(blocks, target)["p_value"]
    mc = monte_carlo_pvalue(blocks, target, n_permutations=20000, seed=0)
    assert 0.001 < exact < 0.5 and mc == pytest.approx(exact, abs=4 * np.sqrt(exact / 20000))
    assert res.mc_p_value == pytest.approx(res.p_value, abs=0.02)


def test_p_value_is_calibrated_under_the_null():
    """Independent random masks with fixed per-block counts: the randomized p-value
    P(X > obs) + U P(X = obs) must be exactly uniform (it removes the discreteness that a KS
    test on p or mid-p would detect); mid-p is near-uniform, P(X >= obs) conservative."""
    base_a = _random_masks([600, 300, 900, 750, 450, 600], seed=0)
    base_b = _random_masks([900, 600, 450, 900, 300, 750], seed=1)
    results = [overlap_analysis(random_masks(base_a, seed=2 * i),
                                random_masks(base_b, seed=2 * i + 1)) for i in range(1000)]
    p = np.array([r.p_value for r in results])
    mid = np.array([r.mid_p_value for r in results])
    p_eq = 2 * (p - mid)
    randomized = p - p_eq + np.random.default_rng(0).uniform(size=p.size) * p_eq
    assert stats.kstest(randomized, "uniform").pvalue > 0.01
    assert 0.03 <= (mid < 0.05).mean() <= 0.07  # binomial sd 0.007
    assert np.all(p >= mid) and (p < 0.05).mean() <= 0.07


def test_per_layer_overlap_is_the_same_exact_test_within_each_layer():
    a = _random_masks([300, 300, 900, 750, 450, 600], seed=0)
    b = dict(a)  # layer 0: identical to A; layer 1: independent of A
    b.update({k: v for k, v in _random_masks([300, 300, 900, 750, 450, 600], seed=9).items()
              if k.startswith("blocks.1.")})
    res = overlap_analysis(a, b)
    assert [lo.layer for lo in res.layers] == [0, 1]
    lo0, lo1 = res.layers
    assert lo0.overlap == 300 + 300 + 900 + 750 and lo0.ratio > 2 and lo0.p_value < 1e-10
    assert lo1.overlap == int(sum((a[k] & b[k]).sum() for k in NAMES[4:]))
    assert lo1.expected == pytest.approx(450 * 450 / 3000 + 600 * 600 / 3000)
    alone = overlap_analysis({k: a[k] for k in NAMES[4:]}, {k: b[k] for k in NAMES[4:]})
    assert lo1.p_value == pytest.approx(alone.p_value) and lo1.ratio == pytest.approx(alone.ratio)
    assert sum(lo.overlap for lo in res.layers) == res.overlap
    assert OverlapResult.from_json(res.to_json()).layers == res.layers


def test_custom_targets_take_layer_and_block_from_targets():
    """Conv kernels (no transformer names) are placed by their targets, not a name regex."""
    a = {"stack.conv_a": torch.tensor([1, 1, 0, 0], dtype=torch.bool),
         "stack.conv_b": torch.tensor([1, 0, 1, 0], dtype=torch.bool)}
    b = {"stack.conv_a": torch.tensor([1, 0, 0, 1], dtype=torch.bool),
         "stack.conv_b": torch.tensor([1, 0, 1, 1], dtype=torch.bool)}
    res = overlap_analysis(a, b, targets={"stack.conv_a": (0, "conv"), "stack.conv_b": (3, "conv")})
    assert [lo.layer for lo in res.layers] == [0, 3]
    assert [(r["layer"], r["block"]) for r in res.blocks] == [(0, "conv"), (3, "conv")]
    assert (res.layers[0].overlap, res.layers[1].overlap) == (1, 2)


def test_masks_on_mixed_devices_and_dtypes_are_aligned():
    """Masks may live on another device or dtype than the eligibility masks (a CUDA mask set
    beside CPU eligibility crashed the study); meta masks give a clear MaskError."""
    a = _random_masks([300] * 6, seed=0)
    b = _random_masks([300] * 6, seed=1)
    eligible = {k: torch.ones_like(v) for k, v in a.items()}
    eligible[NAMES[0]][:, 50:] = False
    ref = overlap_analysis(a, b, eligible=eligible)
    as_float = {k: v.float() for k, v in a.items()}
    as_uint8 = {k: v.to(torch.uint8) for k, v in eligible.items()}
    assert overlap_analysis(as_float, b, eligible=as_uint8).to_dict() == ref.to_dict()
    meta = {k: v.to("meta") for k, v in a.items()}
    with pytest.raises(MaskError, match="meta device"):
        overlap_analysis(meta, b, eligible=eligible)
    with pytest.raises(MaskError, match="meta device"):
        overlap_analysis(a, b, eligible={k: v.to("meta") for k, v in eligible.items()})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_masks_with_cpu_eligibility():
    a, b = _random_masks([300] * 6, seed=0), _random_masks([300] * 6, seed=1)
    eligible = {k: torch.ones_like(v) for k, v in a.items()}
    ref = overlap_analysis(a, b, eligible=eligible)
    gpu = overlap_analysis({k: v.cuda() for k, v in a.items()}, b, eligible=eligible)
    assert gpu.to_dict() == ref.to_dict()


def test_mismatched_masks_raise():
    a = _random_masks([10] * 6)
    b = dict(a)
    b.pop(NAMES[0])
    with pytest.raises(MaskError, match="only in A"):
        overlap_analysis(a, b)
    b = dict(a)
    b[NAMES[1]] = torch.zeros(3000, dtype=torch.bool)
    with pytest.raises(MaskError, match="shape"):
        overlap_analysis(a, b)


def test_figures():
    a, b = _random_masks([300] * 6, seed=0), _random_masks([300] * 6, seed=1)
    res = overlap_analysis(a, b, label_a="bigram", label_b="optimal")
    fig = plot_overlap([res, overlap_analysis(a, random_masks(b), label_a="bigram",
                                              label_b="random")])
    assert [t.name for t in fig.data] == ["observed", "expected (null)"]
    assert list(fig.data[0].x) == ["bigram ∩ optimal", "bigram ∩ random"]
    assert "x, p=" in fig.data[0].text[0]
    blocks = plot_overlap_blocks(res)
    assert list(blocks.data[0].x)[:2] == ["layer 0 Q", "layer 0 V"]
    layers = plot_overlap_layers(res)
    assert list(layers.data[0].x) == ["layer 0", "layer 1"]
    assert list(layers.data[0].y) == pytest.approx([lo.ratio for lo in res.layers])
    assert layers.layout.yaxis.type == "log"
