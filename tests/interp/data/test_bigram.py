"""BigramCounts: counts against brute force, shards, files, probabilities, soft CE, surprisal."""

from __future__ import annotations

import itertools
import math
from collections import Counter

import numpy as np
import pytest
import torch

from interp.data.bigram import BigramCounts, sample_markov_chain
from interp.errors import DataError


def _stream(n: int, V: int, seed: int = 0) -> np.ndarray:
    """A Zipf-ish stream, so some pairs repeat and some contexts are rare."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, V + 1)
    return rng.choice(V, size=n, p=p / p.sum()).astype(np.int64)


def _as_counter(bc: BigramCounts) -> Counter:
    V = bc.vocab_size
    return Counter({(int(c) // V, int(c) % V): int(k) for c, k in zip(bc.codes, bc.counts)})


def _brute_probs(pairs: Counter, V: int, lam: float = 0.0) -> np.ndarray:
    """p(next | cur) the slow way, with the documented back-off and interpolation."""
    col = np.zeros(V)
    rows = np.zeros((V, V))
    for (a, b), k in pairs.items():
        rows[a, b] += k
        col[b] += k
    uni = col / col.sum() if col.sum() else np.full(V, 1.0 / V)
    out = np.empty((V, V))
    for a in range(V):
        tot = rows[a].sum()
        out[a] = (1 - lam) * rows[a] / tot + lam * uni if tot else uni
    return out


# --------------------------------------------------------------------------- counting


@pytest.mark.parametrize("V", [7, 300, 70_000])  # dense table, uint32 sort, int64 sort
@pytest.mark.parametrize("chunk_size", [37, 1 << 20])
def test_counts_equal_counter(V, chunk_size):
    a = _stream(3000, V, seed=V)
    bc = BigramCounts.from_tokens(torch.from_numpy(a), V, chunk_size=chunk_size)
    expected = Counter(zip(a[:-1].tolist(), a[1:].tolist()))
    assert _as_counter(bc) == expected
    assert bc.n_pairs == len(a) - 1 and bc.nnz == len(expected)
    assert bool((bc.codes[1:] > bc.codes[:-1]).all())


def test_separator_drops_pairs_into_it():
    a = _stream(2000, 20, seed=1)
    sep = 0
    bc = BigramCounts.from_tokens(a, 20, separator=sep)
    expected = Counter((x, y) for x, y in zip(a[:-1].tolist(), a[1:].tolist()) if y != sep)
    assert _as_counter(bc) == expected
    assert any(x == sep for x, _ in expected)  # pairs out of the separator are kept


def test_2d_batch_counts_within_rows_only():
    a = _stream(600, 15, seed=2).reshape(20, 30)
    bc = BigramCounts.from_tokens(torch.from_numpy(a), 15, chunk_size=50)
    expected = Counter(p for row in a.tolist() for p in itertools.pairwise(row))
    assert _as_counter(bc) == expected


@pytest.mark.parametrize("V", [50, 300, 70_000])
def test_iterable_of_chunks_is_one_stream(V):
    a = _stream(5000, V, seed=3)
    parts = [a[:1], a[1:1234], a[1234:1234], a[1234:4000], a[4000:]]
    bc = BigramCounts.from_tokens(iter(parts), V, chunk_size=333)
    assert _as_counter(bc) == Counter(zip(a[:-1].tolist(), a[1:].tolist()))
    with pytest.raises(DataError, match="outside the vocabulary"):
        BigramCounts.from_tokens([a[:10], np.array([V])], V)


@pytest.mark.parametrize("V", [11, 500])
def test_merge_of_shards_equals_concatenation(V):
    a = _stream(4000, V, seed=4)
    whole = BigramCounts.from_tokens(a, V)
    # shards that overlap by one token cover every pair exactly once
    cuts = [0, 1000, 1001, 2500, 3999]
    shards = [BigramCounts.from_tokens(a[s : e + 1], V) for s, e in zip(cuts, cuts[1:] + [3999])
              if e > s]
    merged = shards[0]
    for s in shards[1:]:
        merged = merged + s
    assert torch.equal(merged.codes, whole.codes) and torch.equal(merged.counts, whole.counts)
    assert torch.allclose(merged.unigram_probs(), whole.unigram_probs())


def test_merge_rejects_other_vocabulary():
    with pytest.raises(DataError, match="same tokenizer"):
        BigramCounts.from_tokens(_stream(100, 10), 10) + BigramCounts.from_tokens(
            _stream(100, 10), 12
        )


def test_out_of_range_token_is_explained():
    with pytest.raises(DataError, match="vocab_size=len"):
        BigramCounts.from_tokens(np.array([1, 2, 10]), 10)


def test_save_load_round_trip(tmp_path):
    bc = BigramCounts.from_tokens(_stream(3000, 40, seed=5), 40, separator=0,
                                  meta={"corpus": "toy"}).smoothed(0.01)
    path = bc.save(tmp_path / "bigram.safetensors")
    back = BigramCounts.load(path)
    assert torch.equal(back.codes, bc.codes) and torch.equal(back.counts, bc.counts)
    assert (back.vocab_size, back.separator, back.interpolate, back.meta) == (
        40, 0, 0.01, {"corpus": "toy"})
    tokens = torch.from_numpy(_stream(50, 40, seed=6))
    assert torch.equal(back.surprisal(tokens), bc.surprisal(tokens))


def test_load_missing_or_corrupt(tmp_path):
    with pytest.raises(DataError, match="from_tokens"):
        BigramCounts.load(tmp_path / "nope.safetensors")
    bc = BigramCounts.from_tokens(_stream(300, 10), 10)
    path = bc.save(tmp_path / "b.safetensors")
    BigramCounts(bc.codes.flip(0), bc.counts, 10).save(tmp_path / "bad.safetensors")
    (tmp_path / "bad.safetensors.json").write_text(path.with_name(path.name + ".json").read_text())
    with pytest.raises(DataError, match="corrupt"):
        BigramCounts.load(tmp_path / "bad.safetensors")


def _snapshot(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def _damage_side(text):
    return lambda path, side: side.write_text(text)


def _drop_key(key):
    def damage(path, side):
        import json

        info = json.loads(side.read_text())
        del info[key]
        side.write_text(json.dumps(info))
    return damage


@pytest.mark.parametrize("damage, named, problem", [
    (lambda path, side: path.write_bytes(b""), "tensors", "is empty"),
    (lambda path, side: path.write_bytes(path.read_bytes()[:40]), "tensors", "truncated"),
    (lambda path, side: path.unlink(), "tensors", "does not exist"),
    (lambda path, side: side.unlink(), "sidecar", "does not exist"),
    (_damage_side(""), "sidecar", "is empty"),
    (_damage_side('{"format": "interp.bigram_counts/1", "voc'), "sidecar", "not valid JSON"),
    (_damage_side("[]"), "sidecar", "not a dict"),
    (_drop_key("vocab_size"), "sidecar", "has no 'vocab_size' entry"),
    (_drop_key("format"), "sidecar", "has no 'format' entry"),
])
def test_damaged_count_files_raise_data_error_naming_them(tmp_path, damage, named, problem):
    path = BigramCounts.from_tokens(_stream(300, 10), 10).save(tmp_path / "b.safetensors")
    side = tmp_path / "b.safetensors.json"
    damage(path, side)
    before = _snapshot(tmp_path)
    with pytest.raises(DataError, match=problem) as info:
        BigramCounts.load(path)
    assert str(path if named == "tensors" else side) in str(info.value)
    assert _snapshot(tmp_path) == before


def test_count_file_without_a_tensor(tmp_path):
    from safetensors.torch import save_file

    bc = BigramCounts.from_tokens(_stream(300, 10), 10)
    path = bc.save(tmp_path / "b.safetensors")
    save_file({"codes": bc.codes}, str(path))
    with pytest.raises(DataError, match="has no tensor 'counts'") as info:
        BigramCounts.load(path)
    assert str(path) in str(info.value)


# --------------------------------------------------------------------------- probabilities


@pytest.mark.parametrize("lam", [0.0, 0.01, 0.3])
def test_probs_match_brute_force_and_sum_to_one(lam):
    V = 12
    a = _stream(400, V - 2, seed=7)  # tokens V-2 and V-1 never occur: unseen contexts
    bc = BigramCounts.from_tokens(a, V).smoothed(lam)
    probs = bc.next_token_probs(torch.arange(V))
    expected = _brute_probs(Counter(zip(a[:-1].tolist(), a[1:].tolist())), V, lam)
    np.testing.assert_allclose(probs.numpy(), expected, atol=1e-6)
    assert torch.allclose(probs.sum(-1), torch.ones(V), atol=1e-6)
    np.testing.assert_allclose(bc.to_dense().numpy(), expected, atol=1e-12)
    assert torch.allclose(probs[V - 1], bc.unigram_probs().float())


def test_empty_counts_back_off_to_uniform():
    bc = BigramCounts.from_tokens(np.array([3]), 5)
    assert bc.n_pairs == 0
    assert torch.allclose(bc.next_token_probs(torch.tensor([0, 3])), torch.full((2, 5), 0.2))


def test_markov_chain_estimate_close_to_truth():
    gen = torch.Generator().manual_seed(0)
    V = 8
    truth = torch.rand(V, V, generator=gen, dtype=torch.float64) ** 3
    truth[truth < 0.05] = 0.0
    truth = truth / truth.sum(-1, keepdim=True)
    seqs = sample_markov_chain(truth, 500, 200, seed=1)
    est = BigramCounts.from_tokens(seqs, V).to_dense()
    assert float((est - truth).abs().max()) < 0.03
    assert bool((est[truth == 0] == 0).all())  # impossible transitions never appear


# --------------------------------------------------------------------------- soft cross-entropy


def _dense_ce(bc, logits, tokens):
    target = torch.from_numpy(bc.to_dense().numpy())[tokens].double()
    logp = torch.log_softmax(logits.double(), -1)
    return -(target * logp).sum(-1)


@pytest.mark.parametrize("lam", [0.0, 0.01])
def test_soft_ce_sparse_equals_dense(lam):
    V = 64
    bc = BigramCounts.from_tokens(_stream(5000, V - 4, seed=8), V).smoothed(lam)
    tokens = torch.from_numpy(_stream(3 * 9, V, seed=9)).view(3, 9)  # includes unseen contexts
    assert not bool((bc.row_totals()[tokens] > 0).all())
    logits = torch.randn(3, 9, V, generator=torch.Generator().manual_seed(0))
    results = {}
    for method in ("sparse", "dense"):
        x = logits.clone().requires_grad_(True)
        ce = bc.soft_cross_entropy(x, tokens, method=method)
        ce.mean().backward()
        results[method] = (ce.detach(), x.grad)
    torch.testing.assert_close(results["sparse"][0], results["dense"][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(results["sparse"][1], results["dense"][1], atol=1e-5, rtol=1e-5)
    ref_x = logits.double().requires_grad_(True)
    ref = _dense_ce(bc, ref_x, tokens)
    ref.mean().backward()
    torch.testing.assert_close(results["sparse"][0].double(), ref.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(results["dense"][1].double(), ref_x.grad, atol=1e-6, rtol=1e-5)
    auto = bc.soft_cross_entropy(logits, tokens)
    torch.testing.assert_close(auto, results["sparse"][0], atol=1e-5, rtol=1e-5)


def test_soft_ce_of_log_bigram_is_entropy():
    V = 30
    bc = BigramCounts.from_tokens(_stream(3000, V, seed=10), V)
    tokens = torch.arange(V)
    logits = bc.to_dense().log().float().clamp_min(-1e9)
    ce = bc.soft_cross_entropy(logits, tokens, method="sparse")
    torch.testing.assert_close(ce.double(), bc.entropy(per_context=True), atol=1e-5, rtol=1e-5)


def test_soft_ce_rejects_mismatched_shapes(unchecked):
    bc = BigramCounts.from_tokens(_stream(100, 10), 10)
    with unchecked():  # the library's own message, which users without the type checker get
        with pytest.raises(DataError, match="expected logits of shape"):
            bc.soft_cross_entropy(torch.zeros(2, 3, 9), torch.zeros(2, 3, dtype=torch.long))
        with pytest.raises(DataError, match="expected logits of shape"):
            bc.soft_cross_entropy(torch.zeros(2, 4, 10), torch.zeros(2, 3, dtype=torch.long))


# --------------------------------------------------------------------------- surprisal, entropy


@pytest.mark.parametrize("lam", [0.0, 0.01])
def test_surprisal_equals_brute_force(lam):
    V = 20
    a = _stream(800, V - 1, seed=11)
    pairs = Counter(zip(a[:-1].tolist(), a[1:].tolist()))
    bc = BigramCounts.from_tokens(a, V).smoothed(lam)
    probs = _brute_probs(pairs, V, lam)
    tokens = torch.from_numpy(_stream(2 * 50, V, seed=12)).view(2, 50)
    s = bc.surprisal(tokens)
    assert s.shape == (2, 49) and s.dtype == torch.float64
    t = tokens.numpy()
    with np.errstate(divide="ignore"):
        expected = -np.log(probs[t[:, :-1], t[:, 1:]])
    np.testing.assert_allclose(s.numpy(), expected, rtol=1e-12)
    seen = bc.seen(tokens).numpy()
    np.testing.assert_array_equal(seen, [[(x, y) in pairs for x, y in itertools.pairwise(r)]
                                         for r in t.tolist()])
    if lam == 0.0:
        ctx_seen = bc.row_totals()[tokens[:, :-1]].numpy() > 0
        assert np.isinf(s.numpy()[ctx_seen & ~seen]).all()
        assert np.isfinite(s.numpy()[seen]).all()


@pytest.mark.parametrize("lam", [0.0, 0.2])
def test_entropy_matches_dense_table(lam):
    V = 25
    a = _stream(2000, V - 3, seed=13)
    bc = BigramCounts.from_tokens(a, V).smoothed(lam)
    p = bc.to_dense()
    per_row = -(torch.where(p > 0, p * p.log(), 0.0)).sum(-1)
    torch.testing.assert_close(bc.entropy(per_context=True), per_row)
    w = bc.row_totals().double() / bc.n_pairs
    assert math.isclose(bc.entropy(), float((w * per_row).sum()), rel_tol=1e-12)
    # the conditional entropy is the mean surprisal of the counted stream itself (lam = 0)
    if lam == 0.0:
        assert math.isclose(bc.entropy(), float(bc.surprisal(torch.from_numpy(a)).mean()),
                            rel_tol=1e-9)


def test_soft_ce_handles_minus_inf_logits_off_target():
    """-inf logits where the target is 0 (bigram and unigram) give finite losses, no nan."""
    V = 6
    bc = BigramCounts.from_tokens(np.array([0, 1, 0, 1, 2, 0]), V).smoothed(0.1)
    tokens = torch.tensor([0, 1, 2, 5])  # 5 never seen: unigram back-off
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(0))
    logits[:, 3:] = -math.inf  # tokens 3..5 never occur as next tokens
    x = logits.clone().requires_grad_(True)
    ce = bc.soft_cross_entropy(x, tokens, method="sparse")
    ce.sum().backward()
    finite = logits.clone()
    finite[:, 3:] = -1e4
    torch.testing.assert_close(ce.detach(), bc.soft_cross_entropy(finite, tokens, method="dense"))
    assert torch.isfinite(x.grad).all() and bool((x.grad[:, 3:] == 0).all())
    y = logits.clone().requires_grad_(True)
    ce_dense = bc.soft_cross_entropy(y, tokens, method="dense")
    ce_dense.sum().backward()
    torch.testing.assert_close(ce_dense.detach(), ce.detach())
    torch.testing.assert_close(y.grad, x.grad)


@pytest.mark.parametrize("method", ["sparse", "dense"])
def test_soft_ce_accepts_padded_vocabulary(method):
    """Logits wider than V (padded model vocabularies) score padding ids with target 0."""
    a = _stream(2000, 20, seed=14)
    tokens = torch.from_numpy(_stream(30, 20, seed=15)).view(3, 10)
    logits = torch.randn(3, 10, 24, generator=torch.Generator().manual_seed(1))
    for lam in (0.0, 0.05):
        narrow = BigramCounts.from_tokens(a, 20).smoothed(lam)
        wide = BigramCounts.from_tokens(a, 24).smoothed(lam)
        x, y = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
        ce_n = narrow.soft_cross_entropy(x, tokens, method=method)
        ce_w = wide.soft_cross_entropy(y, tokens, method=method)
        ce_n.sum().backward()
        ce_w.sum().backward()
        torch.testing.assert_close(ce_n, ce_w)
        torch.testing.assert_close(x.grad, y.grad)
    with pytest.raises(DataError, match="expected logits"):
        narrow.soft_cross_entropy(logits[..., :19], tokens)
