"""Pieces every study composes: the run directory (tied to its config, artifacts checked
before any stage runs), per-stage timings, corpus + tokenizer resolution with on-disk reuse."""

from __future__ import annotations

import concurrent.futures as futures
import contextlib
import logging
import multiprocessing
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from interp.data.text import (
    Corpus,
    TokenizedCorpus,
    builtin_corpus,
    load_hf_text,
    load_text_files,
    load_tokenizer,
    tokenize_corpus,
    train_tokenizer,
)
from interp.errors import ConfigError, ModelLoadError
from interp.io import read_json, write_json
from interp.results import Result, bulky

log = logging.getLogger(__name__)


def resolve_workers(workers: int, jobs: int, device: str = "cpu") -> int:
    """How many processes run ``jobs`` independent jobs: ``workers`` if positive, else one
    per CPU core (at most one per job); always 1 on an accelerator, where one process already
    fills the device."""
    if workers < 0:
        raise ConfigError(f"workers must be >= 0 (0 = one per CPU core), got {workers}.")
    if not str(device).startswith("cpu"):
        return 1
    if not workers:
        workers = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                   else os.cpu_count() or 1)
    return max(1, min(workers, jobs))


def _worker_init(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING)


def run_parallel(jobs: Sequence[tuple[Callable, tuple]], workers: int) -> list:
    """Run independent ``(function, args)`` jobs and return their results in order.

    With ``workers`` > 1 they run in that many spawned processes, each on its share of the
    torch threads: small models gain little from a second thread but a whole core from a
    second process, and spawned workers share no OpenMP pool. Functions must be importable
    (module level) and their arguments picklable; a job's exception is raised here, after
    the other running jobs finish (what they wrote to disk is kept for a rerun).
    """
    if workers <= 1 or len(jobs) <= 1:
        return [fn(*args) for fn, args in jobs]
    import torch

    threads = max(1, torch.get_num_threads() // workers)
    ctx = multiprocessing.get_context("spawn")
    with futures.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init,
                                     initargs=(threads,)) as pool:
        pending = [pool.submit(fn, *args) for fn, args in jobs]
        try:
            return [f.result() for f in pending]
        except BaseException:
            for f in pending:
                f.cancel()
            raise


class StageTimer:
    """Seconds per stage, saved after every stage to ``timings.json``.

    A stage that wrote nothing into the run directory only reloaded finished artifacts: it
    keeps the time it took when it really ran, so a resumed or repeated run reports what its
    results cost, not how long reloading them took.
    """

    def __init__(self, out: Path):
        self.out, self.path = out, out / "timings.json"
        self.timings: dict[str, float] = (
            read_json(self.path, what="Stage timings",
                      fix="Delete it; the timings are recomputed on the next run.")
            if self.path.is_file() else {})

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


def check_run_dir(out: Path, cfg: Any) -> None:
    """Tie ``out`` to ``cfg``: refuse a directory holding another configuration's run."""
    path = out / "config.json"
    if path.is_file():
        stored = read_json(path, error=ConfigError, what="Run configuration",
                           fix="Pass a new --out, or delete the directory to start over.")
        diff = cfg.diff(stored)
        if diff:
            raise ConfigError(
                f"Run directory {str(out)!r} holds a run with another configuration (differs in: "
                f"{', '.join(diff)}). Pass a new --out, or delete the directory to start over."
            )
    write_json(path, cfg.to_dict())


def open_run_dir(out: str | Path, cfg: Any, artifacts: Iterable[str] = (),
                 read: Callable[[Path], Any] | None = None) -> Path:
    """Create the run directory ``out`` (ConfigError if a file is in the way), tie it to
    ``cfg`` (which has ``to_dict()`` and ``diff(stored)``), and read every finished artifact
    named in ``artifacts`` with ``read`` so a damaged one fails now, not stages later."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {str(out)!r} is a file, not a directory. Pass a directory.")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as e:
        raise ConfigError(f"Cannot create the run directory {str(out)!r}: {e.strerror} (a file "
                          "is in the way). Pass another --out.") from e
    check_run_dir(out, cfg)
    for name in artifacts:
        if read is not None and (out / name).is_file():
            read(out / name)
    return out


@dataclass(repr=False)
class StudyResult(Result):
    """What every study returns: where the run wrote things, and its ``metrics.json``."""

    out: Path
    report_path: Path
    metrics: dict = bulky(dict)
    figures: dict[str, Path] = bulky(dict)


def verdict(holds: bool | None) -> str:
    """A claim's ``holds`` as a word for summaries."""
    return "n/a" if holds is None else ("yes" if holds else "NO")


