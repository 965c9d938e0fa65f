"""Sparse bigram statistics of a token stream: counts, conditional probabilities, soft targets.

:class:`BigramCounts` holds the counts of adjacent token pairs ``(cur, next)`` as sorted pair
codes ``cur * V + next`` with their counts; that is a CSR matrix in disguise (row ``cur``,
column ``next``), so memory grows with the number of distinct pairs, never with ``V**2``.

Probabilities follow the bigram-subnetwork paper (Chang & Bergen 2025): raw count / row total,
no smoothing. A context (current token) never seen backs off to the unigram distribution, and
if nothing was counted at all, to the uniform one. ``interpolate`` mixes every seen row toward
the unigram, ``(1 - interpolate) * p(next | cur) + interpolate * p(next)``, for the "smoothed
0.99 / 0.01" evaluation variant.

The unigram here is the distribution of tokens in the *next* position of the counted pairs (the
column marginal). It is the natural back-off for a next-token distribution, and it keeps
``a + b`` exact: merging the counts of shards that overlap by one token equals counting their
concatenation.

Counting is vectorised and works in chunks, so a stream of billions of tokens needs memory for
its distinct pairs only: a dense bincount table when ``V * V <= 2**24`` (50-80M tokens/s on one
core of the 2-core dev machine at V = 4k), else a sort of 32-bit pair codes (15-20M tokens/s at
V = 50k, bound by ``np.sort``); ``collections.Counter`` manages 1-4M. See
``benchmarks/bench_bigram.py``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from interp.data.soft_ce import DenseSoftCE, SparseSoftCE
from interp.errors import DataError
from interp.io import read_json, read_tensors, require_keys, save_tensors, write_json

__all__ = ["BigramCounts", "sample_markov_chain"]

log = logging.getLogger(__name__)

_FORMAT = "interp.bigram_counts/1"
#: Count in one dense bincount table when V * V is at most this (128 MB of int64) and the
#: stream has at least V * V / 8 tokens (or is an iterable of unknown length).
_DENSE_TABLE_LIMIT = 1 << 24
#: Largest vocabulary whose pair codes fit in uint32 (sorting 32-bit codes is ~2x faster).
_U32_VOCAB_LIMIT = 65535
#: ``to_dense`` refuses vocabularies above this (a V x V float64 table).
_DENSE_VOCAB_LIMIT = 8192

TokenSource = Tensor | np.ndarray | Iterable


# --------------------------------------------------------------------------- counting kernels


def _unique_counts(sorted_codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct values of a sorted array and how often each occurs."""
    if sorted_codes.size == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    first = np.empty(sorted_codes.size, dtype=bool)
    first[0] = True
    np.not_equal(sorted_codes[1:], sorted_codes[:-1], out=first[1:])
    starts = np.flatnonzero(first)
    counts = np.diff(np.append(starts, sorted_codes.size))
    return sorted_codes[starts].astype(np.int64), counts.astype(np.int64)


