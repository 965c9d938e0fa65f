"""GPU check and benchmark of the bigram soft cross-entropy (needs CUDA; not a test).

    python benchmarks/bench_bigram_gpu.py [--out FILE.md]     (on a CUDA machine)
    python benchmarks/bench_bigram_gpu.py --merge FILE.md      (here: into RESULTS.md)

1. Correctness on CUDA: sparse and dense soft CE (values and gradients) and surprisal agree
   with the CPU results.
2. Cost: soft CE forward + backward on logits ``[batch, 128, V]`` (sparse, dense, auto) next to
   plain LM cross-entropy and the unembedding matmul of a GPT-2-small-sized model
   (``[batch * 128, 768] @ [768, V]``, forward + backward, TF32), at the paper's batch 32.

Imports only ``interp.data.bigram`` (no TransformerLens), so it runs on a bare GPU image.
The markdown goes to stdout and, with ``--out``, to a file; ``--merge`` puts that file's
section (``bench_bigram_gpu`` markers) into ``benchmarks/RESULTS.md``, leaving the others.
"""

from __future__ import annotations

import argparse
import json
import sys
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from _results import markers, write_section

ROOT = Path(__file__).resolve().parents[1]
GPU_START, GPU_END = markers("bench_bigram_gpu")


def _import_bigram():
    """``interp.data.bigram`` without running ``interp/__init__`` (which needs TL)."""
    for name, sub in (("interp", "interp"), ("interp.data", "interp/data")):
        if name not in sys.modules:
            mod = types.ModuleType(name)
            mod.__path__ = [str(ROOT / sub)]
            sys.modules[name] = mod
    from interp.data.bigram import BigramCounts

    return BigramCounts


def zipf_stream(n: int, V: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, V + 1)
    cdf = np.cumsum(p / p.sum())
    ranks = np.searchsorted(cdf, rng.random(n), side="right").clip(max=V - 1)
    return rng.permutation(V).astype(np.int32)[ranks]


def cuda_time(fn, reps: int = 10) -> float:
    """Mean milliseconds per call (CUDA events, after 3 warm-ups)."""
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def check(BigramCounts) -> dict:
    V = 3000
    bc = BigramCounts.from_tokens(zipf_stream(200_000, V - 10, seed=1), V).smoothed(0.01)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, V, (4, 64), generator=gen)
    logits = torch.randn(4, 64, V, generator=gen)
    out = {}
    ref_x = logits.clone().requires_grad_(True)
    ref = bc.soft_cross_entropy(ref_x, tokens, method="sparse")
    ref.sum().backward()
    for method in ("sparse", "dense"):
        x = logits.cuda().clone().requires_grad_(True)
        ce = bc.soft_cross_entropy(x, tokens.cuda(), method=method)
        ce.sum().backward()
        out[f"{method}_value_maxdiff"] = float((ce.detach().cpu() - ref.detach()).abs().max())
        out[f"{method}_grad_maxdiff"] = float((x.grad.cpu() - ref_x.grad).abs().max())
    s_cpu = bc.surprisal(tokens)
    s_gpu = bc.to("cuda").surprisal(tokens.cuda()).cpu()
    out["surprisal_equal"] = bool(torch.equal(torch.isinf(s_cpu), torch.isinf(s_gpu))) and float(
        (s_cpu - s_gpu)[torch.isfinite(s_cpu)].abs().max()) < 1e-9
    out["ok"] = all(v < 1e-4 for k, v in out.items() if k.endswith("maxdiff")) and out[
        "surprisal_equal"]
    return out


def bench(BigramCounts, V: int, batch: int, n_count: int) -> dict:
    stream = zipf_stream(n_count, V, seed=V)
    bc = BigramCounts.from_tokens(stream, V).to("cuda")
    gen = torch.Generator().manual_seed(0)
    starts = torch.randint(0, n_count - 128, (batch,), generator=gen)
    tokens = torch.stack([torch.from_numpy(stream[s : s + 128].astype(np.int64))
                          for s in starts]).cuda()
    logits0 = torch.randn(batch, 128, V, device="cuda")
    h = torch.randn(batch * 128, 768, device="cuda")
    w_u = torch.randn(768, V, device="cuda", requires_grad=True)

    def soft(method):
        def run():
            x = logits0.clone().requires_grad_(True)
            bc.soft_cross_entropy(x, tokens, method=method).mean().backward()
        return run

    def plain():
        x = logits0.clone().requires_grad_(True)
        F.cross_entropy(x.view(-1, V), tokens.view(-1)).backward()

    def unembed():
        (h @ w_u).sum().backward()

    indptr = bc._get("indptr")
    fill = float((indptr[tokens + 1] - indptr[tokens]).sum()) / (tokens.numel() * V)
    torch.backends.cuda.matmul.allow_tf32 = True
    res = {"V": V, "batch": batch, "fill": fill, "ce_ms": cuda_time(plain),
           "unembed_ms": cuda_time(unembed)}
    for method in ("sparse", "dense", "auto"):
        res[f"{method}_ms"] = cuda_time(soft(method))
    return res


def markdown(device: str, checks: dict, rows: list[dict]) -> str:
    lines = [
        GPU_START,
        "## Bigram objective on a GPU (`benchmarks/bench_bigram_gpu.py`)",
        "",
        (f"Device: {device}, torch {torch.__version__}. CUDA results match the CPU ones: "
        f"{'yes' if checks['ok'] else 'NO'} (max |diff| of values and gradients "
        f"{max(v for k, v in checks.items() if k.endswith('maxdiff')):.1e}). Mean of 10 calls "
        "after 3 warm-ups, CUDA events; logits [batch, 128, V] fp32, forward + backward."),
        "",
        ("| V | batch | target fill | plain LM CE | soft CE sparse | soft CE dense | soft CE auto "
        "| unembedding fwd+bwd (d_model 768, TF32) | auto / plain CE |"),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['V']:,} | {r['batch']} | {r['fill']:.1%} | {r['ce_ms']:.2f} ms | "
            f"{r['sparse_ms']:.2f} ms | {r['dense_ms']:.2f} ms | {r['auto_ms']:.2f} ms | "
            f"{r['unembed_ms']:.2f} ms | {r['auto_ms'] / r['ce_ms']:.1f} |"
        )
    lines.append(GPU_END)
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="also write the markdown here")
    parser.add_argument("--merge", default=None,
                        help="merge a markdown file written by --out into RESULTS.md and exit")
    parser.add_argument("--tokens", type=int, default=20_000_000)
    args = parser.parse_args()
    if args.merge:
        sys.path.insert(0, str(ROOT / "benchmarks"))

        write_section(Path(args.merge).read_text(), "bench_bigram_gpu")
        return
    if not torch.cuda.is_available():
        raise SystemExit("bench_bigram_gpu needs a CUDA device.")
    BigramCounts = _import_bigram()
    checks = check(BigramCounts)
    print(json.dumps(checks), flush=True)
    rows = [bench(BigramCounts, V, batch, args.tokens)
            for V in (4096, 50257) for batch in (16, 32)]
    for r in rows:
        print(json.dumps(r), flush=True)
    text = markdown(torch.cuda.get_device_name(), checks, rows)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
