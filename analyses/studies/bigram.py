"""The bigram-subnetwork study end to end (Chang & Bergen 2025, on TransformerLens models).

corpus -> tokenizer -> LM (trained with checkpoints, or an HF model) -> sparse bigram counts
-> lambda sweep of bigram subnetworks (+ the paper's selection rule) -> optimal-pruning
subnetwork -> controls (embeddings only, random-init model) -> sufficiency, necessity,
generations, layout, overlap (overall and per layer), residual stream, checkpoints ->
metrics.json, figures, report.html.

Every stage writes its artifact into the run directory before the next one starts, so a rerun
reuses finished work and an interrupted run resumes at the stage (or lambda, or LM
checkpoint) where it stopped. The modules: :mod:`._bigram_config` (config and recipes, a
leaf), :mod:`._bigram_stages` (the stages table), :mod:`._bigram_report` (figures, report).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from analyses.studies._bigram_config import RECIPES, BigramStudyConfig, MaskRecipe
from analyses.studies._bigram_report import checks, write_figures, write_report
from analyses.studies._bigram_stages import STAGES, StudyContext, collect_metrics, read_artifact
from analyses.studies.common import StudyResult, open_run_dir, run_stages, verdict
from interp.io import read_json
from interp.report import format_p

__all__ = ["RECIPES", "BigramStudyConfig", "BigramStudyResult", "MaskRecipe", "load_metrics",
           "run_bigram_study"]

log = logging.getLogger(__name__)


@dataclass(repr=False)
class BigramStudyResult(StudyResult):
    """Where the run wrote things, and its metrics (``metrics.json``)."""

    def summary_rows(self) -> list[tuple[str, Any]]:
        m = self.metrics
        big, ab = m["bigram_subnetwork"], m["ablation"]
        return [("run", str(self.out)), ("recipe", m["recipe"]["name"]),
                ("full model r", m["full_model"]["surprisal_r"]),
                ("bigram subnetwork r", big["surprisal_r"]), ("λ", big["lambda"]),
                ("active fraction", big["active_fraction"]),
                ("loss without bigram − full", ab["loss_without_bigram"] - ab["loss_full"]),
                ("overlap with optimal (x chance)", m["overlap"]["ratio"]),
                ("claims holding", sum(c["holds"] is True for c in m["claims"].values())),
                ("report", str(self.report_path))]

    def summary(self) -> str:
        m = self.metrics
        full, big, opt = m["full_model"], m["bigram_subnetwork"], m["optimal_subnetwork"]
        ab, lay = m["ablation"], m["layout"]
        lines = [
            f"run: {self.out}   recipe: {m['recipe']['name']}",
            f"full model            r = {full['surprisal_r']:.3f}   val loss {ab['loss_full']:.3f}",
            f"bigram subnetwork     r = {big['surprisal_r']:.3f}   lambda {big['lambda']:g}, "
            f"{100 * big['active_fraction']:.2f}% of masked weights active",
            f"optimal subnetwork    {100 * opt['active_fraction']:.2f}% active",
        ]
        for key in ("bigram", "random", "optimal"):
            loss = ab[f"loss_without_{key}"]
            lines.append(f"loss without {key:<8} {loss:.3f}  ({loss - ab['loss_full']:+.3f})")
        lines += [
            f"overlap bigram/optimal {m['overlap']['ratio']:.2f}x chance "
            f"({format_p(m['overlap']['p_value'])}); plurality in {lay['plurality_group']}",
            "claims: " + ", ".join(f"{k}: {verdict(c['holds'])}"
                                   for k, c in m["claims"].items()),
            "timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in m["timings"].items()),
        ]
        return "\n".join(lines)


#: Stage artifacts a rerun reads back; checked before any stage runs, so a damaged one is
#: reported at once instead of after the stages before it (metrics.json is only written).
_ARTIFACTS = ("sweep.json", "controls.json", "evaluation.json", "residual.json")


def run_bigram_study(cfg: BigramStudyConfig) -> BigramStudyResult:
    """Run (or resume) the whole study; see the module docstring for the stages."""
    cfg.validate()
    out = open_run_dir(cfg.out, cfg, _ARTIFACTS, read_artifact)
    torch.manual_seed(cfg.seed)
    metrics, figures, report = run_stages(
        StudyContext(cfg, out), STAGES, collect=collect_metrics, checks=checks,
        write_figures=lambda ctx, metrics: write_figures(ctx), write_report=write_report)
    return BigramStudyResult(out, report, metrics, figures)


def load_metrics(out: str | Path) -> dict:
    """The ``metrics.json`` of a finished run."""
    return read_json(Path(out) / "metrics.json", what="Study metrics",
                     fix="Run `interp bigram --out DIR` to (re)create it.")