def _sorted_pair_counts(
    cur: np.ndarray, nxt: np.ndarray, vocab_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted distinct pair codes ``cur * V + nxt`` and their counts, by sorting the codes.

    Codes are uint32 when ``V * V`` fits (sorting 32-bit keys is about twice as fast).
    """
    if cur.size == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    dtype = np.uint32 if vocab_size <= _U32_VOCAB_LIMIT else np.int64
    codes = cur.astype(dtype)
    codes *= dtype(vocab_size)
    np.add(codes, nxt, out=codes, casting="unsafe")
    codes.sort()
    return _unique_counts(codes)


class _DenseTable:
    """Counts in one ``V * V`` bincount table: the fastest way when the table is small."""

    def __init__(self, vocab_size: int):
        self.V = vocab_size
        self.table = np.zeros(vocab_size * vocab_size, dtype=np.int64)

    def add(self, cur: np.ndarray, nxt: np.ndarray) -> None:
        if cur.size:
            codes = cur.astype(np.int64)
            codes *= self.V
            np.add(codes, nxt, out=codes, casting="unsafe")
            self.table += np.bincount(codes, minlength=self.table.size)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        codes = np.flatnonzero(self.table).astype(np.int64)
        return codes, self.table[codes]


def _merge_sorted(
    a_codes: np.ndarray, a_counts: np.ndarray, b_codes: np.ndarray, b_counts: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Union of two sorted distinct code arrays, adding the counts of shared codes."""
    if a_codes.size < b_codes.size:
        a_codes, a_counts, b_codes, b_counts = b_codes, b_counts, a_codes, a_counts
    if b_codes.size == 0:
        return a_codes, a_counts
    pos = np.searchsorted(a_codes, b_codes)
    hit = np.zeros(b_codes.size, dtype=bool)
    inside = pos < a_codes.size
    hit[inside] = a_codes[pos[inside]] == b_codes[inside]
    counts = a_counts.copy()
    counts[pos[hit]] += b_counts[hit]
    new = ~hit
    return np.insert(a_codes, pos[new], b_codes[new]), np.insert(counts, pos[new], b_counts[new])


class _MergeStack:
    """Sorts each chunk's pairs and merges the results like a binary counter (total merge
    work O(nnz log chunks)); memory grows with distinct pairs, not with V * V."""

    def __init__(self, vocab_size: int):
        self.V = vocab_size
        self._stack: list[tuple[int, np.ndarray, np.ndarray]] = []

    def add(self, cur: np.ndarray, nxt: np.ndarray) -> None:
        codes, counts = _sorted_pair_counts(cur, nxt, self.V)
        level = 0
        while self._stack and self._stack[-1][0] == level:
            _, c, k = self._stack.pop()
            codes, counts = _merge_sorted(c, k, codes, counts)
            level += 1
        self._stack.append((level, codes, counts))

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        codes, counts = np.empty(0, np.int64), np.empty(0, np.int64)
        while self._stack:
            _, c, k = self._stack.pop()
            codes, counts = _merge_sorted(c, k, codes, counts)
        return codes, counts


def _as_numpy(tokens) -> np.ndarray:
    if isinstance(tokens, Tensor):
        return tokens.detach().to("cpu").numpy()
    return np.asarray(tokens)


def _pieces(tokens: TokenSource, chunk_size: int) -> Iterator[np.ndarray]:
    """1-D pieces of one stream; consecutive pieces overlap by one token (the carried pair)."""
    if isinstance(tokens, (Tensor, np.ndarray)):
        arr = _as_numpy(tokens)
        if arr.ndim != 1:
            raise DataError(f"Expected a 1-D token stream, got shape {tuple(arr.shape)}.")
        for start in range(0, max(1, arr.size - 1), chunk_size):
            yield arr[start : start + chunk_size + 1]
        return
    prev: np.ndarray | None = None
    for item in tokens:
        arr = _as_numpy(item).reshape(-1)
        if arr.size == 0:
            continue
        piece = arr if prev is None else np.concatenate([prev, arr.astype(prev.dtype)])
        for start in range(0, max(1, piece.size - 1), chunk_size):
            yield piece[start : start + chunk_size + 1]
        prev = arr[-1:]


def _check_range(arr: np.ndarray, vocab_size: int) -> None:
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= vocab_size):
        bad = int(arr.min()) if int(arr.min()) < 0 else int(arr.max())
        raise DataError(
            f"Token id {bad} is outside the vocabulary [0, {vocab_size}). Pass "
            "vocab_size=len(tokenizer) for the tokenizer that produced these tokens."
        )


# --------------------------------------------------------------------------- the counts


