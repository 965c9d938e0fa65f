"""OOD scores from per-image likelihoods: metrics, scores, compressor code lengths, typicality."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from analyses.ood import (
    CODECS,
    OODMetrics,
    OODResult,
    TypicalityResult,
    codec_bits_per_dim,
    evaluate_scores,
    input_complexity_score,
    likelihood_score,
    nats_to_bpd,
    nonlocal_score,
    ood_metrics,
    plot_roc,
    plot_score_histograms,
    typicality_scores,
    typicality_statistic,
    typicality_test,
)
from interp.errors import ConfigError, DataError


def _images(kind: str, n: int = 3, c: int = 3, size: int = 16, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "noise":
        return rng.integers(0, 256, (n, c, size, size), dtype=np.uint8)
    return np.full((n, c, size, size), 128, dtype=np.uint8)


# ---------------------------------------------------------------------- metrics


def test_separable_reversed_and_identical_scores():
    rng = np.random.default_rng(0)
    a, b = rng.normal(5, 1, 300), rng.normal(-5, 1, 200)
    a, b = np.clip(a, 1, None), np.clip(b, None, 0)  # no overlap at all
    perfect = ood_metrics(a, b)
    assert perfect.auroc == 1.0 and perfect.auprc == pytest.approx(1.0)
    assert perfect.fpr_at_80_tpr == 0.0 and (perfect.n_in, perfect.n_out) == (300, 200)
    reversed_ = ood_metrics(b, a)
    assert reversed_.auroc == 0.0 and reversed_.fpr_at_80_tpr == 1.0
    same = ood_metrics(rng.normal(0, 1, 4000), rng.normal(0, 1, 4000))
    assert same.auroc == pytest.approx(0.5, abs=0.03)
    assert same.fpr_at_80_tpr == pytest.approx(0.8, abs=0.03)


def test_fpr_at_80_tpr_by_hand():
    # descending: .9 in, .8 out, .7 in, .6 out, .5 in, .4 out, .3 in -> 4/5 in kept, 3/5 out
    m = ood_metrics([0.9, 0.7, 0.5, 0.3, 0.1], [0.8, 0.6, 0.4, 0.2, 0.0])
    assert m.fpr_at_80_tpr == pytest.approx(0.6)
    # AUROC by hand: pairs (in > out) = 5 + 4 + 3 + 2 + 1 = 15 of 25
    assert m.auroc == pytest.approx(15 / 25)
    # tied in/out pairs give a straight diagonal, whose inner points sklearn drops by default:
    # the FPR at 80% TPR is still 0.8, not the 1.0 of the next kept point
    tied = ood_metrics([5, 4, 3, 2, 1], [5, 4, 3, 2, 1])
    assert tied.fpr_at_80_tpr == pytest.approx(0.8)
    assert tied.auroc == pytest.approx(0.5)


def test_roc_points_are_capped_and_span_the_square():
    rng = np.random.default_rng(1)
    m = ood_metrics(rng.normal(0.3, 1, 5000), rng.normal(0, 1, 5000))
    assert 2 <= len(m.fpr) == len(m.tpr) <= 200
    assert (m.fpr[0], m.tpr[0]) == (0.0, 0.0) and (m.fpr[-1], m.tpr[-1]) == (1.0, 1.0)
    assert np.all(np.diff(m.fpr) >= 0) and np.all(np.diff(m.tpr) >= 0)


def test_torch_inputs_match_numpy():
    a, b = [0.9, 0.2, 0.7], [0.1, 0.8]
    assert ood_metrics(torch.tensor(a), torch.tensor(b)).auroc == ood_metrics(a, b).auroc


@pytest.mark.parametrize("side", ["score_in", "score_out"])
def test_non_finite_scores_raise_data_error_naming_the_side(side):
    good, bad = np.arange(5.0), np.array([1.0, np.nan, np.inf, 2.0])
    args = (bad, good) if side == "score_in" else (good, bad)
    with pytest.raises(DataError, match=rf"{side} has 2 non-finite values \(1 NaN, 1 inf\)"):
        ood_metrics(*args)


def test_empty_and_nan_inputs_raise():
    with pytest.raises(DataError, match="score_out is empty"):
        ood_metrics([1.0, 2.0], [])
    with pytest.raises(DataError, match="bpd has 1 non-finite"):
        likelihood_score([3.0, float("nan")])
    with pytest.raises(DataError, match="'raw'.*score_in has 1"):
        evaluate_scores({"raw": ([np.nan, 1.0], [0.0])})


def test_evaluate_scores_rows_and_json_round_trip():
    res = evaluate_scores({"good": ([3, 4, 5], [0, 1, 2]), "bad": ([0, 1, 2], [3, 4, 5])},
                          in_label="FashionMNIST", out_label="MNIST")
    assert isinstance(res.metrics["good"], OODMetrics)
    rows = dict(res.summary_rows())
    assert rows["good"] == {"AUROC": 1.0, "AUPRC": 1.0, "FPR@80%TPR": 0.0}
    assert rows["bad"]["AUROC"] == 0.0
    assert [r["score"] for r in res.table()] == ["good", "bad"]
    back = OODResult.from_json(res.to_json())
    assert back.metrics["bad"].auroc == 0.0 and back.metrics["good"].fpr == res.metrics["good"].fpr
    assert "fpr=" not in repr(res.metrics["good"])  # ROC points are bulky


# ---------------------------------------------------------------------- scores


def test_likelihood_and_nonlocal_sign_conventions():
    assert likelihood_score([2.0, 3.5]).tolist() == [-2.0, -3.5]
    # image 0: the full model is better than the local one (lower bpd) -> higher score
    full, local = np.array([2.0, 3.0]), np.array([3.0, 2.5])
    s = nonlocal_score(full, local)
    assert s[0] > 0 > s[1] and s[0] > s[1]
    # = (log p_full - log p_local) / (D ln 2), from log-likelihoods in nats
    d = 3 * 32 * 32
    logp_full, logp_local = -full * d * np.log(2), -local * d * np.log(2)
    np.testing.assert_allclose(s, (logp_full - logp_local) / (d * np.log(2)))
    np.testing.assert_allclose(nats_to_bpd(-logp_full, d), full)
    with pytest.raises(DataError, match="lengths differ"):
        nonlocal_score([1.0, 2.0], [1.0])


def test_codec_constant_image_far_below_noise():
    for codec in CODECS:
        flat = codec_bits_per_dim(_images("flat"), codec)
        noise = codec_bits_per_dim(_images("noise"), codec)
        assert flat.shape == noise.shape == (3,)
        assert np.all(flat > 0) and np.all(noise > 0), codec
        assert flat.max() < 0.25 * noise.min(), codec
        assert noise.min() > 7.5, codec  # noise is incompressible: about 8 bits/dim or more


def test_png_bits_match_pillow_file_length():
    # runs of 4 equal random pixels: an image where optimize=True changes the PNG's length
    rng = np.random.default_rng(0)
    img = np.repeat(rng.integers(0, 256, (3, 64, 16), dtype=np.uint8), 4, axis=2)
    buf = io.BytesIO()
    Image.fromarray(img.transpose(1, 2, 0)).save(buf, format="PNG", optimize=True)
    expected = 8 * len(buf.getvalue()) / img.size
    assert codec_bits_per_dim(img[None])[0] == pytest.approx(expected)
    # grayscale [N, 1, H, W] and torch input work too
    gray = codec_bits_per_dim(torch.from_numpy(_images("noise", n=2, c=1)), "png")
    assert gray.shape == (2,) and np.all(gray > 7.5)


def test_unknown_codec_is_a_config_error():
    with pytest.raises(ConfigError, match="Did you mean: webp"):
        codec_bits_per_dim(_images("flat"), "wepb")
    with pytest.raises(ConfigError, match="Unknown codec"):
        input_complexity_score([1.0, 1.0, 1.0], _images("flat"), codec="jpeg")


def test_input_complexity_score_is_codec_minus_model():
    imgs = np.concatenate([_images("flat", n=1), _images("noise", n=1)])
    bpd = np.array([1.0, 1.0])
    s = input_complexity_score(bpd, imgs, codec="zlib")
    np.testing.assert_allclose(s, codec_bits_per_dim(imgs, "zlib") - bpd)
    assert s[1] > s[0]  # same likelihood, complex image -> more in-distribution
    with pytest.raises(DataError, match="lengths differ"):
        input_complexity_score([1.0], imgs)


# ---------------------------------------------------------------------- typicality


def _typical_sets(seed: int = 0):
    rng = np.random.default_rng(seed)
    ref = rng.normal(3.4, 0.3, 2000)
    ins = rng.normal(3.4, 0.3, 500)
    outs = rng.normal(3.1, 0.3, 500)  # more likely than in-distribution, like SVHN
    return ins, outs, ref


def test_typicality_flags_shifted_batches():
    ins, outs, ref = _typical_sets()
    s_in, s_out = typicality_scores(ins, outs, ref, batch_size=10, n_batches=150, seed=3)
    assert s_in.shape == s_out.shape == (150,) and np.all(s_in <= 0)
    assert s_out.mean() < s_in.mean()
    assert ood_metrics(s_in, s_out).auroc > 0.9
    # raw likelihood ranks these OOD images as more in-distribution
    assert ood_metrics(likelihood_score(ins), likelihood_score(outs)).auroc < 0.5


def test_typicality_same_seed_same_batches():
    ins, outs, ref = _typical_sets()
    a = typicality_scores(ins, outs, ref, batch_size=5, n_batches=20, seed=7)
    b = typicality_scores(ins, outs, ref, batch_size=5, n_batches=20, seed=7)
    c = typicality_scores(ins, outs, ref, batch_size=5, n_batches=20, seed=8)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_typicality_statistic_and_test():
    assert typicality_statistic([[1.0, 3.0], [4.0, 4.0]], 3.0).tolist() == [1.0, 1.0]
    ins, outs, ref = _typical_sets()
    res = typicality_test(ins, outs, ref, batch_size=10, n_batches=100, alpha=0.05)
    assert isinstance(res, TypicalityResult) and res.threshold > 0
    assert res.rejected_in < 0.2 < 0.8 < res.rejected_out
    assert res.metrics.auroc > 0.9 and len(res.statistic_in) == 100
    assert json.loads(res.to_json())["batch_size"] == 10
    with pytest.raises(ConfigError, match="larger than bpd_out"):
        typicality_scores(ins, outs[:3], ref, batch_size=5)


# ---------------------------------------------------------------------- figures


def test_plot_roc_traces_axes_and_hover():
    res = evaluate_scores({"likelihood": ([0, 1, 2], [3, 4, 5]),
                           "non-local": ([3, 4, 5], [0, 1, 2.5])})
    fig = plot_roc(res)
    assert len(fig.data) == 3  # chance line + one curve per score
    assert "chance" in fig.data[0].name
    assert "likelihood" in fig.data[1].hovertemplate and "AUROC 0.000" in fig.data[1].hovertemplate
    assert "AUROC 1.000" in fig.data[2].name
    assert "false positive rate" in fig.layout.xaxis.title.text
    assert "true positive rate" in fig.layout.yaxis.title.text


def test_plot_score_histograms_subplots():
    rng = np.random.default_rng(0)
    scores = {name: (rng.normal(1, 1, 50), rng.normal(0, 1, 40))
              for name in ("likelihood", "non-local", "input complexity", "typicality")}
    fig = plot_score_histograms(scores, ("CIFAR10", "SVHN"))
    assert len(fig.data) == 8
    assert [t.name for t in fig.data[:2]] == ["CIFAR10", "SVHN"]
    assert sum(bool(t.showlegend) for t in fig.data) == 2
    assert fig.layout.xaxis.title.text == "score (bits/dim)"
    assert fig.layout.xaxis4.title.text == "score (bits/dim)"
    assert [a.text for a in fig.layout.annotations] == list(scores)
