"""Information estimators: rankings on data with known information, an analytic Gaussian case,
normalisation and the teacher rule, feature collection through hooks, validation."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from transformer_lens import HookedRootModule
from transformer_lens.hook_points import HookPoint

from interp.errors import ConfigError, DataError, HookError
from interp.probes.information import (
    CheckpointInformation,
    InformationResult,
    cka,
    collect_features,
    decoder_information,
    information_curve,
    minmax_normalise,
    probe_information,
    select_teacher,
)

SIGMAS = (0.1, 0.5, 1.0, 3.0)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def noisy():
    """X ~ N(0, I_20), Y = argmax of a fixed linear map of X, F_k = X + sigma_k noise, and
    features of pure noise."""
    g = _gen(0)
    n, d = 2000, 20
    x = torch.randn(n, d, generator=g)
    y = (x @ torch.randn(d, 5, generator=g)).argmax(1)
    feats = {f"s{s}": x + s * torch.randn(n, d, generator=g) for s in SIGMAS}
    feats["noise"] = torch.randn(n, d, generator=g)
    result = information_curve(feats, x, y, seed=0, exclude={"noise"})
    return x, y, feats, result


def _strictly_decreasing(values):
    return all(a > b for a, b in zip(values, values[1:]))


def test_estimates_fall_with_noise(noisy):
    x, y, feats, result = noisy
    keys = [f"s{s}" for s in SIGMAS]
    rows = [result.get(k) for k in keys]
    for name in ("i_xf", "r2_x", "cka_xf", "i_yf", "accuracy", "cka_yf"):
        values = [getattr(r, name) for r in rows]
        assert _strictly_decreasing(values), (name, values)
    # linear-kernel CKA ranks the same way
    linear = [cka(feats[k], x, kernel="linear") for k in keys]
    assert _strictly_decreasing(linear), linear
    assert rows[0].i_xf > 1.5 and rows[0].r2_x > 0.98  # sigma 0.1: 0.5 log(101) = 2.3 nats
    assert rows[0].accuracy > 0.9
    assert result.keys == [*keys, "noise"]
    for r in result.checkpoints:
        assert set(r.seconds) == {"decoder", "probe", "cka"}
        assert all(s > 0 for s in r.seconds.values())


def test_pure_noise_features_carry_no_information(noisy):
    _, y, _, result = noisy
    r = result.get("noise")
    assert r.i_yf < 0.1
    # the chosen penalty keeps the probe from over-confidence: CE stays at H(Y) (a fixed
    # l2=1e-4 probe overshoots by 0.03 nats here)
    assert r.ce - r.h_y < 0.02
    majority = float(torch.bincount(y).max()) / len(y)
    assert r.accuracy < majority + 0.05
    assert abs(r.r2_x) < 0.05
    assert r.i_xf < 0.02
    assert r.cka_xf < 0.1 and r.cka_yf < 0.05
    assert r.h_y == pytest.approx(math.log(5), abs=0.1)


def test_standalone_estimators_match_the_curve(noisy):
    x, y, feats, result = noisy
    dec = decoder_information(feats["s0.5"], x, seed=0)
    probe = probe_information(feats["s0.5"], y, seed=0)
    row = result.get("s0.5")
    assert dec.i_xf == pytest.approx(row.i_xf, rel=1e-5)
    assert dec.r2 == pytest.approx(row.r2_x, rel=1e-5)
    assert probe.i_yf == pytest.approx(row.i_yf, rel=1e-4, abs=1e-6)
    assert probe.accuracy == row.accuracy
    assert cka(feats["s0.5"], x) == pytest.approx(row.cka_xf, rel=1e-4)


@pytest.mark.parametrize("s", [0.5, 1.0, 2.0])
def test_decoder_matches_gaussian_information(s):
    """X ~ N(0, 1), F = X + N(0, s^2) per dimension: I = 0.5 log(1 + 1/s^2) nats per dim."""
    g = _gen(1)
    x = torch.randn(4000, 10, generator=g)
    f = x + s * torch.randn(4000, 10, generator=g)
    est = decoder_information(f, x, seed=3)
    truth = 0.5 * math.log(1 + 1 / s**2)
    assert est.i_xf == pytest.approx(truth, rel=0.06, abs=0.01)
    assert est.r2 == pytest.approx(1 / (1 + s**2), abs=0.03)
    assert est.n_dims == 10


def test_mlp_decoder_ranks_and_is_deterministic():
    g = _gen(2)
    x = torch.randn(600, 5, generator=g)
    feats = [x + s * torch.randn(600, 5, generator=g) for s in (0.2, 1.0, 3.0)]
    kw = dict(decoder="mlp", hidden=32, steps=150, lr=1e-2, seed=0)
    est = [decoder_information(f, x, **kw).i_xf for f in feats]
    assert _strictly_decreasing(est), est
    assert est[0] > 1.0
    assert decoder_information(feats[0], x, **kw).i_xf == est[0]


def test_curve_is_deterministic_and_round_trips(noisy):
    x, y, feats, result = noisy
    again = information_curve({k: feats[k] for k in ("s0.1", "s1.0")}, x, y, seed=0)
    for k in ("s0.1", "s1.0"):
        a, b = result.get(k).to_dict(), again.get(k).to_dict()
        for name in ("i_xf", "r2_x", "i_yf", "ce", "accuracy", "cka_xf", "cka_yf"):
            assert a[name] == b[name], name
    back = InformationResult.from_json(result.to_json())
    assert back.keys == result.keys
    assert back.exclude == ["noise"] and back.selected == result.selected
    assert back.get("s1.0").i_xf == result.get("s1.0").i_xf
    assert "checkpoints=5" in repr(result) and "seconds" in repr(result)
    assert len(result.table()) == 5 and "seconds_probe" in result.table()[0]


# --------------------------------------------------------------------------- normalisation


def test_minmax_maps_min_to_0_max_to_1_and_ignores_excluded():
    values = {1: 10.0, 2: 0.0, 3: 4.0, 4: 2.0}
    out = minmax_normalise(values, exclude={1})
    assert out == {1: 2.5, 2: 0.0, 3: 1.0, 4: 0.5}
    moved = minmax_normalise({**values, 1: -7.0}, exclude={1})
    assert {k: moved[k] for k in (2, 3, 4)} == {2: 0.0, 3: 1.0, 4: 0.5}
    full = minmax_normalise(values)
    assert full[1] == 1.0 and full[2] == 0.0 and full[3] == pytest.approx(0.4)
    assert minmax_normalise({"a": 3.0, "b": 3.0}) == {"a": 0.0, "b": 0.0}
    with pytest.raises(ConfigError, match="not checkpoints"):
        minmax_normalise(values, exclude={5})
    with pytest.raises(ConfigError, match="no checkpoint"):
        minmax_normalise({1: 1.0}, exclude={1})


def _constructed_result():
    """Epochs 1 and 3 have outlying I(X;F): they dominate the normalisation unless excluded."""
    i_xf = {1: 5.0, 3: 4.8, 20: 1.0, 40: 1.2, 60: 0.9, 80: 0.7, 100: 0.6}
    i_yf = {1: 0.1, 3: 1.5, 20: 2.0, 40: 2.6, 60: 3.0, 80: 3.2, 100: 3.3}
    rows = [CheckpointInformation(key=k, i_xf=i_xf[k], r2_x=0.5, i_yf=i_yf[k], accuracy=0.5,
                                  ce=1.0, h_y=4.0, cka_xf=i_xf[k] / 10, cka_yf=i_yf[k] / 10,
                                  seconds={"decoder": 0.5, "probe": 0.25, "cka": 1.0})
            for k in i_xf]
    return InformationResult(checkpoints=rows, exclude=[1, 3], setup_seconds=2.0)


def test_select_teacher_follows_the_rule():
    result = _constructed_result()
    choice = select_teacher(result)  # the result's own exclude: {1, 3}
    # over 20..100: norm I(X;F) = (v - 0.6) / 0.6, norm I(Y;F) = (v - 2.0) / 1.3; epoch 40 wins
    assert choice.key == 40
    assert choice.score == pytest.approx(1.0 + 0.6 / 1.3)
    assert choice.seconds == pytest.approx(7 * 0.75)
    key, seconds = choice
    assert (key, seconds) == (40, choice.seconds)
    scores = dict(zip(choice.keys, choice.scores))
    assert scores[1] > scores[40]  # excluded epochs score high but are not candidates
    norm = result.normalised("i_xf")
    assert norm[1] > 1 and norm[40] == 1.0 and norm[100] == 0.0
    # without exclusion, epoch 3's outlying I(X;F) takes it: 0.955 + 0.4375
    assert select_teacher(result, exclude=()).key == 3
    cka_choice = select_teacher(result, method="cka")
    assert cka_choice.key == 40 and cka_choice.seconds == pytest.approx(7 * 1.0 + 2.0)


def test_select_teacher_on_features_picks_the_least_noisy(noisy):
    _, _, _, result = noisy
    assert result.selected == "s0.1"
    assert select_teacher(result).key == "s0.1"
    assert select_teacher(result, method="cka").key == "s0.1"
    assert result.get("s0.1").score == pytest.approx(2.0)
    assert result.get("s3.0").i_xf_norm == 0.0
    assert result.get("noise").i_yf_norm < 0  # excluded, normalised with the others' range


# --------------------------------------------------------------------------- collection


class TinyNet(HookedRootModule):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.hook_mid = HookPoint()
        self.out = nn.Linear(8, 3)
        self.setup()

    def forward(self, x):
        return self.out(torch.relu(self.hook_mid(self.inp(x))))


@pytest.mark.parametrize("shape", [(37, 4), (23, 5, 4)])
def test_collect_features_matches_run_with_cache(shape):
    torch.manual_seed(0)
    model = TinyNet()
    model.train()
    inputs = torch.randn(*shape)
    feats = collect_features(model, inputs, "hook_mid", batch_size=10)
    width = 8 * (shape[1] if len(shape) == 3 else 1)
    assert feats.shape == (shape[0], width)
    _, cache = model.run_with_cache(inputs)
    torch.testing.assert_close(feats, cache["hook_mid"].reshape(shape[0], -1))
    assert model.training  # mode restored
    assert not model.hook_mid._forward_hooks  # no hook left behind
    assert not feats.requires_grad


def test_collect_features_conv_hook(conv_net):
    x = torch.randn(6, 1, 5, 5)
    feats = collect_features(conv_net, x, "hook_conv", batch_size=4)
    assert feats.shape == (6, 4 * 3 * 3)
    _, cache = conv_net.run_with_cache(x)
    torch.testing.assert_close(feats, cache["hook_conv"].flatten(1))


def test_unknown_hook_suggests_names():
    with pytest.raises(HookError, match="hook_mid"):
        collect_features(TinyNet(), torch.randn(3, 4), "hook_mdi")


# --------------------------------------------------------------------------- validation


def test_validation_errors(unchecked):
    g = _gen(4)
    x = torch.randn(100, 3, generator=g)
    y = torch.randint(0, 2, (100,), generator=g)
    f = x + 0.1 * torch.randn(100, 3, generator=g)
    with pytest.raises(DataError, match="Row counts differ"):
        information_curve({0: f[:90]}, x, y, seed=0)
    with unchecked():
        with pytest.raises(DataError, match="Row counts differ"):
            information_curve({0: f}, x, y[:90], seed=0)
        with pytest.raises(DataError, match="Row counts differ"):
            probe_information(f, y[:50])
    bad = f.clone()
    bad[7, 1] = float("nan")
    with pytest.raises(DataError, match="checkpoint 'late'.*NaN"):
        information_curve({"early": f, "late": bad}, x, y, seed=0)
    with pytest.raises(DataError, match="Too few samples"):
        information_curve({0: f[:30]}, x[:30], y[:30], seed=0)
    with pytest.raises(DataError, match="same class"):
        probe_information(f, torch.zeros(100, dtype=torch.long))
    with pytest.raises(ConfigError, match="not checkpoints"):
        information_curve({0: f, 1: f}, x, y, seed=0, exclude={2})
    with pytest.raises(DataError, match="empty"):
        information_curve({}, x, y, seed=0)


def test_ridge_selection_matches_brute_force():
    """The one-eigendecomposition ridge path equals refitting at every candidate."""
    from interp.probes.information import RIDGE_GRID, _moments, _select_ridge

    g = _gen(5)
    f = torch.randn(300, 12, generator=g, dtype=torch.float64) + 0.3
    x = f[:, :4] @ torch.randn(4, 7, generator=g, dtype=torch.float64) + 2 * torch.randn(
        300, 7, generator=g, dtype=torch.float64)
    fi, xi, fv, xv = f[:200], x[:200], f[200:], x[200:]
    errors = []
    for ridge in RIDGE_GRID:
        fc, xc = fi - fi.mean(0), xi - xi.mean(0)
        w = torch.linalg.solve(fc.T @ fc / 200 + ridge * torch.eye(12, dtype=f.dtype),
                               fc.T @ xc / 200)
        pred = (fv - fi.mean(0)) @ w + xi.mean(0)
        errors.append(float((xv - pred).square().sum()))
    grid = torch.tensor(RIDGE_GRID, dtype=torch.float64)
    chosen = _select_ridge(_moments(fi, xi, torch.float64), _moments(fv, xv, torch.float64), grid)
    assert chosen == RIDGE_GRID[errors.index(min(errors))]
    assert chosen > RIDGE_GRID[0]  # noisy targets: the search does not just take the smallest


@pytest.mark.parametrize("spike", [1.0, 1e-4])
def test_rare_unit_does_not_break_held_out_estimates(spike):
    """A unit zero on every training row but one and large on a few held-out rows (a rarely
    firing ReLU) used to get |z| ~ 10^3-10^6 on held-out rows: the decoder's R^2 fell far
    below 0 and I(X;F) was floored to 0. spike 1.0: clipped to the training range;
    spike 1e-4: training std below the relative floor, column dropped."""
    from interp.probes.information import _split

    g = _gen(6)
    n = 1000
    x = torch.randn(n, 8, generator=g)
    f = torch.relu(torch.cat([x, -x], 1) + 0.3 * torch.randn(n, 16, generator=g))
    y = (x[:, 0] > 0).long()
    train, test = _split(n, 0.2, 0)
    rare = torch.zeros(n, 1)
    rare[train[0]] = spike
    rare[test[:5]] = 50.0
    with_rare = torch.cat([f, rare], 1)
    clean = decoder_information(f, x, seed=0)
    dec = decoder_information(with_rare, x, seed=0)
    assert dec.r2 > 0.5 and dec.i_xf > 0
    assert dec.r2 == pytest.approx(clean.r2, abs=0.01)
    assert dec.i_xf == pytest.approx(clean.i_xf, rel=0.03)
    mlp = decoder_information(with_rare, x, seed=0, decoder="mlp", hidden=32, steps=100)
    assert mlp.r2 > 0.5 and mlp.i_xf > 0
    probe = probe_information(with_rare, y, seed=0)
    assert probe.i_yf == pytest.approx(probe_information(f, y, seed=0).i_yf, abs=0.02)
    curve = information_curve({"rare": with_rare, "clean": f}, x, y, seed=0)
    assert curve.get("rare").r2_x == pytest.approx(dec.r2, rel=1e-5)