class BigramCounts:
    """Counts of adjacent token pairs, kept sparse, with the bigram model they define.

    Build with :meth:`from_tokens`; combine shards with ``a + b``; save and :meth:`load`.

    Args:
        codes: sorted distinct pair codes ``cur * vocab_size + next`` (int64).
        counts: how often each pair occurred (int64, positive).
        vocab_size: ``V``, the number of token ids.
        separator: the document separator id whose incoming pairs were dropped, if any.
        interpolate: weight of the unigram mixed into every seen context (0 = raw counts).
        meta: free-form JSON-able facts saved alongside (corpus, tokenizer fingerprint, ...).
    """

    def __init__(
        self,
        codes: Int[Tensor, " nnz"] | np.ndarray,
        counts: Int[Tensor, " nnz"] | np.ndarray,
        vocab_size: int,
        *,
        separator: int | None = None,
        interpolate: float = 0.0,
        meta: dict | None = None,
    ):
        codes = torch.as_tensor(codes, dtype=torch.int64)
        counts = torch.as_tensor(counts, dtype=torch.int64)
        if codes.ndim != 1 or codes.shape != counts.shape:
            raise DataError(
                f"codes and counts must be 1-D and of equal length, got {tuple(codes.shape)} "
                f"and {tuple(counts.shape)}."
            )
        if vocab_size < 1:
            raise DataError(f"vocab_size must be positive, got {vocab_size}.")
        if not 0.0 <= interpolate <= 1.0:
            raise DataError(f"interpolate must be in [0, 1], got {interpolate}.")
        self.codes, self.counts = codes, counts
        self.vocab_size = int(vocab_size)
        self.separator = None if separator is None else int(separator)
        self.interpolate = float(interpolate)
        self.meta = dict(meta or {})
        self._derived: dict[str, Tensor] = {}
        self._on_device: dict[torch.device, BigramCounts] = {}

    # ---------------------------------------------------------------- construction

    @classmethod
    def from_tokens(
        cls,
        tokens: TokenSource,
        vocab_size: int,
        *,
        separator: int | None = None,
        chunk_size: int = 1 << 25,
        progress: bool = False,
        meta: dict | None = None,
    ) -> BigramCounts:
        """Count the bigrams of a token stream.

        Args:
            tokens: a 1-D stream (tensor or array); a 2-D ``[n_seq, seq_len]`` batch (pairs
                within each row only); or an iterable of 1-D chunks read as ONE continued
                stream (the pair across two chunks is counted).
            vocab_size: ``len(tokenizer)``; every id must be below it.
            separator: a document separator id (e.g. the BOS/EOS token that
                :func:`~interp.data.text.tokenize_corpus` puts before each document). Pairs
                whose next token is the separator are dropped, so the last token of one
                document never "predicts" the next document; pairs from the separator to a
                document's first token are kept (the model is trained on those).
            chunk_size: tokens counted at once (bounds temporary memory: ~4-8 bytes/token).
            progress: show a tqdm bar over chunks.
            meta: facts to keep with the counts (saved by :meth:`save`).
        """
        V = int(vocab_size)
        arr = _as_numpy(tokens) if isinstance(tokens, (Tensor, np.ndarray)) else None
        n_total = None if arr is None else arr.size
        small = V * V <= _DENSE_TABLE_LIMIT and (n_total is None or 8 * n_total >= V * V)
        acc = _DenseTable(V) if small else _MergeStack(V)
        if arr is not None:
            _check_range(arr, V)
        if arr is not None and arr.ndim == 2:
            rows_per = max(1, chunk_size // max(1, arr.shape[1]))
            pieces = (
                (arr[i : i + rows_per, :-1].ravel(), arr[i : i + rows_per, 1:].ravel())
                for i in range(0, arr.shape[0], rows_per)
            )
        else:
            pieces = ((p[:-1], p[1:]) for p in _pieces(tokens, chunk_size))
        for cur, nxt in tqdm(pieces, desc="count bigrams", disable=not progress, leave=False):
            if arr is None:
                _check_range(nxt, V)
                _check_range(cur[:1], V)
            if separator is not None:
                keep = nxt != separator
                cur, nxt = cur[keep], nxt[keep]
            acc.add(cur, nxt)
        codes, counts = acc.result()
        out = cls(torch.from_numpy(codes), torch.from_numpy(counts), V, separator=separator,
                  meta=meta)
        log.info("counted %s", out)
        return out

    def merge(self, other: BigramCounts) -> BigramCounts:
        """Counts of both (shards of one corpus); vocabulary and separator must agree."""
        if not isinstance(other, BigramCounts):
            return NotImplemented
        if other.vocab_size != self.vocab_size or other.separator != self.separator:
            raise DataError(
                f"Cannot merge bigram counts over vocab {self.vocab_size} (separator "
                f"{self.separator}) with vocab {other.vocab_size} (separator {other.separator}). "
                "Count every shard with the same tokenizer and separator."
            )
        codes, counts = _merge_sorted(
            self.codes.cpu().numpy(), self.counts.cpu().numpy(),
            other.codes.cpu().numpy(), other.counts.cpu().numpy(),
        )
        return BigramCounts(torch.from_numpy(codes), torch.from_numpy(counts), self.vocab_size,
                            separator=self.separator, interpolate=self.interpolate,
                            meta=self.meta).to(self.device)

    __add__ = merge

    def smoothed(self, interpolate: float) -> BigramCounts:
        """The same counts with another unigram interpolation weight (tensors shared)."""
        out = BigramCounts(self.codes, self.counts, self.vocab_size, separator=self.separator,
                           interpolate=interpolate, meta=self.meta)
        out._derived = self._derived  # the derived tables do not depend on interpolate
        return out

    def to(self, device: str | torch.device) -> BigramCounts:
        """A copy on ``device`` (cached, so objectives can call it every step)."""
        device = torch.device(device)
        if device == self.device:
            return self
        if device not in self._on_device:
            self._on_device[device] = BigramCounts(
                self.codes.to(device), self.counts.to(device), self.vocab_size,
                separator=self.separator, interpolate=self.interpolate, meta=self.meta,
            )
        return self._on_device[device]

    # ---------------------------------------------------------------- sizes

    @property
    def device(self) -> torch.device:
        return self.codes.device

    @property
    def nnz(self) -> int:
        """Number of distinct pairs seen."""
        return int(self.codes.numel())

    @property
    def n_pairs(self) -> int:
        """Total number of pairs counted."""
        return int(self.counts.sum())

    def __repr__(self) -> str:
        return (
            f"BigramCounts(V={self.vocab_size}, pairs={self.n_pairs:,}, distinct={self.nnz:,}"
            + (f", separator={self.separator}" if self.separator is not None else "")
            + (f", interpolate={self.interpolate}" if self.interpolate else "")
            + ")"
        )

    # ---------------------------------------------------------------- derived tables

    def _get(self, name: str) -> Tensor:
        if not self._derived:
            self._build_derived()
        return self._derived[name]

    def _build_derived(self) -> None:
        V, dev = self.vocab_size, self.device
        rows = torch.div(self.codes, V, rounding_mode="floor")
        cols = self.codes - rows * V
        bounds = torch.arange(V + 1, device=dev, dtype=torch.int64) * V
        indptr = torch.searchsorted(self.codes, bounds)
        csum = torch.cat([torch.zeros(1, dtype=torch.int64, device=dev), self.counts.cumsum(0)])
        row_totals = csum[indptr[1:]] - csum[indptr[:-1]]
        col_totals = torch.zeros(V, dtype=torch.int64, device=dev).index_add_(0, cols, self.counts)
        total = int(col_totals.sum())
        unigram = (col_totals.double() / total if total else
                   torch.full((V,), 1.0 / V, dtype=torch.float64, device=dev))
        probs = self.counts.double() / row_totals[rows].clamp_min(1).double()
        self._derived.update(indptr=indptr, indices=cols, row_totals=row_totals,
                             unigram=unigram, probs=probs, probs32=probs.float())

    def unigram_probs(self) -> Float[Tensor, " V"]:
        """The back-off distribution: next-position token frequencies (uniform if empty)."""
        return self._get("unigram")

    def row_totals(self) -> Int[Tensor, " V"]:
        """How often each token occurred as the current token of a counted pair."""
        return self._get("row_totals")

    def pair_counts(
        self, cur: Int[Tensor, "*shape"], nxt: Int[Tensor, "*shape"]
    ) -> Int[Tensor, "*shape"]:
        """Counts of the pairs ``(cur, nxt)``, elementwise (0 for pairs never seen)."""
        cur, nxt = cur.to(self.device), nxt.to(self.device)
        query = cur.long() * self.vocab_size + nxt.long()
        if self.nnz == 0:
            return torch.zeros_like(query)
        pos = torch.searchsorted(self.codes, query).clamp_max(self.nnz - 1)
        return torch.where(self.codes[pos] == query, self.counts[pos], 0)

    # ---------------------------------------------------------------- the bigram model

    def _row_entries(
        self, cur: Int[Tensor, " n"], dtype: torch.dtype = torch.float64
    ) -> tuple[Int[Tensor, " m"], Int[Tensor, " m"], Float[Tensor, " m"], Bool[Tensor, " n"]]:
        """The nonzeros of the rows ``cur``: (row index into cur, column, p(next | cur), seen)."""
        indptr = self._get("indptr")
        starts = indptr[cur]
        lengths = indptr[cur + 1] - starts
        n_entries = int(lengths.sum())
        row = torch.repeat_interleave(torch.arange(cur.numel(), device=cur.device), lengths,
                                      output_size=n_entries)
        shift = torch.repeat_interleave(starts - (torch.cumsum(lengths, 0) - lengths), lengths,
                                        output_size=n_entries)
        pos = torch.arange(n_entries, device=cur.device) + shift
        probs = self._get("probs32" if dtype == torch.float32 else "probs")
        return row, self._get("indices")[pos], probs[pos], lengths > 0

    def _check_tokens(self, tokens: Tensor) -> Tensor:
        tokens = torch.as_tensor(tokens).to(self.device).long()
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.vocab_size):
            raise DataError(
                f"Token ids must lie in [0, {self.vocab_size}) for these bigram counts; got "
                f"[{int(tokens.min())}, {int(tokens.max())}]. Use the tokenizer they were "
                "counted with."
            )
        return tokens

    def _target_table(
        self, uniq: Int[Tensor, " u"], dtype: torch.dtype = torch.float32
    ) -> Float[Tensor, "u V"]:
        """Dense next-token distributions of distinct current tokens."""
        row, col, p, seen = self._row_entries(uniq, dtype=dtype)
        lam = self.interpolate
        table = self.unigram_probs().to(dtype).expand(uniq.numel(), -1).clone()
        table[seen] *= lam
        table[row, col] += (1.0 - lam) * p  # (row, col) pairs are distinct
        return table

    def next_token_probs(self, tokens: Int[Tensor, "*shape"]) -> Float[Tensor, "*shape V"]:
        """Dense next-token distributions for each current token (float32; rows sum to 1)."""
        tokens = self._check_tokens(tokens)
        uniq, inverse = torch.unique(tokens.reshape(-1), return_inverse=True)
        table = self._target_table(uniq)
        return table[inverse].view(*tokens.shape, self.vocab_size)

    def soft_cross_entropy(
        self,
        logits: Float[Tensor, "*shape V"],
        tokens: Int[Tensor, "*shape"],
        *,
        method: Literal["auto", "sparse", "dense"] = "auto",
    ) -> Float[Tensor, "*shape"]:
        """Cross-entropy ``-sum_j p(j | cur) log softmax(logits)_j`` at each position.

        ``logits[..., :]`` is the model's prediction after reading ``tokens[...]`` (the same
        shape without the vocabulary axis). Logits may be wider than ``V`` (models pad their
        vocabulary, e.g. Pythia's 50304 for a 50277-token tokenizer): padding ids get target 0. The ``"sparse"`` path gathers only each row's
        nonzero targets (plus one dense dot with the unigram for back-off and interpolation),
        so no target of size ``[..., V]`` is built; ``"dense"`` builds the target row of each
        distinct current token. ``"auto"`` picks sparse when the gathered nonzeros are fewer
        than an eighth of the positions times ``V``. Both are differentiable in ``logits``
        (float32 math) and keep no ``[positions, V]`` tensor but the logits for backward.
        """
        V, width = self.vocab_size, logits.shape[-1]
        if width < V or logits.shape[:-1] != tokens.shape:
            raise DataError(
                f"logits {tuple(logits.shape)} do not match tokens {tuple(tokens.shape)} and a "
                f"vocabulary of {V}: expected logits of shape (*tokens.shape, {V})."
            )
        bc = self.to(logits.device)
        tokens = bc._check_tokens(tokens)
        flat = logits.reshape(-1, width).float()
        cur = tokens.reshape(-1)
        if method == "auto":
            indptr = bc._get("indptr")
            nz = int((indptr[cur + 1] - indptr[cur]).sum())
            # ~5 index passes per gathered entry vs ~2 dense passes per logit
            method = "sparse" if 8 * nz < cur.numel() * width else "dense"
        if method == "dense":
            uniq, inverse = torch.unique(cur, return_inverse=True)
            table = torch.nn.functional.pad(bc._target_table(uniq), (0, width - V))
            ce = DenseSoftCE.apply(flat, table, inverse)
        elif method == "sparse":
            ce = bc._sparse_ce(flat, cur)
        else:
            raise DataError(f"method must be 'auto', 'sparse' or 'dense', got {method!r}.")
        return ce.view(tokens.shape)

    def _sparse_ce(self, logits: Float[Tensor, "n V"], cur: Int[Tensor, " n"]) -> Float[Tensor, " n"]:
        """Gathers each position's target nonzeros as flat indices into ``logits``."""
        indptr = self._get("indptr")
        starts = indptr[cur]
        lengths = indptr[cur + 1] - starts
        m = int(lengths.sum())
        # position k of the gathered entries -> its index in the CSR arrays
        pos = torch.repeat_interleave(starts - (torch.cumsum(lengths, 0) - lengths), lengths,
                                      output_size=m)
        pos += torch.arange(m, device=cur.device)
        lam = self.interpolate
        weights = self._get("probs32")[pos].mul_(1.0 - lam)
        width = logits.shape[-1]
        flat_idx = torch.repeat_interleave(
            torch.arange(cur.numel(), device=cur.device) * width, lengths, output_size=m
        )
        flat_idx += self._get("indices")[pos]
        del pos
        # weight of the unigram in each row's target: lam where seen, 1 where backed off
        uni_coef = torch.where(lengths > 0, lam, 1.0).to(torch.float32)
        unigram = torch.nn.functional.pad(self.unigram_probs().to(torch.float32),
                                          (0, width - self.vocab_size))
        return SparseSoftCE.apply(logits, flat_idx, lengths, weights, uni_coef, unigram)

    def surprisal(self, tokens: Int[Tensor, "*batch pos"]) -> Float[Tensor, "*batch pos_minus_1"]:
        """Bigram surprisal ``-log p(tokens[i+1] | tokens[i])`` in nats (float64).

        An unseen context backs off to the unigram. A seen context followed by a next token
        it was never seen with has probability 0 and surprisal ``inf`` when ``interpolate``
        is 0: the evaluation either drops those tokens (use :meth:`seen`) or scores a
        :meth:`smoothed` model. A next token absent from the whole count is ``inf`` even when
        smoothed.
        """
        tokens = self._check_tokens(tokens)
        cur, nxt = tokens[..., :-1], tokens[..., 1:]
        count = self.pair_counts(cur, nxt).double()
        total = self.row_totals()[cur].double()
        uni = self.unigram_probs()[nxt]
        lam = self.interpolate
        p_seen = (1.0 - lam) * count / total.clamp_min(1.0) + lam * uni
        p = torch.where(total > 0, p_seen, uni)
        return -torch.log(p)

    def seen(self, tokens: Int[Tensor, "*batch pos"]) -> Bool[Tensor, "*batch pos_minus_1"]:
        """Whether each pair ``(tokens[i], tokens[i+1])`` occurred in the counts."""
        tokens = self._check_tokens(tokens)
        return self.pair_counts(tokens[..., :-1], tokens[..., 1:]) > 0

    def entropy(self, per_context: bool = False) -> float | Float[Tensor, " V"]:
        """Conditional entropy ``H(next | cur)`` in nats, weighting contexts by their counts.

        With ``per_context=True``, the entropy of each row's distribution (back-off rows get
        the unigram entropy). Both honour ``interpolate``.
        """
        V, lam = self.vocab_size, self.interpolate
        uni = self.unigram_probs()
        h_uni = float(-torch.where(uni > 0, uni * uni.log(), 0.0).sum())
        rows = torch.div(self.codes, V, rounding_mode="floor")
        cols = self._get("indices")
        q = (1.0 - lam) * self._get("probs") + lam * uni[cols]
        contrib = -q * q.log()
        if lam > 0:  # columns outside each row's nonzeros carry lam * unigram
            lu = lam * uni
            a = torch.where(lu > 0, -lu * lu.log(), 0.0)
            contrib = contrib - a[cols]
        per_row = torch.zeros(V, dtype=torch.float64, device=self.device).index_add_(0, rows, contrib)
        totals = self.row_totals()
        if lam > 0:
            per_row = per_row + torch.where(totals > 0, a.sum(), 0.0)
        per_row = torch.where(totals > 0, per_row, h_uni)
        if per_context:
            return per_row
        n = int(totals.sum())
        return float((per_row * totals.double()).sum() / n) if n else h_uni

    def to_dense(self) -> Float[Tensor, "V V"]:
        """The full ``V x V`` table of ``p(next | cur)`` (float64), for small vocabularies."""
        if self.vocab_size > _DENSE_VOCAB_LIMIT:
            raise DataError(
                f"A dense {self.vocab_size} x {self.vocab_size} table is too large; use "
                "next_token_probs(tokens) for the rows you need."
            )
        dense = self.unigram_probs().expand(self.vocab_size, -1).clone()
        seen = self.row_totals() > 0
        dense[seen] *= self.interpolate
        rows = torch.div(self.codes, self.vocab_size, rounding_mode="floor")
        dense.index_put_((rows, self._get("indices")),
                         (1.0 - self.interpolate) * self._get("probs"), accumulate=True)
        return dense

    # ---------------------------------------------------------------- files

    def save(self, path: str | Path) -> Path:
        """Write ``path`` (safetensors: codes, counts) and ``path.json`` (facts); atomic."""
        path = Path(path)
        save_tensors(path, {"codes": self.codes, "counts": self.counts},
                     metadata={"format": _FORMAT})
        write_json(_sidecar(path), {
            "format": _FORMAT, "vocab_size": self.vocab_size, "separator": self.separator,
            "interpolate": self.interpolate, "nnz": self.nnz, "n_pairs": self.n_pairs,
            "meta": self.meta,
        })
        return path

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> BigramCounts:
        """Read what :meth:`save` wrote; checks that the file is complete and consistent.

        A missing, empty, truncated or inconsistent file (or sidecar) raises DataError
        naming it.
        """
        path = Path(path)
        side = _sidecar(path)
        fix = "Recount with BigramCounts.from_tokens(...) and save(path) again."
        if not path.is_file() and not side.is_file():
            raise DataError(
                f"Bigram counts {str(path)!r} (and its sidecar {side.name}) not found. Create "
                "them with BigramCounts.from_tokens(...).save(path)."
            )
        what = "Bigram-counts sidecar"
        info = read_json(side, error=DataError, what=what, fix=fix)
        require_keys(info, ("format", "vocab_size", "nnz", "n_pairs", "separator",
                            "interpolate"), side, error=DataError, what=what, fix=fix)
        if info["format"] != _FORMAT:
            raise DataError(f"{what} {str(side)!r} is not a bigram-counts sidecar (format "
                            f"{info['format']!r}). Pass the path of a file written by "
                            "BigramCounts.save.")
        t = read_tensors(path, device=str(device), error=DataError, what="Bigram counts",
                         fix=fix, required=("codes", "counts"))
        codes, counts = t["codes"], t["counts"]
        try:
            V, nnz, n_pairs = int(info["vocab_size"]), int(info["nnz"]), int(info["n_pairs"])
        except (TypeError, ValueError) as e:
            raise DataError(f"{what} {str(side)!r} has a non-integer size ({e}). {fix}") from e
        if (codes.dim() != 1 or counts.shape != codes.shape
                or codes.dtype.is_floating_point or counts.dtype.is_floating_point
                or codes.numel() != nnz or int(counts.sum()) != n_pairs
                or (codes.numel() > 1 and not bool((codes[1:] > codes[:-1]).all()))
                or (codes.numel() and (int(codes[0]) < 0 or int(codes[-1]) >= V * V))):
            raise DataError(
                f"Bigram counts {str(path)!r} are corrupt or do not match their sidecar. "
                "Recount and save again."
            )
        return cls(codes, counts, V, separator=info["separator"],
                   interpolate=info["interpolate"], meta=info.get("meta"))


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def sample_markov_chain(
    transition: Float[Tensor, "V V"],
    n_seq: int,
    seq_len: int,
    *,
    initial: Float[Tensor, " V"] | None = None,
    seed: int = 0,
) -> Int[Tensor, "n_seq seq_len"]:
    """Sequences from a known first-order Markov chain (a corpus whose true bigram is known).

    Rows of ``transition`` are ``p(next | cur)``; ``initial`` is the first token's
    distribution (uniform by default). Chains are sampled in parallel, one step at a time.
    """
    transition = torch.as_tensor(transition, dtype=torch.float64)
    V = transition.shape[0]
    if transition.shape != (V, V) or not torch.allclose(transition.sum(-1), torch.ones(V, dtype=torch.float64)):
        raise DataError("transition must be a square matrix whose rows sum to 1.")
    gen = torch.Generator().manual_seed(seed)
    init = torch.full((V,), 1.0 / V) if initial is None else torch.as_tensor(initial).double()
    out = torch.empty(n_seq, seq_len, dtype=torch.int64)
    out[:, 0] = torch.multinomial(init.float().expand(n_seq, -1), 1, generator=gen).squeeze(1)
    cdf = transition.cumsum(-1)
    cdf[:, -1] = 1.0
    for t in range(1, seq_len):
        u = torch.rand(n_seq, 1, generator=gen, dtype=torch.float64)
        nxt = torch.searchsorted(cdf[out[:, t - 1]], u, right=True).squeeze(1)
        out[:, t] = nxt.clamp_max(V - 1)
    return out
