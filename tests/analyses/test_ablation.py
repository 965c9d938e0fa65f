"""Necessity (loss without a subnetwork) and generations with and without it."""

from __future__ import annotations

import plotly.graph_objects as go
import pytest
import torch

from analyses.ablation import (
    GenerationResult,
    NecessityResult,
    generate,
    generations,
    necessity,
    plot_necessity,
)
from interp.errors import InterpError
from interp.models.lm import lm_loss


def _batches(model, n=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, model.cfg.d_vocab, (3, 16), generator=gen) for _ in range(n)]


@torch.no_grad()
def _loss_with_weights_zeroed(model, batches, maskset) -> float:
    """By hand: the mean loss with every weight of ``maskset``'s subnetwork set to zero in
    the model's own parameters (restored afterwards)."""
    hard = maskset.hard_masks()
    saved = {}
    try:
        for name, keep in hard.items():
            weight = maskset.target(name).original
            saved[name] = weight.clone()
            weight.mul_(~keep)
        return sum(float(lm_loss(model(b), b)) for b in batches) / len(batches)
    finally:
        for name, w in saved.items():
            maskset.target(name).original.copy_(w)


def test_removing_an_empty_subnetwork_is_the_full_model(native_model):
    from interp.masks import MaskSet

    batches = _batches(native_model)
    full_ms = MaskSet.full(native_model)
    res = necessity(native_model, batches,
                    {"empty": MaskSet.empty(native_model), "everything": full_ms,
                     "random": full_ms.random_like(seed=3)}, progress=False)
    with torch.no_grad():
        expected = sum(float(lm_loss(native_model(b), b)) for b in batches) / len(batches)
    assert res.loss_full == pytest.approx(expected, rel=1e-6)
    # removing nothing multiplies every weight by exactly 1: the same numbers, bit for bit
    assert res.losses["empty"] == res.loss_full and res.increase["empty"] == 0.0
    # removing everything is zeroing every attention and MLP matrix by hand
    zeroed = _loss_with_weights_zeroed(native_model, batches, full_ms)
    assert res.losses["everything"] == pytest.approx(zeroed, rel=1e-6)
    assert res.increase["everything"] == pytest.approx(zeroed - expected, rel=1e-5)
    # ... which leaves a model of the current token alone (embeddings, biases, unembedding):
    # each position's logits are those of the token run on its own
    b = batches[0]
    with full_ms.applied(native_model, mode="ablate"), torch.no_grad():
        logits = native_model(b)
        alone = torch.cat([native_model(b[:, p:p + 1]) for p in range(b.shape[1])], dim=1)
    torch.testing.assert_close(logits, alone, atol=1e-5, rtol=0)
    with torch.no_grad():  # the full model is not: context changes its logits
        assert not torch.allclose(native_model(b)[:, 1:], native_model(b[:, 1:2])[:, :1])
    # removing everything leaves the embeddings-only model, whatever was "random" about it
    assert res.losses["random"] == pytest.approx(res.losses["everything"], rel=1e-6)
    assert res.n_removed["empty"] == 0
    assert res.n_removed["everything"] == res.n_removed["random"] == full_ms.n_weights
    assert res.n_tokens == 2 * 3 * 15
    back = NecessityResult.from_json(res.to_json())
    assert back.losses == res.losses and back.n_removed == res.n_removed
    fig = plot_necessity(res)
    assert isinstance(fig, go.Figure) and next(iter(fig.data[0].x)) == "full model"


