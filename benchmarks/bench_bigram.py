"""Benchmark: bigram counting throughput and the cost of the bigram objective per mask step.

    python benchmarks/bench_bigram.py [--tokens 20000000] [--quick]

1. Counting: ``BigramCounts.from_tokens`` vs ``collections.Counter(zip(a, a[1:]))`` (the
   straightforward way, on a prefix, rate extrapolated) and scipy's COO -> CSR duplicate sum,
   on an i.i.d. Zipfian stream (the worst case for distinct pairs) at V = 4k and 50k.
2. Objective: soft cross-entropy to the bigram distribution, forward + backward on logits
   ``[16, 128, V]`` (sparse, dense and auto paths), next to a plain forward + backward of the
   ``tiny`` preset LM with ``d_vocab = V`` (the mask-training step without masks, which cost
   nothing measurable per research/platform.md) and next to plain LM cross-entropy on the same
   logits.

Ratios are measured side by side in one process. The table replaces this benchmark's own
section of ``benchmarks/RESULTS.md`` (between its markers) and leaves other sections alone.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import logging
import os
import platform
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from _results import markers, write_section

from interp.data.bigram import BigramCounts
from interp.models.lm import PRESETS, lm_loss

log = logging.getLogger("bench_bigram")

START, END = markers("bench_bigram")


def tiny_lm(V: int):
    """The ``tiny`` preset with ``d_vocab = V`` and no tokenizer (bridges boot without one)."""
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    c = PRESETS["tiny"]
    cfg = TransformerBridgeConfig(
        n_layers=c.n_layers, d_model=c.d_model, n_heads=c.n_heads, d_head=c.d_head,
        d_mlp=c.d_mlp, d_vocab=V, n_ctx=c.n_ctx, act_fn=c.act_fn,
        normalization_type=c.normalization_type,
        positional_embedding_type=c.positional_embedding_type, seed=0,
    )
    torch.manual_seed(0)
    return TransformerBridge.boot_native(cfg, tokenizer=None)


def zipf_stream(n: int, V: int, seed: int = 0) -> np.ndarray:
    """i.i.d. tokens with p(rank r) ~ 1/r, ids shuffled so frequency is not id order."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, V + 1)
    cdf = np.cumsum(p / p.sum())
    ranks = np.searchsorted(cdf, rng.random(n), side="right").clip(max=V - 1)
    return rng.permutation(V).astype(np.int32)[ranks]


def timed(fn, reps: int = 3, clock=time.perf_counter) -> float:
    """Best of ``reps`` calls after one warm-up (the least disturbed by other jobs)."""
    fn()
    out = []
    for _ in range(reps):
        gc.collect()
        t = clock()
        fn()
        out.append(clock() - t)
    return min(out)


