"""Distillation from teacher checkpoints end to end (Wang et al., NeurIPS 2022), on MNIST.

MNIST digits -> CNN teacher (a checkpoint every epoch) + independently trained teachers ->
information curves of every checkpoint (I(X;F), I(Y;F), CKA) and the selection rule ->
MLP students distilled from checkpoints (the pre-registered comparison: the checkpoint just
before the first LR drop vs the final one, paired seeds), from the selected checkpoint and
alone -> snapshot vs full ensemble students -> self-distillation subnetworks of teacher
checkpoints (size, layout, overlap, students of the masked teacher) -> metrics.json,
figures, report.html.

Every stage writes its artifact into the run directory before the next one starts; a rerun
reuses finished work and an interrupted run resumes at the teacher epoch, student or
subnetwork where it stopped. The modules: :mod:`._distill_config` (config, a leaf),
:mod:`._distill_stages` (the stages table), :mod:`._distill_report` (figures, report).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from analyses.studies._distill_config import DistillStudyConfig
from analyses.studies._distill_report import checks, write_figures, write_report
from analyses.studies._distill_stages import STAGES, StudyContext, collect_metrics, read_artifact
from analyses.studies.common import StudyResult, open_run_dir, run_stages, verdict
from interp.io import read_json
from interp.results import bulky

__all__ = ["DistillStudyConfig", "DistillStudyResult", "load_metrics", "run_distill_study"]

log = logging.getLogger(__name__)


@dataclass(repr=False)
class DistillStudyResult(StudyResult):
    """Where the run wrote things, and its metrics (``metrics.json``).

    ``trained`` counts what this call trained (``students``, ``masks``): 0 for a rerun of a
    finished run, which reuses every artifact."""

    trained: dict = bulky(dict)

    def summary_rows(self) -> list[tuple[str, Any]]:
        m = self.metrics
        pre = m["preregistered"]
        return [("run", str(self.out)),
                (f"epoch {pre['intermediate_epoch']} − {pre['final_epoch']} (points)",
                 pre["mean_difference_points"]),
                ("95% CI (points)", pre["ci95_points"]),
                ("pairs won by the intermediate", f"{pre['intermediate_wins']} of "
                                                  f"{pre['n_pairs']}"),
                ("student alone", m["student_alone_accuracy"]),
                ("final teacher's students", m["final_teacher_student_accuracy"]),
                ("best / selected epoch", f"{m['best_teacher_epoch']} / "
                                          f"{m['selected_teacher_epoch']}"),
                ("snapshot / full ensemble students",
                 f"{m['snapshot_ensemble']['student_accuracy']:.4f} / "
                 f"{m['full_ensemble']['student_accuracy']:.4f}"),
                ("claims holding", sum(c["holds"] is True for c in m["claims"].values())),
                ("report", str(self.report_path))]

    def summary(self) -> str:
        m = self.metrics
        pre, sel = m["preregistered"], m["selection"]
        snap, full = m["snapshot_ensemble"], m["full_ensemble"]
        ci = pre["ci95_points"]
        ci_text = "n/a" if ci is None else f"[{ci[0]:+.2f}, {ci[1]:+.2f}]"
        curve = "  ".join(f"{s['epoch']}:{100 * s['mean_accuracy']:.2f}"
                          for s in m["students"] if s["on_curve"])
        subs = "  ".join(f"{s['epoch']}:{100 * s['active_fraction']:.1f}% "
                         f"({s['student_difference_points']:+.2f} pts)"
                         for s in m["subnetworks"]["checkpoints"])
        lines = [
            f"run: {self.out}",
            f"pre-registered  epoch {pre['intermediate_epoch']} - epoch {pre['final_epoch']}: "
            f"{pre['mean_difference_points']:+.2f} points, 95% CI {ci_text}, intermediate won "
            f"{pre['intermediate_wins']} of {pre['n_pairs']} pairs; interval excludes 0: "
            f"{verdict(pre['interval_excludes_zero'])}",
            f"student alone   {100 * m['student_alone_accuracy']:.2f}%   final teacher "
            f"{100 * m['final_teacher_student_accuracy']:.2f}%   best epoch "
            f"{m['best_teacher_epoch']} {100 * m['best_student_accuracy']:.2f}%",
            f"curve (epoch:student %)  {curve}",
            f"selection       epoch {sel['epoch']} ({100 * m['selected_student_accuracy']:.2f}%"
            f"), cka picks {m['selected_teacher_epoch_cka']}; {sel['seconds']:.1f} s vs "
            f"{sel['student_sweep_seconds']:.0f} s for the student sweep",
            f"ensembles       snapshot {snap['epochs']} {100 * snap['student_accuracy']:.2f}% "
            f"vs full {100 * full['student_accuracy']:.2f}% (teachers "
            f"{_secs(snap['teacher_seconds'])} vs {_secs(full['teacher_seconds'])})",
            f"subnetworks     {subs}",
            "claims: " + ", ".join(f"{k}: {verdict(c['holds'])}"
                                   for k, c in m["claims"].items()),
            "timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in m["timings"].items()),
        ]
        return "\n".join(lines)


def _secs(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.0f} s"


#: Stage artifacts a rerun reads back; checked before any stage runs, so a damaged one is
#: reported at once instead of after the stages before it.
_ARTIFACTS = ("data.json", "teacher.json", "ensemble_teachers.json", "information.json",
              "subnetworks.json")


def run_distill_study(cfg: DistillStudyConfig) -> DistillStudyResult:
    """Run (or resume) the whole study; see the module docstring for the stages."""
    cfg.validate()
    out = open_run_dir(cfg.out, cfg, _ARTIFACTS, read_artifact)
    for path in sorted((out / "students").glob("*.json")):
        read_artifact(path)
    torch.manual_seed(cfg.seed)
    ctx = StudyContext(cfg, out)
    metrics, figures, report = run_stages(
        ctx, STAGES, collect=collect_metrics, checks=checks, write_figures=write_figures,
        write_report=write_report)
    return DistillStudyResult(out, report, metrics, figures, dict(ctx.trained))


def load_metrics(out: str | Path) -> dict:
    """The ``metrics.json`` of a finished run."""
    return read_json(Path(out) / "metrics.json", what="Study metrics",
                     fix="Run `interp distill --out DIR` to (re)create it.")