def test_random_control_keeps_counts_per_block(native_model):
    from interp.masks import MaskSet

    ms = MaskSet.for_model(native_model, seed=0)
    with torch.no_grad():  # a partial subnetwork: keep the first row of every target
        for lg in ms.logits.values():
            lg.fill_(-10.0)
            lg[0].fill_(10.0)
    rnd = ms.random_like(seed=1)
    res = necessity(native_model, _batches(native_model, 1), {"bigram": ms, "random": rnd},
                    progress=False)
    assert res.n_removed["bigram"] == res.n_removed["random"] > 0
    # same count in every weight matrix, different weights
    hard, hard_rnd = ms.hard_masks(), rnd.hard_masks()
    assert {n: int(m.sum()) for n, m in hard.items()} == {n: int(m.sum()) for n, m in
                                                          hard_rnd.items()}
    assert all(int(m.sum()) == m.shape[1] for m in hard.values())  # one row per matrix
    assert any(not torch.equal(hard[n], hard_rnd[n]) for n in hard)
    # each loss is that of the model with exactly those weights zeroed by hand
    batches = _batches(native_model, 1)
    for name, mask in (("bigram", ms), ("random", rnd)):
        assert res.losses[name] == pytest.approx(
            _loss_with_weights_zeroed(native_model, batches, mask), rel=1e-6), name


def test_loss_is_token_weighted_over_batches_of_different_sizes(native_model):
    """Batches may differ in size and length (a last short batch); each prediction counts
    once. Repeated calls: the run-time type check samples one batch per check."""
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, native_model.cfg.d_vocab, shape, generator=gen)
               for shape in [(3, 16), (1, 5), (2, 9)]]
    n = [b[:, 1:].numel() for b in batches]
    with torch.no_grad():
        losses = [float(lm_loss(native_model(b), b)) for b in batches]
    expected = sum(x * k for x, k in zip(losses, n)) / sum(n)
    assert expected != pytest.approx(sum(losses) / 3, rel=1e-3)  # weighting matters here
    from interp.masks import MaskSet

    empty = MaskSet.empty(native_model)
    for i in range(8):
        order = batches[i % 3:] + batches[:i % 3]
        res = necessity(native_model, order, {"empty": empty}, progress=False)
        assert res.n_tokens == sum(n) == 45 + 4 + 16
        assert res.loss_full == pytest.approx(expected, rel=1e-6)
        assert res.losses["empty"] == res.loss_full


def test_attached_maskset_is_refused(native_model):
    from interp.masks import MaskSet

    ms = MaskSet.empty(native_model)
    with ms.applied(native_model, mode="keep"), pytest.raises(InterpError, match="detach"):
        necessity(native_model, _batches(native_model, 1), {"x": ms}, progress=False)


def test_greedy_generation_is_argmax_loop(native_model):
    prompt = torch.tensor([[1, 2, 3]])
    out = generate(native_model, prompt, 5)
    tokens = prompt.clone()
    with torch.no_grad():
        for _ in range(5):
            tokens = torch.cat([tokens, native_model(tokens)[:, -1].argmax(-1, keepdim=True)], 1)
    assert out == tokens[0, 3:].tolist()
    a = generate(native_model, prompt, 8, temperature=0.3, seed=1)
    assert a == generate(native_model, prompt, 8, temperature=0.3, seed=1)
    with pytest.raises(InterpError, match="temperature"):
        generate(native_model, prompt, 1, temperature=-1)


def test_generations_with_and_without_subnetworks(native_model):
    from interp.masks import MaskSet

    res = generations(native_model, "When shall we", {"empty": MaskSet.empty(native_model),
                                                      "all": MaskSet.full(native_model)},
                      max_new_tokens=6, seed=0)
    keys = {f"{n}, {d}" for n in ("full", "without empty", "without all")
            for d in ("greedy", "T=0.3")}
    assert set(res.texts) == keys
    # removing nothing changes nothing
    assert res.tokens["without empty, greedy"] == res.tokens["full, greedy"]
    assert res.tokens["without empty, T=0.3"] == res.tokens["full, T=0.3"]
    assert all(t.startswith(res.prompt) for t in res.texts.values())
    assert all(0 < f <= 1 for f in res.distinct_fraction.values())
    assert GenerationResult.from_json(res.to_json()).texts == res.texts
    keep = generations(native_model, torch.tensor([[5, 6]]), {"all": MaskSet.full(native_model)},
                       max_new_tokens=4, temperatures=(0.0,), modes=("keep",))
    assert keep.tokens["all only, greedy"] == keep.tokens["full, greedy"]
