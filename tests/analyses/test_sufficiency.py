"""Sufficiency: streaming Pearson against brute force, and evaluation checked against a truth."""

from __future__ import annotations

import math

import numpy as np
import plotly.graph_objects as go
import pytest
import torch
from torch import nn

from analyses.sufficiency import (
    SufficiencyResult,
    _Pearson,
    model_surprisal,
    pearson,
    plot_sufficiency,
    sufficiency,
)
from interp.data.bigram import BigramCounts, sample_markov_chain
from interp.errors import InterpError


class _TableLM(nn.Module):
    """Logits at each position depend on the current token only (a bigram 'network')."""

    def __init__(self, log_probs: torch.Tensor):
        super().__init__()
        self.table = nn.Parameter(log_probs.float().clamp_min(-1e9), requires_grad=False)

    def forward(self, tokens):
        return self.table[tokens]


def _chain(V=12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    truth = torch.rand(V, V, generator=gen, dtype=torch.float64) ** 3
    truth[truth < 0.02] = 0.0
    return truth / truth.sum(-1, keepdim=True)


@pytest.fixture(scope="module")
def markov():
    truth = _chain()
    train = sample_markov_chain(truth, 400, 128, seed=1)
    held_out = sample_markov_chain(truth, 64, 64, seed=2)
    return truth, BigramCounts.from_tokens(train, truth.shape[0]), list(held_out.split(16))


def test_streaming_pearson_matches_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(5.0, 2.0, 1000)
    y = 0.3 * x + rng.normal(0, 1, 1000)
    acc = _Pearson()
    for lo, hi in [(0, 1), (1, 300), (300, 300), (300, 999), (999, 1000)]:
        acc.update(torch.from_numpy(x[lo:hi]), torch.from_numpy(y[lo:hi]))
    assert acc.r == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-12)
    assert math.isnan(pearson(torch.ones(5), torch.arange(5.0)))


def test_true_chain_surprisal_correlates_with_estimated_bigram(markov):
    """The evaluation against truth: the true chain is a bigram model, so r must be near 1."""
    truth, counts, batches = markov
    res = sufficiency(_TableLM(truth.log()), counts, batches, progress=False)
    assert res.surprisal_r > 0.99
    assert res.surprisal_r_smoothed > 0.98
    assert res.n_tokens == 64 * 63 and res.finite_fraction > 0.99
    assert 0 <= res.kl_to_bigram < 0.02
    # the true chain's loss is its conditional entropy under the stationary token mix
    h_true = -(torch.where(truth > 0, truth * truth.log(), 0.0)).sum(-1)
    tokens = torch.cat(batches)
    assert res.mean_surprisal == pytest.approx(float(h_true[tokens[:, :-1]].mean()), abs=0.05)


def test_bigram_model_itself_is_perfectly_sufficient(markov):
    _, counts, batches = markov
    res = sufficiency(_TableLM(counts.to_dense().log()), counts, batches, progress=False)
    assert res.surprisal_r == pytest.approx(1.0, abs=1e-9)
    assert res.kl_to_bigram == pytest.approx(0.0, abs=1e-5)


def test_matches_brute_force_on_a_random_network(markov):
    _truth, counts, batches = markov
    torch.manual_seed(0)
    model = _TableLM(torch.randn(12, 12))
    res = sufficiency(model, counts, batches, n_sample=50, progress=False)
    tokens = torch.cat(batches)
    s_model = model_surprisal(model(tokens), tokens).numpy().ravel()
    s_big = counts.surprisal(tokens).numpy().ravel()
    seen = counts.seen(tokens).numpy().ravel()
    finite = np.isfinite(s_big)
    smooth = counts.smoothed(0.01).surprisal(tokens).numpy().ravel()
    assert res.surprisal_r == pytest.approx(
        np.corrcoef(s_model[finite], s_big[finite])[0, 1], abs=1e-9)
    capped = np.where(finite, s_big, s_big[finite].max())
    assert res.surprisal_r_capped == pytest.approx(np.corrcoef(s_model, capped)[0, 1], abs=1e-9)
    assert res.surprisal_r_smoothed == pytest.approx(np.corrcoef(s_model, smooth)[0, 1], abs=1e-9)
    ce = counts.soft_cross_entropy(model(tokens), tokens).mean()
    assert res.ce_to_bigram == pytest.approx(float(ce), rel=1e-5)
    assert res.n_seen == int(seen.sum()) and res.n_finite == int(finite.sum())
    assert res.mean_surprisal == pytest.approx(s_model.mean())
    np.testing.assert_allclose(res.sample_model, s_model[finite][:50])
    back = SufficiencyResult.from_json(res.to_json())
    assert back.surprisal_r == res.surprisal_r and back.sample_bigram == res.sample_bigram
    fig = plot_sufficiency({"random": res})
    assert isinstance(fig, go.Figure) and len(fig.data) == 2


