"""The bigram-subnetwork study end to end (Chang & Bergen 2025, on TransformerLens models).

corpus -> tokenizer -> LM (trained with checkpoints, or an HF model) -> sparse bigram counts
-> lambda sweep of bigram subnetworks (+ the paper's selection rule) -> optimal-pruning
subnetwork -> controls (embeddings only, random-init model) -> sufficiency, necessity,
generations, layout, overlap, residual stream, checkpoints -> metrics.json, figures,
report.html.

Every stage writes its artifact into the run directory before the next one starts, so a rerun
reuses finished work and an interrupted run resumes at the stage (or lambda, or LM
checkpoint) where it stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from interp.errors import InterpError
from interp.io import read_json, write_json

log = logging.getLogger(__name__)


@dataclass
class BigramStudyConfig:
    """Everything that defines a run; the run directory is tied to it (``config.json``)."""

    out: str = "runs/default"
    corpus: str = "builtin"
    model: str = "tiny"
    vocab_size: int = 1024
    seed: int = 0
    device: str = "cpu"
    # LM training (presets only)
    lm_steps: int = 1250
    lm_batch: int = 16
    seq_len: int = 128
    lm_lr: float = 3e-3
    lm_checkpoint_every: int = 250
    # masks
    lambdas: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0, 5.0)
    mask_steps: int = 500
    mask_lr: float = 0.05
    temperature_factor: float = 1.01
    mask_batch: int = 16
    tolerance: float = 0.04
    # evaluation
    eval_sequences: int = 64
    residual_sequences: int = 48
    checkpoint_steps: tuple[int, ...] = (250, 500)
    checkpoint_mask_steps: int = 300
    random_init_control: bool = True
    quick: bool = False

    @classmethod
    def quick_defaults(cls, **overrides) -> BigramStudyConfig:
        """The ``--quick`` run: the same pipeline, smaller (about 2-3 minutes on 2 cores)."""
        base = dict(lm_steps=400, lambdas=(0.0, 1.0), mask_steps=250, temperature_factor=1.02,
                    eval_sequences=32, residual_sequences=24, checkpoint_steps=(200,),
                    checkpoint_mask_steps=150, lm_checkpoint_every=200,
                    random_init_control=False, quick=True)
        base.update(overrides)
        return cls(**base)

    @classmethod
    def from_cli(cls, args) -> BigramStudyConfig:
        over = {"out": args.out, "corpus": args.corpus, "model": args.model,
                "seed": args.seed, "device": args.device}
        if args.vocab_size:
            over["vocab_size"] = args.vocab_size
        if args.lambdas:
            try:
                over["lambdas"] = tuple(sorted(float(x) for x in args.lambdas.split(",")))
            except ValueError as e:
                raise InterpError(f"--lambdas must be comma-separated numbers, got "
                                  f"{args.lambdas!r}") from e
        if args.lm_steps:
            over["lm_steps"] = args.lm_steps
        if args.mask_steps:
            over["mask_steps"] = args.mask_steps
        return cls.quick_defaults(**over) if args.quick else cls(**over)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["lambdas"], d["checkpoint_steps"] = list(self.lambdas), list(self.checkpoint_steps)
        return d


# Fields that do not change results: a rerun may differ in them.
_VOLATILE = {"out", "device"}


@dataclass
class BigramStudyResult:
    """Where the run wrote things, and its headline metrics."""

    out: Path
    metrics: dict
    report_path: Path
    figures: dict[str, Path] = field(default_factory=dict)

    def summary(self) -> str:
        m = self.metrics
        full, big, opt = m["full_model"], m["bigram_subnetwork"], m["optimal_subnetwork"]
        ab = m["ablation"]
        lines = [
            f"run: {self.out}",
            f"full model            r = {full['surprisal_r']:.3f}   val loss {ab['loss_full']:.3f}",
            f"bigram subnetwork     r = {big['surprisal_r']:.3f}   lambda {big['lambda']:g}, "
            f"{100 * big['active_fraction']:.2f}% of masked weights active",
            f"optimal subnetwork    {100 * opt['active_fraction']:.2f}% active",
            f"loss without bigram   {ab['loss_without_bigram']:.3f}  "
            f"({ab['loss_without_bigram'] - ab['loss_full']:+.3f})",
            f"loss without random   {ab['loss_without_random']:.3f}  "
            f"({ab['loss_without_random'] - ab['loss_full']:+.3f})",
            f"loss without optimal  {ab['loss_without_optimal']:.3f}  "
            f"({ab['loss_without_optimal'] - ab['loss_full']:+.3f})",
            f"overlap bigram/optimal {m['overlap']['ratio']:.2f}x chance "
            f"({format_p(m['overlap']['p_value'])});  first-MLP share {100 * m['layout']['first_mlp_share']:.1f}%",
            "timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in m["timings"].items()),
        ]
        return "\n".join(lines)


def format_p(p: float) -> str:
    """'p = 0.031', or 'p < 1e-14' where the exact tail is below what doubles resolve."""
    return "p < 1e-14" if p < 1e-14 else f"p = {p:.2g}"


class _Timer:
    """Seconds per stage, saved after every stage to ``timings.json``.

    A stage that wrote nothing into the run directory only reloaded finished artifacts: it
    keeps the time it took when it really ran, so a resumed or repeated run reports what its
    results cost, not how long reloading them took.
    """

    def __init__(self, out: Path):
        self.out, self.path = out, out / "timings.json"
        self.timings: dict[str, float] = read_json(self.path) if self.path.is_file() else {}

    def _files(self) -> dict[Path, int]:
        return {p: p.stat().st_mtime_ns for p in self.out.rglob("*")
                if p.is_file() and p != self.path}

    @contextlib.contextmanager
    def __call__(self, stage: str):
        log.info("stage %s", stage)
        before, t0 = self._files(), time.perf_counter()
        yield
        spent = time.perf_counter() - t0
        if self._files() != before or stage not in self.timings:
            self.timings[stage] = round(spent, 2)
        write_json(self.path, self.timings)


def _check_run_dir(out: Path, cfg: BigramStudyConfig) -> None:
    path = out / "config.json"
    new = cfg.to_dict()
    if path.is_file():
        old = read_json(path)
        diff = sorted(k for k in set(old) | set(new)
                      if k not in _VOLATILE and old.get(k) != new.get(k))
        if diff:
            raise InterpError(
                f"Run directory {str(out)!r} holds a run with another configuration (differs in: "
                f"{', '.join(diff)}). Pass a new --out, or delete the directory to start over."
            )
    write_json(path, new)


def run_bigram_study(cfg: BigramStudyConfig) -> BigramStudyResult:
    """Run (or resume) the whole study; see the module docstring for the stages."""
    from analyses.studies import _bigram_stages as S

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    _check_run_dir(out, cfg)
    torch.manual_seed(cfg.seed)
    timer = _Timer(out)
    ctx = S.StudyContext(cfg, out)

    for name, stage in S.STAGES:
        with timer(name):
            stage(ctx)
    metrics = S.collect_metrics(ctx)
    metrics["timings"] = dict(timer.timings)
    write_json(out / "metrics.json", metrics)
    figures = S.write_figures(ctx)
    report = S.write_report(ctx, metrics)
    return BigramStudyResult(out, metrics, report, figures)


def load_metrics(out: str | Path) -> dict:
    """The ``metrics.json`` of a finished run."""
    return json.loads((Path(out) / "metrics.json").read_text())
