"""Streaming statistics and ridge maps: exact against one-shot and reference computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import Ridge
from sklearn.metrics import r2_score

from interp.errors import InterpError
from interp.probes import (
    StreamingStats,
    collect_stats,
    iter_activations,
    residual_hook_names,
    ridge_from_stats,
)


def _data(n=600, dx=5, dy=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dx, generator=g, dtype=torch.float64) * 3 + 1.5
    y = x @ torch.randn(dx, dy, generator=g, dtype=torch.float64) + 0.5 * torch.randn(
        n, dy, generator=g, dtype=torch.float64) - 2.0
    return x, y


def _streamed(x, y, sizes):
    st = StreamingStats([("x", "x"), ("x", "y")])
    start = 0
    for size in sizes:
        st.update({"x": x[start:start + size], "y": y[start:start + size]})
        start += size
    assert start == x.shape[0]
    return st


def test_streaming_equals_one_shot():
    x, y = _data()
    st = _streamed(x, y, [1, 99, 250, 7, 243])
    assert st.n == 600
    torch.testing.assert_close(st.mean("x"), x.mean(0))
    torch.testing.assert_close(st.cov("x"), torch.from_numpy(np.cov(x.numpy(), rowvar=False)))
    torch.testing.assert_close(st.cross("x", "y"), x.T @ y)
    torch.testing.assert_close(st.cross("y", "x"), y.T @ x)
    xc, yc = x - x.mean(0), y - y.mean(0)
    torch.testing.assert_close(st.cov("x", "y", ddof=0), xc.T @ yc / 600)
    assert st.total_variance("y") == pytest.approx(float(y.var(0, unbiased=False).sum()))


def test_merge_and_state_dict_round_trip():
    x, y = _data()
    whole = _streamed(x, y, [600])
    merged = _streamed(x[:200], y[:200], [200]) + _streamed(x[200:], y[200:], [150, 250])
    assert merged.n == whole.n
    for k in whole.sums:
        torch.testing.assert_close(merged.sums[k], whole.sums[k])
        torch.testing.assert_close(merged.sq_sums[k], whole.sq_sums[k])
    for k in whole.products:
        torch.testing.assert_close(merged.products[k], whole.products[k])
    back = StreamingStats.from_state_dict(whole.state_dict())
    assert back.n == whole.n and set(back.pairs) == set(whole.pairs)
    torch.testing.assert_close(back.cov("x"), whole.cov("x"))


def test_rows_flatten_leading_dims_and_float32_accumulates_in_float64():
    x = torch.randn(4, 7, 3, generator=torch.Generator().manual_seed(0))
    st = StreamingStats([("a", "a")])
    st.update({"a": x})
    assert st.n == 28 and st.sums["a"].dtype == torch.float64
    rows = x.reshape(-1, 3).double()  # products are formed in float64, not float32
    torch.testing.assert_close(st.cross("a", "a"), rows.T @ rows, rtol=1e-12, atol=1e-12)


def test_ridge_matches_sklearn_and_closed_form():
    x, y = _data()
    st = _streamed(x, y, [300, 300])
    fit = ridge_from_stats(st, "x", "y", alpha=1.0)
    ref = Ridge(alpha=1.0, fit_intercept=True, solver="cholesky").fit(x.numpy(), y.numpy())
    np.testing.assert_allclose(fit.weight.numpy(), ref.coef_.T, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(fit.bias.numpy(), ref.intercept_, rtol=1e-9, atol=1e-10)
    # closed form on centred data: (Xc^T Xc + I)^-1 Xc^T Yc
    xc, yc = x - x.mean(0), y - y.mean(0)
    w = torch.linalg.solve(xc.T @ xc + torch.eye(5, dtype=x.dtype), xc.T @ yc)
    torch.testing.assert_close(fit.weight, w)
    pred = fit.predict(x).numpy()
    assert fit.r2 == pytest.approx(
        r2_score(y.numpy(), pred, multioutput="variance_weighted"), rel=1e-9)
    page = fit._repr_html_()  # Jupyter: a compact table, the weights by shape only
    assert page.startswith("<table>") and "RidgeFit" in page and "5 x 3" in page
    assert f"{fit.r2:.4g}" in page and len(page) < 1000


def test_ridge_errors_name_what_is_missing():
    x, y = _data()
    st = StreamingStats([("x", "x")])
    st.update({"x": x, "y": y})
    with pytest.raises(InterpError, match="add \\('x', 'y'\\) to pairs"):
        ridge_from_stats(st, "x", "y")
    with pytest.raises(InterpError, match="Did you mean"):
        st.mean("xx")
    with pytest.raises(InterpError, match="same number of rows"):
        st.update({"x": x, "y": y[:-1]})


def test_collect_stats_on_model_equals_cache(native_model):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, native_model.cfg.d_vocab, (6, 16), generator=g)
    names = residual_hook_names(native_model)
    assert names == ["blocks.0.hook_resid_pre", "blocks.0.hook_resid_post",
                     "blocks.1.hook_resid_post"]
    st = collect_stats(native_model, list(tokens.split(2)), names,
                       pairs=[(h, h) for h in names] + [(names[0], "embed")],
                       extra=lambda t: {"embed": native_model.W_E[t]}, progress=False)
    assert st.n == 6 * 16
    _, cache = native_model.run_with_cache(tokens)
    for h in names:
        acts = cache[h].reshape(-1, 32).double()
        torch.testing.assert_close(st.mean(h), acts.mean(0), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(st.cross(h, h), acts.T @ acts, rtol=1e-5, atol=1e-5)
    # layer 0 of a rotary model is the raw token embedding
    torch.testing.assert_close(st.cross(names[0], "embed"), st.cross(names[0], names[0]))


def test_iter_activations_rejects_unknown_hooks(native_model):
    with pytest.raises(InterpError, match="blocks.0.hook_resid_pre"):
        list(iter_activations(native_model, [torch.zeros(1, 4, dtype=torch.long)],
                              ["blocks.0.hook_resid_pr"], progress=False))
