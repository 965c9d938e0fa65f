"""Residual-stream analysis: rotations of ridge maps, cosines and covariance similarity."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from analyses.residual import (
    ResidualResult,
    covariance_similarity,
    median_rotation,
    plot_cosines,
    plot_cov_similarity,
    plot_rotations,
    residual_analysis,
    rotation_angles,
)
from interp.probes import StreamingStats, ridge_from_stats


def _rotation_2d(deg: float) -> torch.Tensor:
    t = math.radians(deg)
    return torch.tensor([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]],
                        dtype=torch.float64)


def test_rotation_angles_of_known_maps():
    r = torch.block_diag(*[_rotation_2d(30.0)] * 4)
    np.testing.assert_allclose(np.sort(rotation_angles(r)), 30.0, atol=1e-9)
    assert median_rotation(torch.eye(5)) == 0.0
    assert median_rotation(-torch.eye(3)) == 180.0
    # the paper's statistic takes every eigenvalue, also ~0 ones whose angle is noise; the
    # optional filter drops them: a near-projection does not rotate
    proj = torch.diag(torch.tensor([1.0, 1.0, -1e-12], dtype=torch.float64))
    np.testing.assert_allclose(np.sort(rotation_angles(proj)), [0.0, 0.0, 180.0])
    np.testing.assert_allclose(rotation_angles(proj, rel_tol=1e-8), [0.0, 0.0])
    assert median_rotation(torch.diag(torch.tensor([1.0, -1e-12, -1e-12]))) == 180.0
    assert median_rotation(torch.diag(torch.tensor([1.0, -1e-12, -1e-12])), rel_tol=1e-8) == 0.0


def test_ridge_map_recovers_a_30_degree_rotation():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 8, generator=g, dtype=torch.float64) * 2
    rot = torch.block_diag(*[_rotation_2d(30.0)] * 4)
    y = x @ rot + 0.05 * torch.randn(4000, 8, generator=g, dtype=torch.float64) + 3.0
    st = StreamingStats([("x", "x"), ("x", "y")])
    for xb, yb in zip(x.split(500), y.split(500)):
        st.update({"x": xb, "y": yb})
    fit = ridge_from_stats(st, "x", "y", alpha=1.0)
    assert median_rotation(fit.weight) == pytest.approx(30.0, abs=0.2)
    torch.testing.assert_close(fit.bias, torch.full((8,), 3.0, dtype=torch.float64),
                               atol=0.02, rtol=0)


def test_covariance_similarity_removes_the_shared_top_direction():
    g = torch.Generator().manual_seed(0)
    d = 16
    u = torch.nn.functional.normalize(torch.randn(d, generator=g, dtype=torch.float64), dim=0)
    rest = [torch.randn(d, d, generator=g, dtype=torch.float64) for _ in range(2)]
    covs = [100 * torch.outer(u, u) + r @ r.T / d for r in rest]
    raw = covariance_similarity(covs, remove_top=0)
    cleaned = covariance_similarity(covs)
    assert raw[0, 1] > 0.95  # the shared outlier direction dominates
    assert cleaned[0, 1] < raw[0, 1] - 0.2
    np.testing.assert_allclose(np.diag(cleaned), 1.0)
    np.testing.assert_allclose(cleaned, cleaned.T)
    assert covariance_similarity([covs[0], 3 * covs[0]])[0, 1] == pytest.approx(1.0)


def _batches(model, n=6, batch=4, pos=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, model.cfg.d_vocab, (batch, pos), generator=g) for _ in range(n)]


def _hand_cosines(model, batches) -> dict[str, list[float]]:
    """Per layer: mean cosine of the residual to the current token's embedding and to the next
    token's unembedding, and the expectations of their within-batch shuffled baselines."""
    from interp.probes import residual_hook_names

    names = residual_hook_names(model)
    w_e, w_u = model.W_E.detach().double(), model.W_U.detach().double().T  # [d_vocab, d]
    out = {k: [] for k in ("cur", "next", "cur_shuf", "next_shuf")}
    with torch.no_grad():
        caches = [model.run_with_cache(b)[1] for b in batches]
    for h in names:
        sums = dict.fromkeys(out, 0.0)
        counts = dict.fromkeys(out, 0)
        for b, cache in zip(batches, caches):
            x = torch.nn.functional.normalize(cache[h].double(), dim=-1)  # [batch, pos, d]
            e = torch.nn.functional.normalize(w_e[b], dim=-1)
            u = torch.nn.functional.normalize(w_u[b[:, 1:]], dim=-1)
            cur, nxt = x.flatten(0, 1), x[:, :-1].flatten(0, 1)
            e, u = e.flatten(0, 1), u.flatten(0, 1)
            for key, a, t in [("cur", cur, e), ("next", nxt, u)]:
                sums[key] += float((a * t).sum(-1).sum())
                counts[key] += a.shape[0]
                sums[key + "_shuf"] += float((a @ t.T).mean()) * a.shape[0]
                counts[key + "_shuf"] += a.shape[0]
        for key in out:
            out[key].append(sums[key] / counts[key])
    return out


