"""Benchmark: peak memory of a mask-training step vs a plain training step, and of streaming
analyses vs the number of tokens.

    python benchmarks/bench_memory.py [--device cpu] [--layers 12] [--batches 2x64,8x128]
                                      [--stream-tokens 16384,131072,1048576] [--quick]

Part 1, training steps, on the ``tiny`` preset and a random Pythia-160M-shaped GPT-NeoX
(built from a ``GPTNeoXConfig``, saved with ``save_pretrained`` and reloaded through
``load_hf_lm``; ``--layers`` keeps the width and cuts the depth). Each case runs in a fresh
process that loads the model and measures the peak of live tensor bytes over two steps (the
first allocates the optimizer state) above what existed before them (the model's weights).
Fresh processes, because the bridge keeps the last forward pass's attention pattern (and
through its autograd graph, the mask logits and their gradients) until the next forward
pass, so a case measured after another would see that memory freed and read low.

- ``plain``: forward + backward + fused AdamW on all of the model's weights;
- ``CS element``, ``HC element``: :func:`~interp.masks.fit_masks` (2 steps, one statistics
  check) with a continuous-sparsification / hard-concrete mask on every weight of every
  attention and MLP matrix; the case includes building the mask set;
- ``CS structured``, ``HC structured``: the same with ``granularity="structured"`` (one
  logit per attention head and per MLP neuron).

Part 2, streaming: :func:`~analyses.residual.residual_analysis` on the ``tiny`` preset over
growing token counts (peak flat), the same residual covariances from a full activation
cache (the negative control: it grows), and one pass of
:func:`~interp.probes.iter_activations` over a model with Pythia's 50k vocabulary with the
forward pass stopped after the last requested hook (default) vs run to the logits.

Measurement (:mod:`interp.memory`): on a CPU, torch's allocator events recorded by
``torch.profiler`` (tracemalloc cannot see torch tensors); on a GPU,
``torch.cuda.max_memory_allocated``. Memory does not depend on contention, so the shared
cores slow the benchmark but do not change its numbers. The table replaces this benchmark's
section of ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from _results import machine_info, markers, write_section

from analyses.residual import residual_analysis
from interp.data.text import load_tokenizer
from interp.masks import ContinuousSparsification, HardConcrete, MaskSet, fit_masks
from interp.memory import peak_memory
from interp.models.lm import build_lm, lm_loss, load_hf_lm
from interp.probes import iter_activations, residual_hook_names

log = logging.getLogger("bench_memory")

START, END = markers("bench_memory")
PYTHIA_160M = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
               "intermediate_size": 3072, "vocab_size": 50304, "max_position_embeddings": 2048}
MB = 2 ** 20
STEPS = 2


# --------------------------------------------------------------------------- cases


def _bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def _objective(model, tokens):
    return lm_loss(model(tokens), tokens)


def plain_case(model, tokens: torch.Tensor) -> Callable[[], None]:
    """Forward + backward + fused AdamW on all weights (eval mode: no dropout, as fit_masks)."""

    def run() -> None:
        params = list(model.parameters())
        flags = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(params, lr=1e-5, fused=tokens.device.type in ("cpu", "cuda"))
        try:
            for _ in range(STEPS):
                opt.zero_grad(set_to_none=True)
                _objective(model, tokens).backward()
                opt.step()
        finally:
            opt.zero_grad(set_to_none=True)
            for p, f in zip(params, flags):
                p.requires_grad_(f)

    return run


def mask_case(model, tokens: torch.Tensor, kind_cls, granularity: str
              ) -> Callable[[], MaskSet]:
    """``fit_masks`` for two steps on a fresh mask set over every attention/MLP matrix."""

    def run() -> MaskSet:
        ms = MaskSet.for_model(model, kind=kind_cls(), granularity=granularity)
        fit_masks(model, ms, _objective, [tokens], lam=1.0, max_steps=STEPS, stop_rule=False,
                  check_every=STEPS, progress=False)
        return ms

    return run


def measure(fn: Callable, device: torch.device) -> tuple[int, float, object]:
    """(peak bytes above the entry level, seconds, what fn returned)."""
    gc.collect()
    t = time.perf_counter()
    with peak_memory(device) as m:
        out = fn()
    return m.torch_peak, time.perf_counter() - t, out


CASES = [("plain", None, None), ("CS element", ContinuousSparsification, "element"),
         ("HC element", HardConcrete, "element"),
         ("CS structured", ContinuousSparsification, "structured"),
         ("HC structured", HardConcrete, "structured")]


def run_case(spec: dict) -> dict:
    """One case in this process: load the model described by ``spec``, measure, report."""
    device = torch.device(spec["device"])
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    if spec["model"] == "tiny":
        tok = load_tokenizer(spec["path"])
        model, vocab = build_lm("tiny", tok, seed=0, device=device), len(tok)
    else:
        model, vocab = load_hf_lm(spec["path"], device=device), spec["vocab"]
    model.eval()
    tokens = _tokens(vocab, tuple(spec["batch"]), device)
    _, kind_cls, gran = next(c for c in CASES if c[0] == spec["case"])
    fn = plain_case(model, tokens) if kind_cls is None else mask_case(
        model, tokens, kind_cls, gran)
    peak, secs, out = measure(fn, device)
    res = {"peak": peak, "seconds": secs,
           "model_bytes": _bytes([*model.parameters(), *model.buffers()])}
    if isinstance(out, MaskSet):
        res.update(masked_weights=out.n_weights, logits=out.n_logits)
    return res


def bench_model(label: str, spec: dict) -> dict:
    """Every case of ``CASES`` for one model and batch, each in its own process."""
    batch = spec["batch"]
    row = {"model": label, "batch": f"{batch[0]} x {batch[1]}"}
    for name, _, _ in CASES:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--case",
               json.dumps({**spec, "case": name})]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"case {name} failed:\n{done.stderr[-3000:]}")
        res = json.loads(done.stdout.strip().splitlines()[-1])
        row[name] = res["peak"]
        row["model_bytes"] = res["model_bytes"]
        if "masked_weights" in res:
            row["masked_weights"] = res["masked_weights"]
            row[f"{name} logits"] = res["logits"]
        log.info("%s %s %s: %.1f MiB above the model (%.1f s)", label, row["batch"], name,
                 res["peak"] / MB, res["seconds"])
    return row


def _tokens(vocab: int, batch: tuple[int, int], device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, batch, generator=g).to(device)


def _tokenizer(tmp: Path):
    from interp.data.text import builtin_corpus, train_tokenizer

    text = "\n".join(builtin_corpus().train)[:300_000]
    return train_tokenizer([text], vocab_size=1024, out_dir=tmp / "tok")


def _save_neox(tmp: Path, layers: int, **over) -> tuple[Path, int]:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    cfg = {**PYTHIA_160M, "num_hidden_layers": layers, **over}
    path = tmp / f"neox-{layers}-{cfg['hidden_size']}"
    GPTNeoXForCausalLM(GPTNeoXConfig(**cfg)).eval().save_pretrained(path)
    gc.collect()
    return path, cfg["vocab_size"]


def _neox(tmp: Path, layers: int, device: torch.device, **over):
    path, vocab = _save_neox(tmp, layers, **over)
    return load_hf_lm(path, device=device), vocab


# --------------------------------------------------------------------------- streaming


def _cached_covariances(model, batches) -> None:
    """Residual covariances from a full activation cache (what streaming never does)."""
    names = residual_hook_names(model)
    cache = []
    with torch.no_grad():
        for tokens in batches:
            _, acts = model.run_with_cache(tokens, names_filter=lambda n: n in names)
            cache.append({h: acts[h] for h in names})
    for h in names:
        x = torch.cat([c[h].flatten(0, 1) for c in cache]).double()
        torch.cov(x.T)


def bench_streaming(tok, device: torch.device, token_counts: list[int],
                    control_counts: list[int], tmp: Path) -> dict:
    model = build_lm("tiny", tok, seed=0, device=device).eval()
    batch = (16, 128)
    per = batch[0] * batch[1]

    def batches(n: int) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(1)
        return [torch.randint(0, len(tok), batch, generator=g).to(device)
                for _ in range(max(1, n // per))]

    residual_analysis(model, batches(per), progress=False)  # the same state before each case
    rows = []
    for n in token_counts:
        bs = batches(n)
        peak, secs, _ = measure(lambda bs=bs: residual_analysis(model, bs, progress=False),
                                device)
        rows.append({"case": "residual_analysis (streaming)", "tokens": len(bs) * per,
                     "peak": peak, "seconds": secs})
        log.info("streaming %d tokens: %.2f MiB (%.0f s)", len(bs) * per, peak / MB, secs)
        del bs
    for n in control_counts:
        bs = batches(n)
        peak, secs, _ = measure(lambda bs=bs: _cached_covariances(model, bs), device)
        rows.append({"case": "full activation cache (control)", "tokens": len(bs) * per,
                     "peak": peak, "seconds": secs})
        log.info("cached %d tokens: %.2f MiB", len(bs) * per, peak / MB)
        del bs
    big, vocab = _neox(tmp, 2, device, hidden_size=128, num_attention_heads=4,
                       intermediate_size=512)
    big.eval()
    g = torch.Generator().manual_seed(2)
    bs = [torch.randint(0, vocab, (8, 128), generator=g).to(device) for _ in range(4)]
    names = residual_hook_names(big)
    for _ in iter_activations(big, bs[:1], names, progress=False, stop_early=False):
        pass
    stop = {}
    for early in (True, False):
        def run(early=early) -> None:
            for _ in iter_activations(big, bs, names, progress=False, stop_early=early):
                pass

        stop[early], _, _ = measure(run, device)
    return {"rows": rows, "stop_early": stop[True], "full_forward": stop[False],
            "vocab": vocab, "stop_batch": "8 x 128"}


# --------------------------------------------------------------------------- report


def _mb(b: int) -> str:
    return f"{b / MB:,.1f}"


def markdown(info: dict, rows: list[dict], stream: dict | None, layers: int) -> str:
    where = info.get("gpu", f"{info['cpu']}, {info['cores']} cores (shared with other jobs; "
                            f"contention changes time, not memory), torch threads "
                            f"{info['threads']}")
    names = [c[0] for c in CASES]
    lines = [
        START,
        "## Peak memory: mask step vs plain step, streaming analyses "
        "(`benchmarks/bench_memory.py`)",
        "",
        f"Machine: {where}; torch {info['torch']}; device `{info['device']}`. Peak bytes of "
        "live torch tensors during two training steps, above the model's own weights "
        "(CPU: torch's allocator events via `torch.profiler`, `interp.memory.peak_memory`), "
        "MiB; in brackets the ratio to the plain step. Total = the model's weights plus the "
        "peak, what a device must hold.",
        "",
        "| model | batch | model weights | masked weights | " + " | ".join(names)
        + " | total: CS element / plain | total: CS structured / plain |",
        "|---|---|---|---|" + "---|" * len(names) + "---|---|",
    ]
    for r in rows:
        cells = []
        for n in names:
            ratio = "" if n == "plain" else f" ({r[n] / r['plain']:.2f}x)"
            cells.append(f"{_mb(r[n])}{ratio}")
        tot = r["model_bytes"] + r["plain"]
        lines.append(
            f"| {r['model']} | {r['batch']} | {_mb(r['model_bytes'])} | "
            f"{r['masked_weights']:,} | " + " | ".join(cells)
            + f" | **{(r['model_bytes'] + r['CS element']) / tot:.2f}x** "
            f"| **{(r['model_bytes'] + r['CS structured']) / tot:.2f}x** |")
    per_weight = [(r["CS element"] - r["CS structured"]) / r["masked_weights"] for r in rows]
    logits = rows[0].get("CS structured logits") if rows else None
    notes = [
        "plain: forward + backward + fused AdamW on every weight of the model (embeddings "
        "included), eval mode as in `fit_masks`; CS / HC: `fit_masks` with continuous "
        "sparsification / hard concrete on every attention and MLP matrix, two steps and one "
        "statistics check, mask set built inside the measured block; element: one logit per "
        "weight; structured: one per attention head and MLP neuron "
        f"(`granularity=\"structured\"`: {logits:,} logits for the tiny preset)." if logits
        else "",
        "Elementwise masks add, per masked weight, float32 logits, their gradient and "
        "AdamW's two moments (16 bytes), and where the peak falls in the backward pass the "
        "soft mask it keeps: measured "
        + ", ".join(f"{b:.1f}" for b in per_weight)
        + " bytes per masked weight more than structured masks (rows in table order). Hard "
        "concrete keeps more for its backward pass (the sampled noise and the clamp).",
        "Both granularities hold the bool `allowed` buffer (1 byte per masked weight) and "
        "the masked weights `W * m` that `fit_masks` caches for the step (4 bytes, "
        "`parametrize.cached()`); structured logits and their AdamW state are a few "
        "thousand numbers. The plain step's gradients and AdamW moments cost 12 bytes per "
        "weight of the whole model (embeddings included).",
        "Where the peak falls: at a small batch, in the optimizer phase (gradients and AdamW "
        "state), so the step's own state decides the ratio; at 8 x 128 the forward pass's "
        "activations (the [8, 128, 50,304] logits three times over: logits, log-softmax, "
        "their gradient) reach the same size and the ratios move toward 1.",
        "The model weights of the GPT-NeoX bridge include its stale fused `query_key_value` "
        "copy (docs/CONTRACTS.md): 81 MiB of the 700 MiB.",
    ]
    if layers != PYTHIA_160M["num_hidden_layers"]:
        notes.append(f"The Pythia-160M shape is cut to {layers} layers (same width, "
                     "d_model 768, d_mlp 3072, vocab 50,304) to fit the CPU time.")
    lines += ["", *(f"- {n}" for n in notes if n)]
    if stream:
        lines += [
            "",
            "### Streaming analyses: peak memory vs tokens",
            "",
            "`residual_analysis` on the `tiny` preset (2 layers, d_model 128, vocab 1,024), "
            "batches of 16 x 128 tokens, vs the same residual covariances computed from a "
            "full activation cache (`run_with_cache` per batch, kept, then stacked).",
            "",
            "| case | tokens | peak MiB | seconds |",
            "|---|---|---|---|",
        ]
        for r in stream["rows"]:
            lines.append(f"| {r['case']} | {r['tokens']:,} | {r['peak'] / MB:,.2f} | "
                         f"{r['seconds']:.0f} |")
        lines += [
            "",
            f"- One pass of `iter_activations` over the residual stream of a 2-layer GPT-NeoX "
            f"(d_model 128) with Pythia's vocabulary ({stream['vocab']:,}), batch "
            f"{stream['stop_batch']}: peak {_mb(stream['stop_early'])} MiB when the forward "
            f"pass stops after the last requested hook (the default) vs "
            f"{_mb(stream['full_forward'])} MiB run to the logits (`stop_early=False`).",
            "- Seconds include the profiler's overhead.",
        ]
    lines.append(END)
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--layers", type=int, default=12, help="depth of the 160M shape")
    parser.add_argument("--batches", default="2x64,8x128",
                        help="160M-shape batches (BxT, comma-separated)")
    parser.add_argument("--stream-tokens", default="16384,131072,1048576")
    parser.add_argument("--control-tokens", default="16384,131072")
    parser.add_argument("--quick", action="store_true", help="tiny model and small counts")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--json", default=None, help="also write the measurements here")
    parser.add_argument("--render", default=None,
                        help="write RESULTS.md from a --json file, measuring nothing")
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)  # internal: one case
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(json.loads(args.case))))
        return
    if args.render:
        saved = json.loads(Path(args.render).read_text())
        text = markdown(saved["info"], saved["rows"], saved["stream"], saved["layers"])
        print(text)
        if not args.no_write:
            write_section(text, "bench_memory")
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    info = machine_info(device)
    counts = [int(x) for x in args.stream_tokens.split(",")]
    controls = [int(x) for x in args.control_tokens.split(",")]
    if args.quick:
        counts, controls = [4096, 16384], [4096, 16384]
    rows = []
    base = {"device": str(device), "threads": args.threads}
    with tempfile.TemporaryDirectory() as tmp:
        tok = _tokenizer(Path(tmp))
        rows.append(bench_model("tiny preset (2L, d_model 128)",
                                {**base, "model": "tiny", "path": str(Path(tmp) / "tok"),
                                 "batch": [16, 128]}))
        if not args.quick:
            path, vocab = _save_neox(Path(tmp), args.layers)
            label = (f"Pythia-160M shape (random GPT-NeoX"
                     f"{'' if args.layers == 12 else f', {args.layers} of 12 layers'})")
            for b in args.batches.split(","):
                batch = [int(x) for x in b.lower().split("x")]
                rows.append(bench_model(label, {**base, "model": "neox", "path": str(path),
                                                "vocab": vocab, "batch": batch}))
        stream = bench_streaming(tok, device, counts, controls, Path(tmp))
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"info": info, "rows": rows, "stream": stream, "layers": args.layers}, indent=1))
    text = markdown(info, rows, stream, args.layers)
    print(text)
    if not args.no_write:
        write_section(text, "bench_memory")


if __name__ == "__main__":
    main()