def test_variants_follow_the_papers_definitions():
    """Drop-infinite keeps unseen contexts (finite unigram back-off) and drops only seen
    contexts followed by a token they never preceded; capped scores those at the largest
    finite surprisal."""
    # contexts 0, 1, 2 seen; token 3 is never a context; pair (0, 2) never seen
    train = torch.tensor([0, 1, 0, 1, 2, 0, 1, 2, 2, 3])
    counts = BigramCounts.from_tokens(train, 4)
    held = torch.tensor([[3, 1, 0, 2, 0, 1]])  # (3,1) backs off, (0,2) is infinite
    s_big = counts.surprisal(held)[0]
    assert torch.isfinite(s_big[0]) and not counts.seen(held)[0, 0]
    assert torch.isinf(s_big[2])
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0], [2.0, 0.0, 1.0, 0.0], [0.5, 0.1, 0.0, 2.0],
                           [1.0, 1.0, 1.0, 0.0]])
    res = sufficiency(_TableLM(logits), counts, [held], progress=False)
    s_model = model_surprisal(logits[held], held)[0].numpy()
    big = s_big.numpy()
    keep = np.isfinite(big)
    assert res.n_tokens == 5 and res.n_finite == 4 and res.n_seen == 3
    assert res.surprisal_r == pytest.approx(np.corrcoef(s_model[keep], big[keep])[0, 1], abs=1e-12)
    capped = np.where(keep, big, big[keep].max())
    assert res.cap == pytest.approx(big[keep].max())
    assert res.surprisal_r_capped == pytest.approx(np.corrcoef(s_model, capped)[0, 1], abs=1e-12)
    assert res.headline == "drop_infinite"


def test_refuses_interpolated_counts_and_empty_input(markov):
    _, counts, batches = markov
    with pytest.raises(InterpError, match="interpolate=0"):
        sufficiency(_TableLM(torch.zeros(12, 12)), counts.smoothed(0.01), batches, progress=False)
    with pytest.raises(InterpError, match="no batches"):
        sufficiency(_TableLM(torch.zeros(12, 12)), counts, [], progress=False)
    res = sufficiency(_TableLM(torch.zeros(12, 12)), counts, batches[:1], progress=False)
    with pytest.raises(InterpError, match="n_sample"):
        plot_sufficiency({"x": res})


def test_subnetwork_in_keep_mode(native_model):
    from interp.masks import MaskSet

    V = native_model.cfg.d_vocab
    gen = torch.Generator().manual_seed(0)
    train = torch.randint(0, V, (20_000,), generator=gen)
    counts = BigramCounts.from_tokens(train, V)
    batches = [torch.randint(0, V, (4, 16), generator=gen) for _ in range(2)]
    full = sufficiency(native_model, counts, batches, progress=False)
    kept_all = sufficiency(native_model, counts, batches, maskset=MaskSet.full(native_model),
                           progress=False)
    none = sufficiency(native_model, counts, batches, maskset=MaskSet.empty(native_model),
                       progress=False)
    assert kept_all.ce_to_bigram == pytest.approx(full.ce_to_bigram, rel=1e-6)
    assert kept_all.surprisal_r == pytest.approx(full.surprisal_r, abs=1e-6)
    assert none.ce_to_bigram != pytest.approx(full.ce_to_bigram, rel=1e-3)