def test_residual_analysis_on_native_model(native_model):
    batches = _batches(native_model)
    res = residual_analysis(native_model, batches, label="full", progress=False)
    n_layers = native_model.cfg.n_layers + 1
    assert res.n_tokens == 6 * 4 * 24 and res.n_layers == n_layers
    assert len(res.rotation_to_input) == len(res.rotation_to_output) == n_layers
    # layer 0 is the token embedding itself: the map to the input is ~identity (ridge shrinks
    # it a little but keeps it symmetric, so no rotation), and the last layer maps to itself.
    assert res.rotation_to_input[0] < 1.0
    assert res.r2_to_input[0] > 0.99
    assert res.rotation_to_output[-1] < 1.0 and res.r2_to_output[-1] > 0.99
    assert res.cos_embed_current[0] == pytest.approx(1.0, abs=1e-5)
    assert abs(res.cos_embed_shuffled[0]) < 0.2
    # every cosine as computed by hand from the cached residual stream
    hand = _hand_cosines(native_model, batches)
    for key, field in [("cur", "cos_embed_current"), ("next", "cos_unembed_next")]:
        np.testing.assert_allclose(getattr(res, field), hand[key], atol=1e-5, err_msg=field)
    # a shuffled baseline is one draw of a within-batch permutation: its expectation is the
    # mean cosine over all (position, token of the batch) pairs; 552 tokens -> sd ~0.01
    for key, field in [("cur_shuf", "cos_embed_shuffled"), ("next_shuf", "cos_unembed_shuffled")]:
        np.testing.assert_allclose(getattr(res, field), hand[key], atol=0.04, err_msg=field)
    # the baselines are not the matched cosines (layer 0: 1.0 against ~0.03)
    assert res.cos_embed_current[0] - res.cos_embed_shuffled[0] > 0.5
    sim = np.array(res.cov_similarity)
    assert sim.shape == (n_layers, n_layers)
    np.testing.assert_allclose(np.diag(sim), 1.0, atol=1e-9)
    np.testing.assert_allclose(sim, sim.T)
    back = ResidualResult.from_json(res.to_json())
    assert back == res


def test_residual_analysis_is_independent_of_batching(native_model):
    tokens = torch.cat(_batches(native_model, n=4))
    a = residual_analysis(native_model, [tokens], progress=False)
    b = residual_analysis(native_model, list(tokens.split(3)), progress=False)
    np.testing.assert_allclose(a.rotation_to_input, b.rotation_to_input, atol=1e-6)
    np.testing.assert_allclose(a.rotation_to_output, b.rotation_to_output, atol=1e-6)
    np.testing.assert_allclose(a.cov_similarity, b.cov_similarity, atol=1e-9)
    np.testing.assert_allclose(a.cos_unembed_next, b.cos_unembed_next, atol=1e-6)


def test_skip_positions_drops_leading_tokens(native_model):
    batches = _batches(native_model, n=2)
    res = residual_analysis(native_model, batches, skip_positions=1, progress=False)
    assert res.n_tokens == 2 * 4 * 23


def test_figures_overlay_labelled_results(native_model):
    batches = _batches(native_model, n=2)
    full = residual_analysis(native_model, batches, label="full", progress=False)
    other = ResidualResult.from_dict({**full.to_dict(), "label": "bigram"})
    fig = plot_rotations([full, other])
    assert len(fig.data) == 4  # 2 results x (to input, to output)
    assert {t.name for t in fig.data} == {"full", "bigram"}
    assert fig.data[0].line.color != fig.data[2].line.color
    assert len(plot_cosines([full, other]).data) == 8  # + shuffled baselines
    heat = plot_cov_similarity([full, other])
    assert [t.type for t in heat.data] == ["heatmap", "heatmap"]
    assert np.asarray(heat.data[0].z).shape == (3, 3)


def test_residual_analysis_on_hf_gpt2_uses_embedding_plus_position(hf_gpt2_dir):
    from interp.models.lm import load_hf_lm

    model = load_hf_lm(hf_gpt2_dir)
    tokens = torch.randint(0, 97, (8, 32), generator=torch.Generator().manual_seed(0))
    _, cache = model.run_with_cache(tokens)
    layer0 = cache["blocks.0.hook_resid_pre"]
    torch.testing.assert_close(layer0, model.W_E[tokens] + model.W_pos[:32], atol=1e-6, rtol=0)
    res = residual_analysis(model, list(tokens.split(4)), progress=False)
    assert res.n_layers == 3 and res.n_tokens == 256
    assert res.rotation_to_output[-1] < 1e-6


def test_empty_subnetwork_leaves_the_token_embedding(native_model):
    """With every attention and MLP matrix removed, each layer is the embedding plus
    constant biases: nothing rotates, and all layers share one covariance."""
    from interp.masks import MaskSet

    batches = _batches(native_model, n=3)
    full = residual_analysis(native_model, batches, progress=False)
    with MaskSet.empty(native_model).applied(native_model, mode="keep"):
        empty = residual_analysis(native_model, batches, label="empty", progress=False)
    assert max(empty.rotation_to_input) < 1.0 and max(empty.rotation_to_output) < 1.0
    np.testing.assert_allclose(empty.cov_similarity, 1.0, atol=1e-6)
    assert max(full.rotation_to_input[1:]) > 5.0  # the full model does rotate
    assert residual_analysis(native_model, batches, progress=False) == full  # mask detached