def claim_verdict(holds: bool | None) -> str:
    """A claim's ``holds`` as the reports' claims tables write it."""
    return "n/a (not checkable)" if holds is None else verdict(holds)


#: What to do about a damaged stage artifact.
ARTIFACT_FIX = "Delete it to recompute it (the stage reruns), or rerun with a new --out."


def read_artifact(path: Path) -> dict:
    """A stage's JSON artifact; a damaged one raises DataError saying to delete it."""
    return read_json(path, what="Study artifact", fix=ARTIFACT_FIX)


def write_figure_files(figures: dict, out: Path) -> dict[str, Path]:
    """Save every figure as ``out/figures/<name>.html``; returns the paths by name."""
    from interp.plots import save_figure

    return {name: save_figure(fig, out / "figures" / f"{name}.html")[0]
            for name, fig in figures.items()}


def run_stages(ctx: Any, stages: Sequence[tuple[str, Callable[[Any], None]]], *,
               collect: Callable[[Any], dict], checks: Callable[[dict], dict],
               write_figures: Callable[[Any, dict], dict],
               write_report: Callable[[Any, dict], Path]) -> tuple[dict, dict, Path]:
    """Run every stage in order (timed into ``timings.json``), then write ``metrics.json``
    (with the claims and timings), the figures and the report; returns all three."""
    timer = StageTimer(ctx.out)
    for name, stage in stages:
        with timer(name):
            stage(ctx)
    metrics = collect(ctx)
    metrics["claims"] = checks(metrics)
    metrics["timings"] = dict(timer.timings)
    write_json(ctx.out / "metrics.json", metrics)
    figures = write_figures(ctx, metrics)
    return metrics, figures, write_report(ctx, metrics)


def resolve_corpus(spec: str) -> Corpus:
    """'builtin', a local text file, a local data file or directory, or an HF dataset id."""
    if spec in ("builtin", "shakespeare"):
        return builtin_corpus()
    path = Path(spec)
    if path.suffix in (".txt", ".md") or (path.exists() and path.is_file() and not path.suffix):
        return load_text_files(path)
    return load_hf_text(spec)


def load_corpus_and_tokenizer(
    corpus_spec: str, vocab_size: int, run_dir: str | Path, tokenizer_spec: str | None = None
) -> tuple[Corpus, object, TokenizedCorpus]:
    """Resolve the corpus, train (or reuse) its tokenizer, tokenize with a cache in ``run_dir``.

    ``tokenizer_spec`` (an HF id or directory) replaces the trained BPE, e.g. for HF models.
    """
    run_dir = Path(run_dir)
    corpus = resolve_corpus(corpus_spec)
    if tokenizer_spec is not None:
        tok = load_tokenizer(tokenizer_spec)
    else:
        tok_dir = run_dir / f"tokenizer-{corpus.name}-{corpus.fingerprint}-{vocab_size}"
        tok = None
        if (tok_dir / "tokenizer.json").is_file():
            try:
                tok = load_tokenizer(tok_dir)
            except ModelLoadError as e:  # the run's own cached BPE: retrain it, lose nothing
                log.warning("cached tokenizer in %s is damaged (%s); training it again",
                            tok_dir, e)
        if tok is None:
            tok = train_tokenizer(corpus, vocab_size, tok_dir)
    tokens = tokenize_corpus(corpus, tok, cache_dir=run_dir / "cache")
    return corpus, tok, tokens
