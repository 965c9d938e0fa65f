"""Objectives for fit_masks: values against closed forms, gradients, teacher with masks off."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from interp.data.bigram import BigramCounts, sample_markov_chain
from interp.errors import InterpError
from interp.models.lm import lm_loss
from interp.objectives import (
    BigramObjective,
    LMObjective,
    SelfDistillationObjective,
    soft_target_ce,
)


class _TableLM(nn.Module):
    """A 'model' whose logits at each position are a fixed row per current token."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = nn.Parameter(table.clone())

    def forward(self, tokens):
        return self.table[tokens]


def _markov_stream(V=10, n=20_000, seed=0):
    gen = torch.Generator().manual_seed(seed)
    truth = torch.rand(V, V, generator=gen, dtype=torch.float64) ** 2
    truth /= truth.sum(-1, keepdim=True)
    return sample_markov_chain(truth, 1, n, seed=seed).view(-1)


def test_bigram_objective_of_log_bigram_model_is_conditional_entropy():
    stream = _markov_stream()
    counts = BigramCounts.from_tokens(stream, 10)
    model = _TableLM(counts.to_dense().log().float().clamp_min(-1e9))
    batch = stream[:-1].unsqueeze(0)  # the contexts of exactly the counted pairs
    for method in ("sparse", "dense"):
        loss = BigramObjective(counts, method=method)(model, batch)
        assert math.isclose(loss.item(), counts.entropy(), rel_tol=1e-5)


def test_bigram_objective_gradient_is_softmax_minus_target():
    counts = BigramCounts.from_tokens(_markov_stream(seed=1), 10)
    model = _TableLM(torch.zeros(10, 10))
    batch = torch.arange(10).unsqueeze(0)
    BigramObjective(counts)(model, batch).backward()
    expected = (torch.full((10, 10), 0.1) - counts.to_dense().float()) / 10
    torch.testing.assert_close(model.table.grad, expected, atol=1e-6, rtol=1e-5)


def test_bigram_objective_config_is_json_metadata(unchecked):
    counts = BigramCounts.from_tokens(_markov_stream(seed=2), 10, separator=0,
                                      meta={"corpus": "markov"})
    cfg = BigramObjective(counts.smoothed(0.01)).config()
    assert cfg == {"objective": "bigram", "vocab_size": 10, "n_pairs": counts.n_pairs,
                   "nnz": counts.nnz, "separator": 0, "interpolate": 0.01,
                   "counts_meta": {"corpus": "markov"}}
    assert BigramObjective(counts).name == "bigram"
    with unchecked(), pytest.raises(InterpError, match="from_tokens"):
        BigramObjective({"not": "counts"})  # ill-typed on purpose: the library's own check


def test_lm_objective_equals_lm_loss(native_model):
    tokens = torch.randint(0, native_model.cfg.d_vocab, (2, 16), generator=torch.Generator().manual_seed(0))
    obj = LMObjective()
    torch.testing.assert_close(obj(native_model, tokens), lm_loss(native_model(tokens), tokens))
    assert obj(native_model, {"tokens": tokens}).item() == obj(native_model, tokens).item()
    assert obj.config() == {"objective": "lm"} and obj.name == "lm"


def test_self_distillation_with_precomputed_teacher():
    logits = torch.randn(2, 5, 7, generator=torch.Generator().manual_seed(0))
    model = _TableLM(torch.zeros(7, 7))
    tokens = torch.randint(0, 7, (2, 5))
    obj = SelfDistillationObjective()
    # a uniform student: CE to any teacher is log V
    assert math.isclose(obj(model, (tokens, logits)).item(), math.log(7), rel_tol=1e-6)
    # CE of a distribution to itself is its entropy
    p = torch.softmax(logits, -1)
    entropy = float(-(p * p.log()).sum(-1).mean())
    assert math.isclose(float(soft_target_ce(logits, logits).mean()), entropy, rel_tol=1e-6)
    with pytest.raises(InterpError, match="teacher_logits"):
        obj(model, tokens)


class _ScaleMask:
    """A stand-in for MaskSet's `using`: a parametrization multiplying a weight by a mask."""

    class _Param(nn.Module):
        def __init__(self, owner):
            super().__init__()
            self.owner = owner

        def forward(self, w):
            return w if self.owner.mode == "off" else w * torch.sigmoid(self.owner.logits)

    def __init__(self, module: nn.Linear):
        self.mode = "soft"
        self.logits = nn.Parameter(torch.zeros_like(module.weight))
        parametrize.register_parametrization(module, "weight", self._Param(self))

    def using(self, mode):
        import contextlib

        @contextlib.contextmanager
        def ctx():
            old, self.mode = self.mode, mode
            try:
                yield
            finally:
                self.mode = old

        return ctx()


def test_self_distillation_teacher_is_unmasked_and_student_gets_gradient():
    torch.manual_seed(0)
    emb, lin = nn.Embedding(6, 8), nn.Linear(8, 6)
    model = nn.Sequential(emb, lin)
    for p in model.parameters():
        p.requires_grad_(False)
    plain = model(torch.arange(6)).detach()
    ms = _ScaleMask(lin)
    obj = SelfDistillationObjective(ms)
    tokens = torch.arange(6).view(2, 3)
    # (Under parametrize.cached(), MaskSet's mode switch clears the cache: see the next test.)
    teacher = obj.teacher_logits(model, tokens)
    loss = obj(model, tokens)
    loss.backward()
    torch.testing.assert_close(teacher, plain[tokens])
    assert ms.mode == "soft"
    assert loss.item() > float(soft_target_ce(teacher, teacher).mean()) + 1e-4
    assert ms.logits.grad is not None and float(ms.logits.grad.abs().sum()) > 0


def test_self_distillation_with_real_maskset(native_model):
    pytest.importorskip("interp.masks.maskset")
    from interp.masks import MaskSet

    tokens = torch.randint(0, native_model.cfg.d_vocab, (2, 16),
                           generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = native_model(tokens)
    ms = MaskSet.for_model(native_model, seed=0)
    obj = SelfDistillationObjective(ms)
    with ms.applied(native_model, mode="soft"):
        for p in native_model.parameters():
            p.requires_grad_(False)
        with parametrize.cached():
            teacher = obj.teacher_logits(native_model, tokens)
            loss = obj(native_model, tokens)
            loss.backward()
        assert ms.mode == "soft"
    torch.testing.assert_close(teacher, plain, atol=1e-5, rtol=1e-5)
    assert loss.item() > float(soft_target_ce(plain, plain).mean())
    grads = [p.grad for p in ms.parameters()]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0


@pytest.mark.parametrize("which", ["bigram", "self_distillation"])
def test_objectives_train_masks_with_fit_masks(native_model, which):
    """Both objectives drive fit_masks (inside parametrize.cached) and lower their loss."""
    from interp.masks import MaskSet, fit_masks

    V = native_model.cfg.d_vocab
    gen = torch.Generator().manual_seed(0)
    stream = torch.randint(0, V, (4000,), generator=gen)
    batches = [stream[i : i + 64].view(2, 32) for i in range(0, 640, 64)]
    ms = MaskSet.for_model(native_model, seed=0)
    objective = (BigramObjective(BigramCounts.from_tokens(stream, V)) if which == "bigram"
                 else SelfDistillationObjective(ms))
    res = fit_masks(native_model, ms, objective, batches, lam=0.0, lr=0.05, max_steps=12,
                    stop_rule=False, progress=False)
    losses = [h["task_loss"] for h in res.history]
    assert len(losses) == 12 and all(math.isfinite(x) for x in losses)
    assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 1e-3
