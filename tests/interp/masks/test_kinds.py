"""Mask kinds: values, gradients, schedules, hard-concrete limits, expected L0, configs."""

from __future__ import annotations

import json
import math

import pytest
import torch

from interp.errors import MaskError
from interp.masks.kinds import ContinuousSparsification, HardConcrete, MaskKind, kind_from_config

# --------------------------------------------------------------------------- continuous


def test_continuous_init_and_values():
    cs = ContinuousSparsification()
    logits = cs.init_logits((3, 4))
    assert logits.shape == (3, 4) and logits.dtype == torch.float32
    assert torch.all(logits == 0.0)
    assert torch.allclose(cs.soft(logits), torch.full((3, 4), 0.5))
    s = torch.tensor([-2.0, -1e-4, 0.0, 1e-4, 3.0])
    assert cs.hard(s).tolist() == [False, False, False, True, True]
    assert torch.allclose(cs.soft(s), torch.sigmoid(s))
    assert torch.equal(cs.expected(s), cs.soft(s))


def test_continuous_temperature_schedule():
    cs = ContinuousSparsification(temperature_factor=1.01)
    s = torch.tensor([0.5, -0.5])
    before = cs.soft(s)
    for _ in range(100):
        cs.step()
    assert cs.temperature == pytest.approx(1.01**100)
    assert cs.steps == 100
    after = cs.soft(s)
    assert torch.allclose(after, torch.sigmoid(1.01**100 * s))
    # a higher temperature pushes soft masks towards the hard mask
    assert after[0] > before[0] and after[1] < before[1]


def test_continuous_gradient():
    cs = ContinuousSparsification(temperature=2.0)
    s = torch.tensor([0.0, 1.0], requires_grad=True)
    cs.soft(s).sum().backward()
    sig = torch.sigmoid(2.0 * s.detach())
    assert torch.allclose(s.grad, 2.0 * sig * (1 - sig))


def test_continuous_rejects_bad_temperature():
    with pytest.raises(MaskError):
        ContinuousSparsification(temperature=0.0)


# --------------------------------------------------------------------------- hard concrete


def test_hard_concrete_stretch_limits_and_exact_zeros_ones():
    hc = HardConcrete()
    big = torch.tensor([-50.0, 50.0])
    assert hc.soft(big, sample=False).tolist() == [0.0, 1.0]
    torch.manual_seed(0)
    x = hc.soft(torch.zeros(100_000), sample=True)
    assert x.min() >= 0.0 and x.max() <= 1.0
    # stretching puts positive mass exactly on 0 and 1
    assert (x == 0).float().mean() > 0.01 and (x == 1).float().mean() > 0.01
    # deterministic gate at log_alpha = 0 sits in the middle of the stretched interval
    assert hc.soft(torch.zeros(1), sample=False).item() == pytest.approx(0.5)


def test_hard_concrete_training_flag_controls_sampling():
    hc = HardConcrete()
    la = torch.zeros(1000)
    torch.manual_seed(0)
    assert not torch.equal(hc.soft(la), hc.soft(la))  # training: sampled
    hc.eval()
    assert torch.equal(hc.soft(la), hc.soft(la))
    assert hc.train() is hc and hc.training


@pytest.mark.parametrize("log_alpha", [-3.0, -1.0, 0.0, 0.7, 2.5])
def test_hard_concrete_expected_l0_matches_monte_carlo(log_alpha):
    hc = HardConcrete()
    torch.manual_seed(1)
    la = torch.full((400_000,), log_alpha)
    mc = (hc.soft(la, sample=True) > 0).float().mean().item()
    assert hc.expected(la[:1]).item() == pytest.approx(mc, abs=3e-3)


def test_hard_concrete_gradients_flow_through_sample_and_penalty():
    hc = HardConcrete()
    la = torch.zeros(64, requires_grad=True)
    torch.manual_seed(0)
    (hc.soft(la).sum() + hc.expected(la).sum()).backward()
    assert la.grad is not None and torch.all(torch.isfinite(la.grad))
    assert torch.all(la.grad > 0)  # the penalty term alone gives every element a push


def test_hard_concrete_hard_and_init_keep():
    hc = HardConcrete(init_keep=0.9, init_std=0.0)
    la = hc.init_logits((10,))
    torch.manual_seed(0)
    samples = hc.soft(la.expand(200_000, 10), sample=True)
    assert (samples > 0.5).float().mean().item() == pytest.approx(0.9, abs=3e-3)
    assert hc.hard(torch.tensor([-0.01, 0.01])).tolist() == [False, True]
    g = torch.Generator().manual_seed(3)
    a, b = HardConcrete().init_logits((5, 5), g), HardConcrete().init_logits((5, 5), g)
    assert not torch.equal(a, b)
    g.manual_seed(3)
    assert torch.equal(HardConcrete().init_logits((5, 5), g), a)


