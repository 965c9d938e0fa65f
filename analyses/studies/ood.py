"""Local vs full likelihood of image models, end to end (Zhang et al. 2021, NeLLoC).

built-in image pair (default: natural-photo patches in, MNIST digits out) -> per seed a local
autoregressive model and a full one warm-started from it -> bits/dim -> OOD scores
(likelihood, non-local, input complexity, typicality) -> lossless compression with the local
model (bit-exact, vs PNG/WebP/zlib/lzma) -> the local subnetwork inside the full model (size,
layout, overlap, its own OOD score) -> metrics.json, figures, report.html.

Every stage writes its artifact into the run directory before the next one starts, and the
models train with a checkpoint store, so a rerun reuses finished work and an interrupted run
resumes where it stopped. The modules: :mod:`._ood_config` (a leaf), :mod:`._ood_stages`
(the stages table), :mod:`._ood_report` (claims, figures, report).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from analyses.studies._ood_config import OODStudyConfig
from analyses.studies._ood_report import checks, write_figures, write_report
from analyses.studies._ood_stages import STAGES, OODContext, collect_metrics, read_artifact
from analyses.studies.common import StudyResult, open_run_dir, run_stages, verdict
from interp.errors import ConfigError
from interp.io import read_json

__all__ = ["OODStudyConfig", "OODStudyResult", "load_metrics", "run_ood_study"]

log = logging.getLogger(__name__)

#: Stage artifacts a rerun reads back; checked before any stage runs.
_ARTIFACTS = ("ood.json", "compression.json", "subnetwork.json")


@dataclass(repr=False)
class OODStudyResult(StudyResult):
    """Where the run wrote things, and its metrics (``metrics.json``)."""

    def summary_rows(self) -> list[tuple[str, Any]]:
        m = self.metrics
        rows = [("run", str(self.out)), ("pair", f"{m['pair']['in']} vs {m['pair']['out']}"),
                ("bits/dim local in / out", f"{m['bpd']['local_in']:.3f} / "
                                            f"{m['bpd']['local_out']:.3f}"),
                ("bits/dim full in / out", f"{m['bpd']['full_in']:.3f} / "
                                           f"{m['bpd']['full_out']:.3f}")]
        rows += [(f"AUROC {k}", v) for k, v in m["auroc"].items()]
        c = m["compression"]
        rows += [("compression bits/dim (model / PNG)", f"{c['bpd_model']:.3f} / "
                                                       f"{c['bpd_png']:.3f}"),
                 ("round trip exact", c["roundtrip_exact"]),
                 ("claims holding", sum(v["holds"] is True for v in m["claims"].values())),
                 ("report", str(self.report_path))]
        return rows

    def summary(self) -> str:
        m = self.metrics
        lines = [f"run: {self.out}   in: {m['pair']['in']}   out: {m['pair']['out']}",
                 "bits/dim   local in {local_in:.3f} out {local_out:.3f}   full in "
                 "{full_in:.3f} out {full_out:.3f}".format(**m["bpd"])]
        for k, v in m["auroc"].items():
            seeds = m["auroc_per_seed"].get(k)
            lines.append(f"AUROC {k:<22} {v:.3f}" + (
                f"   (seeds {', '.join(f'{x:.3f}' for x in seeds)})" if seeds else ""))
        c = m["compression"]
        lines.append(f"compression  model {c['bpd_model']:.3f}  PNG {c['bpd_png']:.3f}  WebP "
                     f"{c['bpd_webp']:.3f} bits/dim; exact: {c['roundtrip_exact']}; encode "
                     f"{c['encode_images_per_s']:.0f} img/s, decode "
                     f"{c['decode_images_per_s']:.0f} img/s")
        if "local_subnetwork" in m:
            s = m["local_subnetwork"]
            lines.append(f"local subnetwork  {100 * s['active_fraction']:.2f}% active, non-local "
                         f"AUROC {s['auroc_nonlocal']:.3f}")
        lines.append("claims: " + ", ".join(f"{k}: {verdict(c['holds'])}"
                                            for k, c in m["claims"].items()))
        lines.append("timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in m["timings"].items()))
        return "\n".join(lines)


def run_ood_study(cfg: OODStudyConfig) -> OODStudyResult:
    """Run (or resume) the whole study; see the module docstring for the stages."""
    cfg.validate()
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {cfg.device} was asked for but no CUDA GPU is visible. "
                          "Use --device cpu.")
    out = open_run_dir(cfg.out, cfg, _ARTIFACTS, read_artifact)
    metrics, figures, report = run_stages(
        OODContext(cfg, out), STAGES, collect=collect_metrics, checks=checks,
        write_figures=write_figures, write_report=write_report)
    return OODStudyResult(out, report, metrics, figures)


def load_metrics(out: str | Path) -> dict:
    """The ``metrics.json`` of a finished run."""
    return read_json(Path(out) / "metrics.json", what="Study metrics",
                     fix="Run `interp ood --out DIR` to (re)create it.")
