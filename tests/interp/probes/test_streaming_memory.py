"""Streaming analyses hold no activation cache: their peak memory is flat in the number of
tokens (2k, 8k, 32k tokens through a small model), while a deliberately caching variant of
the same statistics, measured the same way, grows with the tokens (the negative control that
shows the measurement sees growth)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from analyses.residual import residual_analysis
from interp.memory import peak_memory
from interp.probes import collect_stats, residual_hook_names

TOKENS = (2048, 8192, 32768)
BATCH, POS = 16, 64  # 1,024 tokens per batch


pytestmark = pytest.mark.usefixtures("one_thread")


def _batches(model, n_tokens: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, model.cfg.d_vocab, (BATCH, POS), generator=gen)
            for _ in range(n_tokens // (BATCH * POS))]


def _peaks(fn, model) -> list:
    """(MemoryPeak, result) of ``fn(model, batches)`` per token count, after one warm-up
    batch: the bridge keeps the last forward pass's attention pattern until the next one, so
    every measured call starts from the same state."""
    fn(model, _batches(model, BATCH * POS, seed=1))
    out = []
    for n in TOKENS:
        batches = _batches(model, n)
        with peak_memory(python=True) as m:
            result = fn(model, batches)
        out.append((m, result))
    return out


def _cached_covariances(model, batches):
    """The residual covariances from a full activation cache: every batch's activations are
    kept, then stacked (what the streaming path never does)."""
    names = residual_hook_names(model)
    cache = []
    with torch.no_grad():
        for tokens in batches:
            _, acts = model.run_with_cache(tokens, names_filter=lambda n: n in names)
            cache.append({h: acts[h] for h in names})
    covs = {}
    for h in names:
        x = torch.cat([c[h].flatten(0, 1) for c in cache]).double()
        covs[h] = torch.cov(x.T)
    return covs


def test_peak_memory_measures_tensor_and_python_bytes():
    before = torch.ones(1000)
    with peak_memory(python=True) as m:
        a = torch.empty(1_000_000, dtype=torch.uint8)
        b = torch.empty(2_000_000, dtype=torch.uint8)
        del a
        c = torch.empty(500_000, dtype=torch.uint8)
        arr = np.zeros(300_000, dtype=np.uint8)
        del before  # freed, but allocated before the block: never counted as freed
    assert m.torch_peak == 3_000_000 and m.torch_end == 2_500_000
    assert 300_000 <= m.python_peak < 400_000
    assert b.numel() + c.numel() + arr.size > 0


def test_residual_analysis_memory_is_flat_in_tokens(native_model):
    runs = _peaks(lambda m, b: residual_analysis(m, b, progress=False), native_model)
    assert [r.n_tokens for _, r in runs] == list(TOKENS)
    torch_peaks = [m.torch_peak for m, _ in runs]
    python_peaks = [m.python_peak for m, _ in runs]
    # 16x the tokens: the same peak, within 5% (a batch's activations and the sums)
    assert torch_peaks[0] > 100_000
    assert max(torch_peaks) <= 1.05 * torch_peaks[0], torch_peaks
    assert max(python_peaks) <= 1.05 * python_peaks[0] + 256 * 1024, python_peaks


def test_collect_stats_memory_is_flat_in_tokens(native_model):
    names = residual_hook_names(native_model)
    runs = _peaks(lambda m, b: collect_stats(m, b, names, progress=False), native_model)
    assert [st.n for _, st in runs] == list(TOKENS)
    torch_peaks = [m.torch_peak for m, _ in runs]
    assert max(torch_peaks) <= 1.05 * torch_peaks[0], torch_peaks
    # what stays after the call is the sums alone: (d + d + d^2) float64 per hook
    d = native_model.cfg.d_model
    kept = [m.torch_end for m, _ in runs]
    assert all(k <= len(names) * (2 * d + d * d) * 8 + 4096 for k in kept), kept


def test_negative_control_a_cache_grows_with_tokens(native_model):
    """The same measurement on a caching variant: its peak grows by at least the bytes of the
    cached activations (3 hooks x d_model float32 per token, then a float64 copy)."""
    runs = _peaks(_cached_covariances, native_model)
    torch_peaks = [m.torch_peak for m, _ in runs]
    assert torch_peaks[0] < torch_peaks[1] < torch_peaks[2], torch_peaks
    n_hooks, d = len(residual_hook_names(native_model)), native_model.cfg.d_model
    cached = (TOKENS[2] - TOKENS[0]) * n_hooks * d * 4
    assert torch_peaks[2] - torch_peaks[0] >= cached, (torch_peaks, cached)
    assert torch_peaks[2] > 4 * torch_peaks[0]
