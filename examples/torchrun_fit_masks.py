"""Fit a bigram subnetwork data-parallel over several processes, one per GPU (or CPU process).

    torchrun --standalone --nproc_per_node=8 examples/torchrun_fit_masks.py \\
        --model EleutherAI/pythia-160m --dtype bfloat16 --global-batch 256 --out runs/ddp
    torchrun --standalone --nproc_per_node=2 examples/torchrun_fit_masks.py --model test \\
        --steps 20 --global-batch 8 --out runs/ddp-cpu          # CPU smoke run (gloo)

Every process loads the same model and data, takes its shard of each global batch
(``interp.distributed.shard_batches``), and ``fit_masks(..., distributed=True)`` averages the
mask-logit gradients over processes, so every rank ends with the same masks: the
single-process fit on the global batch, ``--global-batch / nproc`` rows per process.
Rank 0 trains the tokenizer (presets), writes the mask set and ``summary.json`` and prints;
the others wait or stay silent. Plain ``python examples/torchrun_fit_masks.py`` trains alone.

``--model`` is an HF hub id or ``save_pretrained`` directory (GPT-2, Pythia, ...; its own
tokenizer), or a preset name (test, tiny, ...): a random-init model with a BPE trained on the
corpus, for smoke runs, or the LM of an ``interp train-lm --out DIR`` run with
``--lm-run DIR`` (same ``--preset``, ``--corpus``, ``--vocab-size`` and ``--seed``). See
docs/scale.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from analyses.studies.common import load_corpus_and_tokenizer
from interp import distributed
from interp.data.bigram import BigramCounts
from interp.data.text import iterate_batches
from interp.io import write_json
from interp.masks import ContinuousSparsification, MaskSet, fit_masks
from interp.models.checkpoints import CheckpointStore
from interp.models.lm import PRESETS, build_lm, load_hf_lm, resolve_dtype
from interp.objectives import BigramObjective


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="test", help="HF hub id or directory, or a preset")
    p.add_argument("--lm-run", default=None,
                   help="an `interp train-lm --out DIR` run: its latest checkpoint (presets)")
    p.add_argument("--corpus", default="builtin", help="'builtin', a text file or HF dataset")
    p.add_argument("--vocab-size", type=int, default=512, help="BPE size (presets)")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--global-batch", type=int, default=16,
                   help="sequences per optimizer step over all processes (divisible by them)")
    p.add_argument("--steps", type=int, default=200, help="maximum optimizer steps")
    p.add_argument("--lam", type=float, default=1.0, help="sparsity weight")
    p.add_argument("--lr", type=float, default=0.05, help="AdamW lr of the mask logits")
    p.add_argument("--temperature-factor", type=float, default=1.01)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/ddp", help="where rank 0 writes masks and summary")
    return p.parse_args(argv)


def load_model(args, dist: distributed.DistInfo, out: Path):
    """(model, tokenizer, tokens): an HF model with its tokenizer, or a preset (random init,
    or the latest checkpoint of ``--lm-run``) with a BPE trained on the corpus."""
    preset = args.model in PRESETS
    with distributed.main_first():  # rank 0 trains/caches the tokenizer and tokens first
        if preset:
            run_dir = Path(args.lm_run) if args.lm_run else out
            _, tok, tokens = load_corpus_and_tokenizer(args.corpus, args.vocab_size, run_dir)
        else:
            _, tok, tokens = load_corpus_and_tokenizer(args.corpus, args.vocab_size, out,
                                                       tokenizer_spec=args.model)
    if not preset:
        return load_hf_lm(args.model, device=dist.device, tokenizer=tok), tok, tokens
    model = build_lm(args.model, tok, seed=args.seed, device=dist.device)
    if args.lm_run:
        CheckpointStore(Path(args.lm_run) / "checkpoints").load(model=model, device=dist.device)
    return model, tok, tokens


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    dist = distributed.init()
    out = Path(args.out)
    try:
        resolve_dtype(args.dtype, dist.device, option="--dtype")
        if args.global_batch % dist.world_size:
            raise SystemExit(f"--global-batch {args.global_batch} does not divide by the "
                             f"{dist.world_size} processes; pass a multiple of it.")
        model, tok, tokens = load_model(args, dist, out)
        model.eval()
        counts = BigramCounts.from_tokens(tokens.train, vocab_size=len(tok),
                                          separator=tok.bos_token_id)
        ms = MaskSet.for_model(model, kind=ContinuousSparsification(
            temperature_factor=args.temperature_factor), seed=args.seed)
        # the same global batches on every rank (same seed), each rank its slice
        batches = distributed.shard_batches(
            lambda seed: iterate_batches(tokens.train, args.global_batch, args.seq_len,
                                         seed=seed))
        t0 = time.perf_counter()
        res = fit_masks(model, ms, BigramObjective(counts), batches, lam=args.lam, lr=args.lr,
                        max_steps=args.steps, seed=args.seed, dtype=args.dtype,
                        device=dist.device, distributed=dist.initialized)
        seconds = time.perf_counter() - t0
        summary = {
            "world_size": res.world_size, "dtype": res.dtype, "device": dist.device,
            "backend": dist.backend, "steps": res.steps, "stopped_reason": res.stopped_reason,
            "final_task_loss": res.final.get("task_loss"),
            "active_fraction": ms.active_fraction(), "seconds": round(seconds, 2),
            "tokens_per_second": round(res.steps * args.global_batch * args.seq_len / seconds),
            "global_batch": args.global_batch, "rows_per_rank": args.global_batch
            // res.world_size,
        }
        if dist.is_main:  # one writer
            ms.metadata.update({"objective": "bigram", "lambda": args.lam, "ddp": summary})
            path = ms.save(out / f"bigram-lam{args.lam:g}")
            write_json(out / "summary.json", summary)
            print(json.dumps({**summary, "masks": str(path)}, indent=2))
    finally:
        distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