def test_hard_concrete_rejects_bad_stretch():
    with pytest.raises(MaskError):
        HardConcrete(gamma=0.1)
    with pytest.raises(MaskError):
        HardConcrete(init_keep=1.0)


# --------------------------------------------------------------------------- configs


@pytest.mark.parametrize(
    "kind", [ContinuousSparsification(init=0.1, temperature_factor=1.005), HardConcrete(beta=0.5)]
)
def test_config_round_trip_through_json(kind: MaskKind):
    kind.step()
    kind.step()
    cfg = json.loads(json.dumps(kind.config()))
    back = kind_from_config(cfg)
    assert type(back) is type(kind)
    assert back.config() == kind.config()
    assert back.temperature == kind.temperature
    assert type(kind).from_config(cfg).config() == kind.config()
    s = torch.linspace(-2, 2, 9)
    assert torch.equal(back.hard(s), kind.hard(s))
    assert torch.allclose(back.expected(s), kind.expected(s))


def test_restored_schedule_continues():
    cs = ContinuousSparsification(temperature_factor=1.1)
    for _ in range(3):
        cs.step()
    back = kind_from_config(cs.config())
    back.step()
    assert back.temperature == pytest.approx(1.1**4) and back.steps == 4


def test_unknown_kind_suggests():
    with pytest.raises(MaskError, match="hard_concrete"):
        kind_from_config({"name": "hard_concret"})
    with pytest.raises(MaskError):
        ContinuousSparsification.from_config({"name": "hard_concrete"})
    with pytest.raises(MaskError):
        ContinuousSparsification.from_config({"name": "continuous", "bogus": 1})


def test_repr_names_parameters():
    assert "temperature_factor=1.001" in repr(ContinuousSparsification())
    assert math.isclose(HardConcrete().temperature, 2 / 3)


def test_restore_in_place_resets_schedule():
    cs = ContinuousSparsification(temperature_factor=2.0)
    start = cs.config()
    holder = [cs]
    cs.step()
    cs.step()
    cs.restore(start)
    assert holder[0].temperature == 1.0 and holder[0].steps == 0
    with pytest.raises(MaskError):
        cs.restore(HardConcrete().config())


def test_keep_probability():
    cs = ContinuousSparsification(temperature=3.0)
    s = torch.linspace(-2, 2, 7)
    assert torch.equal(cs.keep_probability(s), cs.soft(s))
    hc = HardConcrete(init_std=0.0)
    la = hc.init_logits((4,))
    # at init the keep probability is init_keep, although the deterministic gate is ~0.98
    assert torch.allclose(hc.keep_probability(la), torch.full((4,), 0.9))
    assert hc.soft(la, sample=False)[0] > 0.95
    torch.manual_seed(0)
    for v in (-2.0, 0.5, 3.0):
        x = torch.full((200_000,), v)
        mc = (hc.soft(x, sample=True) > 0.5).float().mean().item()
        assert hc.keep_probability(x[:1]).item() == pytest.approx(mc, abs=4e-3)


def test_reuse_shares_soft_mask_and_gradients():
    cs = ContinuousSparsification(temperature=2.0)
    s = torch.randn(50, requires_grad=True)
    w = torch.randn(50)
    ref = (w * cs.soft(s)).pow(2).sum() + cs.expected(s).sum()
    (g_ref,) = torch.autograd.grad(ref, s)
    with cs.reuse():
        a = cs.soft(s)
        assert cs.expected(s) is a and cs.soft(s) is a
        out = (w * a).pow(2).sum() + cs.expected(s).sum()
    (g,) = torch.autograd.grad(out, s)
    assert torch.allclose(out, ref) and torch.allclose(g, g_ref)
    assert "_memo" not in cs.__dict__ and cs.soft(s) is not cs.soft(s)
    with cs.reuse():
        a = cs.soft(s)
        cs.step()  # a new temperature is a new mask
        assert not torch.equal(cs.soft(s), a)
        with torch.no_grad():
            s.add_(1.0)  # in-place update bumps the version
        assert cs.soft(s) is not a


def test_reuse_leaves_hard_concrete_sampling_alone():
    hc = HardConcrete()
    la = torch.zeros(100)
    with hc.reuse():
        assert not torch.equal(hc.soft(la), hc.soft(la))