def machine_info() -> dict:
    model = next((line.split(":", 1)[1].strip() for line in
                  Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    return {"cpu": model, "cores": os.cpu_count(), "torch": torch.__version__,
            "numpy": np.__version__, "threads": torch.get_num_threads()}


# --------------------------------------------------------------------------- counting


def bench_counting(n: int, V: int, n_ref: int) -> dict:
    a = zipf_stream(n, V, seed=V)
    ours = timed(lambda: BigramCounts.from_tokens(a, V), reps=3)
    ours_cpu = timed(lambda: BigramCounts.from_tokens(a, V), reps=2, clock=time.process_time)
    bc = BigramCounts.from_tokens(a, V)
    prefix = a[:n_ref].tolist()
    t = time.perf_counter()
    ref = Counter(itertools.pairwise(prefix))
    counter = time.perf_counter() - t

    def scipy_csr():
        import scipy.sparse as sp

        m = sp.coo_matrix((np.ones(n - 1, np.int64), (a[:-1], a[1:])), shape=(V, V)).tocsr()
        m.sum_duplicates()
        return m

    sci = timed(scipy_csr, reps=1)
    small = BigramCounts.from_tokens(a[:n_ref], V)
    assert sum(ref.values()) == small.n_pairs and len(ref) == small.nnz, "counts disagree"
    return {"V": V, "tokens": n, "nnz": bc.nnz, "ours_s": ours, "ours_rate": n / ours,
            "ours_cpu_rate": n / ours_cpu,
            "counter_rate": n_ref / counter, "scipy_rate": n / sci, "counts": bc}


# --------------------------------------------------------------------------- objective


def bench_objective(bc: BigramCounts, stream: np.ndarray, V: int, reps: int,
                    label: str | None = None) -> dict:
    batch, pos = 16, 128
    gen = torch.Generator().manual_seed(0)
    starts = torch.randint(0, len(stream) - pos, (batch,), generator=gen)
    tokens = torch.stack([torch.from_numpy(stream[s : s + pos].astype(np.int64)) for s in starts])
    model = tiny_lm(V)
    model.train()

    def model_step():
        model.zero_grad(set_to_none=True)
        lm_loss(model(tokens), tokens).backward()

    logits0 = torch.randn(batch, pos, V, generator=gen)

    def objective(method):
        def run():
            x = logits0.clone().requires_grad_(True)
            bc.soft_cross_entropy(x, tokens, method=method).mean().backward()
        return run

    def plain_ce():
        x = logits0.clone().requires_grad_(True)
        F.cross_entropy(x[:, :-1].reshape(-1, V), tokens[:, 1:].reshape(-1)).backward()

    indptr = bc._get("indptr")
    fill = float((indptr[tokens + 1] - indptr[tokens]).sum()) / (tokens.numel() * V)
    out = {"V": V, "data": label or "Zipf", "fill": fill, "model_s": timed(model_step, reps),
           "ce_s": timed(plain_ce, reps)}
    for method in ("sparse", "dense", "auto"):
        out[f"{method}_s"] = timed(objective(method), reps)
    return out


def bench_real(reps: int, vocab_size: int = 1024) -> dict:
    """The objective at the study's setting: Shakespeare with a trained BPE."""
    from interp.data.text import builtin_corpus, load_tokenizer, tokenize_corpus, train_tokenizer

    cache = Path(__file__).resolve().parents[1] / ".cache" / "bench_bigram"
    corpus = builtin_corpus()
    tok_dir = cache / f"tokenizer-{vocab_size}"
    tok = (load_tokenizer(tok_dir) if (tok_dir / "tokenizer.json").is_file()
           else train_tokenizer(corpus, vocab_size, tok_dir))
    tokens = tokenize_corpus(corpus, tok, cache_dir=cache)
    bc = BigramCounts.from_tokens(tokens.train, len(tok))
    return bench_objective(bc, tokens.validation.numpy(), len(tok), reps, label="Shakespeare")


# --------------------------------------------------------------------------- report


def markdown(info: dict, counting: list[dict], objective: list[dict], n: int) -> str:
    lines = [
        START,
        "## Bigram counts and the bigram objective (`benchmarks/bench_bigram.py`)",
        "",
        (f"Machine: {info['cpu']}, {info['cores']} cores shared with other jobs while measured, "
        f"torch {info['torch']} ({info['threads']} threads), numpy {info['numpy']}. Best of "
        f"{info['reps']} runs after a warm-up; "
        "absolute times are noisy on shared cores, the ratios measured side by side are the "
        "result."),
        "",
        f"### Counting throughput ({n / 1e6:.0f}M i.i.d. Zipfian tokens)",
        "",
        ("| V | distinct pairs | BigramCounts (wall) | BigramCounts (CPU time) | Counter(zip) | "
        "scipy COO->CSR | vs Counter |"),
        "|---|---|---|---|---|---|---|",
    ]
    for r in counting:
        lines.append(
            f"| {r['V']:,} | {r['nnz']:,} | {r['ours_rate'] / 1e6:.1f}M tok/s "
            f"({r['ours_s']:.2f} s) | {r['ours_cpu_rate'] / 1e6:.1f}M tok/s | "
            f"{r['counter_rate'] / 1e6:.2f}M tok/s | "
            f"{r['scipy_rate'] / 1e6:.1f}M tok/s | {r['ours_rate'] / r['counter_rate']:.0f}x |"
        )
    lines += [
        "",
        ("Counter runs on a prefix (rate extrapolated; its list conversion is not timed). "
        "BigramCounts accumulates one dense bincount table when V^2 <= 2^24 and the stream is "
        "long enough to fill it, else sorts uint32 pair codes (int64 above V = 65535) in "
        "chunks of 2^25 tokens and merges them. CPU-time rates are less disturbed by the other "
        "jobs on the shared cores than wall-clock rates (counting is single-threaded)."),
        "",
        "### Bigram objective per mask-training step (logits [16, 128, V], forward + backward)",
        "",
        ("| V | data | target fill | model fwd+bwd | plain LM CE | soft CE sparse | soft CE dense "
        "| soft CE auto | auto / plain CE | auto / model step |"),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in objective:
        lines.append(
            f"| {r['V']:,} | {r['data']} | {r['fill']:.1%} | {r['model_s'] * 1e3:.0f} ms | "
            f"{r['ce_s'] * 1e3:.0f} ms | {r['sparse_s'] * 1e3:.0f} ms | "
            f"{r['dense_s'] * 1e3:.0f} ms | {r['auto_s'] * 1e3:.0f} ms | "
            f"{r['auto_s'] / r['ce_s']:.1f} | {r['auto_s'] / r['model_s']:.2f} |"
        )
    lines += [
        "",
        ("Model step: the `tiny` preset (2 layers, d_model 128) with `d_vocab = V`, forward + "
        "backward with LM loss, no masks. Target fill: nonzero bigram targets gathered per "
        "position / V (i.i.d. Zipf counts make frequent rows nearly dense, a worst case for "
        "the sparse path). Shakespeare: the built-in corpus with a trained 1024-token BPE "
        "(the study's setting), counts over its 1.9M training tokens, batch from validation. "
        "Both soft-CE paths are custom autograd functions: log-sum-exp forward and one dense "
        "`softmax - target` pass backward, like plain CE, plus gathering the target nonzeros "
        "(sparse) or the target rows of the batch's distinct tokens (dense)."),
        END,
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=20_000_000)
    parser.add_argument("--counter-tokens", type=int, default=2_000_000)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="2M tokens, 1 rep (smoke test)")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    n = 2_000_000 if args.quick else args.tokens
    n_ref = min(n, 200_000 if args.quick else args.counter_tokens)
    reps = 1 if args.quick else args.reps
    info = machine_info() | {"reps": reps}
    counting, objective = [], []
    for V in (4096, 50257):
        c = bench_counting(n, V, n_ref)
        log.info("V=%d counting: %.1fM tok/s (Counter %.2fM tok/s)", V, c["ours_rate"] / 1e6,
                 c["counter_rate"] / 1e6)
        stream = zipf_stream(n, V, seed=V)
        o = bench_objective(c.pop("counts"), stream, V, reps)
        log.info("V=%d objective: %s", V, {k: round(v, 4) if isinstance(v, float) else v for k, v in o.items()})
        counting.append(c)
        objective.append(o)
        del stream
        gc.collect()
    objective.insert(0, bench_real(reps))
    text = markdown(info, counting, objective, n)
    print(text)
    if not args.no_write:
        write_section(text, "bench_bigram")


if __name__ == "__main__":
    main()
