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
    shuffle_masks,
)
from interp.errors import MaskError

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
    results = [overlap_analysis(shuffle_masks(base_a, seed=2 * i),
                                shuffle_masks(base_b, seed=2 * i + 1)) for i in range(1000)]
    p = np.array([r.p_value for r in results])
    mid = np.array([r.mid_p_value for r in results])
    p_eq = 2 * (p - mid)
    randomized = p - p_eq + np.random.default_rng(0).uniform(size=p.size) * p_eq
    assert stats.kstest(randomized, "uniform").pvalue > 0.01
    assert 0.03 <= (mid < 0.05).mean() <= 0.07  # binomial sd 0.007
    assert np.all(p >= mid) and (p < 0.05).mean() <= 0.07


def test_shuffle_masks_keeps_counts_per_block():
    a = _random_masks([600, 300, 900, 750, 450, 0])
    eligible = {k: torch.ones_like(v) for k, v in a.items()}
    eligible[NAMES[0]][:, 50:] = False
    s = shuffle_masks(a, seed=3, eligible=eligible)
    for k in NAMES:
        assert s[k].shape == a[k].shape
        assert int(s[k].sum()) == int((a[k] & eligible[k]).sum())
    assert not s[NAMES[0]][:, 50:].any()
    assert not torch.equal(s[NAMES[2]], a[NAMES[2]])
    assert all(torch.equal(s[k], shuffle_masks(a, seed=3, eligible=eligible)[k]) for k in NAMES)


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
    fig = plot_overlap([res, overlap_analysis(a, shuffle_masks(b), label_a="bigram",
                                              label_b="random")])
    assert [t.name for t in fig.data] == ["observed", "expected (null)"]
    assert list(fig.data[0].x) == ["bigram ∩ optimal", "bigram ∩ random"]
    assert "x, p=" in fig.data[0].text[0]
    blocks = plot_overlap_blocks(res)
    assert list(blocks.data[0].x)[:2] == ["L0 q", "L0 v"]
