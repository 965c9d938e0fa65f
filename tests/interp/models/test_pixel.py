"""Pixel models: causality, exact receptive fields, heads, training with checkpoints."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

from interp.errors import CheckpointError, ConfigError, DataError
from interp.models.checkpoints import CheckpointStore
from interp.models.pixel import (
    FullPixelCNN,
    LocalPixelCNN,
    PixelConfig,
    build_pixel_model,
    pixel_targets,
    receptive_field,
)
from interp.models.pixel_train import PixelTrainConfig, evaluate_bpd, train_pixel_model

SHAPES = [(1, "categorical"), (1, "logistic"), (3, "categorical"), (3, "logistic")]


def _randomise(model, std=0.3, seed=0):
    """Nonzero weights everywhere (the full model's correction starts at zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
        for m in model.modules():
            if hasattr(m, "causal_mask"):
                m.weight.mul_(m.causal_mask)
    return model


def _causal_past(C, H, W, c, i, j):
    """Subpixels strictly before (c, i, j) in raster-then-channel order."""
    past = torch.zeros(C, H, W, dtype=torch.bool)
    past[:, :i] = True
    past[:, i, :j] = True
    past[:c, i, j] = True
    return past


def _horizon_window(C, H, W, c, i, j, h):
    win = torch.zeros(C, H, W, dtype=torch.bool)
    win[:, max(0, i - h):i, max(0, j - h):j + h + 1] = True
    win[:, i, max(0, j - h):j] = True
    win[:c, i, j] = True
    return win


@pytest.mark.parametrize("C,head", SHAPES)
def test_local_receptive_field_is_exactly_the_horizon(C, head):
    h = 2
    model = _randomise(LocalPixelCNN(PixelConfig(channels=C, horizon=h, hidden=6 * C,
                                                 head=head, mixtures=2)))
    H = W = 9
    for c, i, j in [(0, 4, 4), (C - 1, 4, 4), (C - 1, 0, 0), (0, 8, 0), (C - 1, 1, 8)]:
        rf = receptive_field(model, (C, H, W), (c, i, j))
        assert torch.equal(rf, _horizon_window(C, H, W, c, i, j, h)), (c, i, j)


@pytest.mark.parametrize("C,head", SHAPES)
def test_full_receptive_field_is_the_whole_causal_past(C, head):
    model = _randomise(FullPixelCNN(PixelConfig(kind="full", channels=C, horizon=1,
                                                hidden=3 * C, head=head, mixtures=2,
                                                stack_channels=4, dilations=(1, 2, 4))))
    H = W = 8  # reach 1 + 2 + 4 + 1 = 8 pixels back covers the image
    for c, i, j in [(C - 1, 7, 7), (0, 7, 0), (C - 1, 3, 5), (0, 0, 0)]:
        rf = receptive_field(model, (C, H, W), (c, i, j))
        assert torch.equal(rf, _causal_past(C, H, W, c, i, j)), (c, i, j)


@pytest.mark.parametrize("kind", ["local", "full"])
def test_changing_a_pixel_never_changes_itself_or_earlier_predictions(kind):
    torch.manual_seed(0)
    cfg = PixelConfig(kind=kind, channels=3, horizon=1, hidden=6, head="logistic", mixtures=2,
                      stack_channels=4, dilations=(1, 2))
    model = _randomise(build_pixel_model(cfg)).eval()
    x = torch.randint(0, 256, (1, 3, 5, 5), dtype=torch.uint8)
    base = model.log_pmf(x)
    for c, i, j in itertools.product(range(3), range(5), range(5)):
        y = x.clone()
        y[0, c, i, j] = 255 - y[0, c, i, j]
        changed = (model.log_pmf(y) - base).abs().amax(-1)[0] > 0
        order = torch.arange(75).reshape(5, 5, 3).permute(2, 0, 1)  # raster, then channel
        not_after = order <= order[c, i, j]
        assert not changed[not_after].any(), (c, i, j)


def test_full_model_from_local_starts_equal_and_has_hooks():
    local = _randomise(LocalPixelCNN(PixelConfig(hidden=8, head="categorical")))
    full = FullPixelCNN.from_local(local, stack_channels=4, dilations=(1, 2))
    x = torch.randint(0, 256, (2, 1, 6, 6), dtype=torch.uint8)
    assert torch.allclose(full.log_probs(x), local.log_probs(x))
    _, cache = full.run_with_cache(x)
    for name in ("local.hook_in", "local.blocks.0.hook_out", "local.hook_features",
                 "stack.1.hook_v", "stack.1.hook_h", "hook_correction"):
        assert name in cache, name
    assert cache["hook_correction"].abs().max() == 0


@pytest.mark.parametrize("head", ["categorical", "logistic"])
def test_pmf_normalised_and_consistent_with_log_probs(head):
    model = _randomise(LocalPixelCNN(PixelConfig(channels=3, hidden=6, head=head, mixtures=3)),
                       std=0.5)
    x = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    x[0, :, 0, 0], x[0, :, 0, 1] = 0, 255  # the edge bins of the logistic
    pmf = model.pmf(x)
    assert torch.allclose(pmf.sum(-1), torch.ones(()), atol=1e-4)
    picked = pmf.gather(-1, x.long().unsqueeze(-1)).squeeze(-1).log()
    assert torch.allclose(picked, model.log_probs(x), atol=1e-4)
    assert (pmf > 0).all()


def test_bits_per_dim_of_uniform_prediction_is_eight():
    model = LocalPixelCNN(PixelConfig(hidden=4, head="categorical"))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    x = torch.randint(0, 256, (3, 1, 5, 5), dtype=torch.uint8)
    assert torch.allclose(model.bits_per_dim(x), torch.full((3,), 8.0))


def test_pixel_targets_cover_every_kernel_with_positions():
    full = FullPixelCNN(PixelConfig(kind="full", hidden=4, blocks=2, stack_channels=4,
                                    dilations=(1, 2)))
    ts = pixel_targets(full)
    assert {t.block for t in ts} == {"local_in", "local_block", "head", "stack_in", "stack_v",
                                      "stack_h", "stack_v2h", "stack_out", "correction"}
    n_kernels = sum(1 for m in full.modules() if hasattr(m, "causal_mask"))
    assert len(ts) == n_kernels
    conv_in = next(t for t in ts if t.name == "local.conv_in")
    assert not conv_in.nonzero()[:, :, -1, conv_in.shape[-1] // 2:].any()  # masked taps


def test_config_rejects_bad_values():
    with pytest.raises(ConfigError, match="Did you mean"):
        PixelConfig(head="logistc").validate()
    with pytest.raises(ConfigError, match="multiple of channels"):
        PixelConfig(channels=3, hidden=32).validate()
    with pytest.raises(ConfigError):
        PixelConfig(horizon=0).validate()


def _images(n=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randint(0, 256, (n, 1, 1, 1), generator=gen)
    noise = torch.randint(-8, 9, (n, 1, 6, 6), generator=gen)
    return (base + noise).clamp(0, 255).to(torch.uint8)


def test_training_lowers_bpd_and_resumes_identically(tmp_path):
    imgs = _images()
    cfg = PixelTrainConfig(steps=12, batch_size=8, lr=1e-2, eval_every=6, checkpoint_every=4)

    def build():
        torch.manual_seed(0)
        return LocalPixelCNN(PixelConfig(hidden=8, horizon=1, head="logistic", mixtures=2))

    a = build()
    before = evaluate_bpd(a, imgs).mean()
    res = train_pixel_model(a, imgs, imgs[:16], cfg, progress=False)
    assert evaluate_bpd(a, imgs).mean() < before
    assert res.steps == 12 and len(res.history) == 12 and "val_bpd" in res.history[5]

    b = build()
    store = CheckpointStore(tmp_path / "s", identity={"x": 1})
    train_pixel_model(b, imgs, None, cfg, store=store, progress=False, stop_after=5)
    assert store.steps() == [4]  # step 5 was lost with the "crash"
    b2 = build()
    r2 = train_pixel_model(b2, imgs, None, cfg, store=store, progress=False)
    assert r2.resumed_from == 4
    for (n, p), q in zip(a.state_dict().items(), b2.state_dict().values()):
        assert torch.equal(p, q), n


def test_weight_averaging_ends_with_the_ema_and_resumes_identically(tmp_path):
    """ema_decay: the model ends with the exponential moving average of its trajectory
    (computed here by hand from the raw weights after every step), and a run interrupted
    mid-way resumes the same average."""
    imgs, decay = _images(), 0.8
    cfg = PixelTrainConfig(steps=6, batch_size=8, lr=1e-2, checkpoint_every=2)

    def build():
        torch.manual_seed(0)
        return LocalPixelCNN(PixelConfig(hidden=8, horizon=1, head="logistic", mixtures=2))

    raw, trajectory = build(), []
    store = CheckpointStore(tmp_path / "raw", identity={"x": 1})
    for _ in range(cfg.steps):  # one step per call: the raw weights after every step
        train_pixel_model(raw, imgs, None, dataclasses.replace(cfg, checkpoint_every=1),
                          store=store, progress=False, stop_after=1)
        trajectory.append({n: p.detach().clone() for n, p in raw.named_parameters()})
    expected = dict(trajectory[0])
    for w in trajectory[1:]:
        expected = {n: decay * expected[n] + (1 - decay) * w[n] for n in w}

    ema_cfg = dataclasses.replace(cfg, ema_decay=decay)
    a = build()
    train_pixel_model(a, imgs, None, ema_cfg, progress=False)
    for n, p in a.named_parameters():
        torch.testing.assert_close(p.detach(), expected[n], rtol=1e-5, atol=1e-6)
        assert not torch.equal(p.detach(), trajectory[-1][n]), n  # not the raw weights

    store = CheckpointStore(tmp_path / "ema", identity={"x": 2})
    b = build()
    train_pixel_model(b, imgs, None, ema_cfg, store=store, progress=False, stop_after=3)
    b2 = build()
    assert train_pixel_model(b2, imgs, None, ema_cfg, store=store,
                             progress=False).resumed_from == 2
    for (n, p), q in zip(a.state_dict().items(), b2.state_dict().values()):
        assert torch.equal(p, q), n
    b3 = build()  # resuming the finished run changes nothing
    train_pixel_model(b3, imgs, None, ema_cfg, store=store, progress=False)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(),
                                                 b3.state_dict().values()))
    with pytest.raises(CheckpointError, match="holds no averaged weights"):
        store_raw = CheckpointStore(tmp_path / "raw")
        store_raw.load(model=build(), average=torch.optim.swa_utils.AveragedModel(build()))


def test_training_rejects_bad_images(unchecked):
    model = LocalPixelCNN(PixelConfig(hidden=4))
    with unchecked(), pytest.raises(DataError, match="uint8"):
        train_pixel_model(model, torch.rand(4, 1, 5, 5), progress=False)
    with pytest.raises(DataError, match="channels"):
        train_pixel_model(model, torch.zeros(4, 3, 5, 5, dtype=torch.uint8), progress=False)
    with pytest.raises(DataError, match="empty"):
        train_pixel_model(model, torch.zeros(0, 1, 5, 5, dtype=torch.uint8), progress=False)


@pytest.mark.parametrize("head", ["categorical", "logistic"])
def test_sampled_values_follow_the_pmf(head):
    model = _randomise(LocalPixelCNN(PixelConfig(hidden=4, head=head, mixtures=2)), std=0.6)
    x = torch.randint(0, 256, (1, 1, 3, 3), dtype=torch.uint8)
    params = model(x)
    v = model.sample_values(params, 20_000, torch.Generator().manual_seed(0))
    emp = torch.nn.functional.one_hot(v.long(), 256).float().mean(0)
    tv = 0.5 * (emp - model.pmf(x)).abs().sum(-1)
    assert tv.max() < 0.08  # sampling noise at 20k draws over 256 values is about 0.045
    lp = model.log_prob_of(params, v[:5])
    assert torch.allclose(lp, model.pmf(x).log().expand(5, -1, -1, -1, -1, -1).gather(
        -1, v[:5].long().unsqueeze(-1)).squeeze(-1), atol=1e-3)


def test_pixel_match_objective_estimates_the_kl():
    import math

    from interp.objectives import PixelMatchObjective

    teacher = _randomise(LocalPixelCNN(PixelConfig(hidden=4, mixtures=2)), std=0.4, seed=1)
    student = _randomise(LocalPixelCNN(PixelConfig(hidden=4, mixtures=2)), std=0.4, seed=2)
    x = torch.randint(0, 256, (4, 1, 6, 6), dtype=torch.uint8)
    with torch.no_grad():
        lt, lq = teacher.log_pmf(x), student.log_pmf(x)
    exact = float((lt.exp() * (lt - lq)).sum(-1).mean()) / math.log(2)
    with torch.no_grad():
        est = float(PixelMatchObjective(teacher, samples=512)(student, x))
        assert est == pytest.approx(exact, rel=0.1)
        assert float(PixelMatchObjective(teacher, samples=8)(teacher, x)) == 0.0
    cat_t = _randomise(LocalPixelCNN(PixelConfig(hidden=4, head="categorical")), seed=3)
    cat_s = _randomise(LocalPixelCNN(PixelConfig(hidden=4, head="categorical")), seed=4)
    with torch.no_grad():
        lt, lq = cat_t.log_pmf(x), cat_s.log_pmf(x)
    exact = float((lt.exp() * (lt - lq)).sum(-1).mean()) / math.log(2)
    with torch.no_grad():
        assert float(PixelMatchObjective(cat_t)(cat_s, x)) == pytest.approx(exact, rel=1e-4)
