"""End to end: `interp bigram --quick` on the built-in corpus (about 2-3 minutes on 2 cores),
and a small run interrupted mid-sweep that resumes to the same metrics."""

import html as html_lib
import json
import math
import re

import pytest

from analyses.cli import main
from analyses.studies import _bigram_stages as stages
from analyses.studies.bigram import BigramStudyResult, run_bigram_study

pytestmark = pytest.mark.slow

REQUIRED = [
    "recipe.name", "recipe.mask_lr", "recipe.temperature_factor", "recipe.mask_steps",
    "recipe.mask_batch", "recipe.lambdas", "recipe.spike_retries",
    "full_model.surprisal_r", "full_model.surprisal_r_capped", "bigram_subnetwork.surprisal_r",
    "bigram_subnetwork.surprisal_r_capped", "bigram_subnetwork.lambda",
    "bigram_subnetwork.active_fraction", "optimal_subnetwork.active_fraction",
    "ablation.loss_full", "ablation.loss_without_bigram", "ablation.loss_without_random",
    "ablation.loss_without_optimal", "overlap.ratio", "overlap.p_value", "overlap.layers",
    "layout.first_mlp_share", "layout.layer_share", "layout.layer_density",
    "layout.kind_share", "layout.kind_density", "layout.plurality_in_first_layer",
    "layout.plurality_in_first_mlp", "residual.rotation_to_input",
    "residual.rotation_to_output", "checkpoints.entries", "checkpoints.overlaps", "claims",
    "timings",
]
CLAIMS = ["bigram r >= 0.9", "active <= 10%", "full-model r below subnetwork r",
          "removal hurts >= 5x random", "overlap with optimal above chance (p < 0.01)",
          "plurality in layer 0", "plurality in the first MLP"]


def _get(d, dotted):
    for key in dotted.split("."):
        d = d[key]
    return d


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "quick"
    assert main(["bigram", "--quick", "--out", str(out)]) == 0
    return out, json.loads((out / "metrics.json").read_text())


def test_metrics_have_every_key_and_the_papers_findings(quick_run):
    out, m = quick_run
    for key in REQUIRED:
        _get(m, key)
    assert m["recipe"]["name"] == "mini" and m["recipe"]["mask_steps"] == 250
    assert len(m["residual"]["rotation_to_input"]) == 2 + 1  # embeddings + one per block
    big, full, ab = m["bigram_subnetwork"], m["full_model"], m["ablation"]
    assert big["surprisal_r"] >= 0.9
    assert big["active_fraction"] <= 0.10
    assert full["surprisal_r"] < big["surprisal_r"]
    gain_bigram = ab["loss_without_bigram"] - ab["loss_full"]
    gain_random = ab["loss_without_random"] - ab["loss_full"]
    assert gain_bigram >= 5 * gain_random > 0
    assert m["overlap"]["ratio"] > 1 and m["overlap"]["p_value"] < 1e-3
    # the paper's layout claim, as measured: the largest (layer, block) group is layer 0's MLP
    lay = m["layout"]
    assert lay["plurality_group"] == "layer 0 mlp" and lay["plurality_in_first_mlp"] is True
    assert lay["layer_share"][0] == max(lay["layer_share"])
    assert sum(lay["layer_share"]) == pytest.approx(1.0)
    assert set(m["claims"]) == set(CLAIMS)
    assert all(m["claims"][c]["holds"] is True for c in CLAIMS)
    # per-layer overlap: one record per layer, summing to the total
    assert [lo["layer"] for lo in m["overlap"]["layers"]] == [0, 1]
    # checkpoints: the same recipe at each; consecutive subnetworks compared per layer
    ck = m["checkpoints"]
    assert [e["step"] for e in ck["entries"]] == [200, 400]
    assert [(o["step_a"], o["step_b"]) for o in ck["overlaps"]] == [(200, 400)]
    assert len(ck["overlaps"][0]["layers"]) == 2 and ck["overlaps"][0]["ratio"] > 1


def test_report_and_artifacts(quick_run):
    out, m = quick_run
    html = (out / "report.html").read_text()
    n_divs = len(re.findall(r'<div id="fig\d+"', html))
    assert n_divs == len(list((out / "figures").glob("*.html"))) >= 14
    assert "<script type='text/javascript'>" in html  # plotly.js embedded: opens offline
    assert not re.search(r"<script[^>]*\bsrc=", html)  # and nothing is fetched
    assert (out / "masks" / f"bigram-lam{m['bigram_subnetwork']['lambda']:g}.safetensors").is_file()
    for claim in CLAIMS:
        assert html_lib.escape(claim) in html
    assert "recipe <b>mini</b>" in html.replace("Mask-training recipe ", "recipe ")


def test_rerun_reuses_everything(quick_run, capsys):
    out, m = quick_run
    masks_before = {p.name: p.stat().st_mtime_ns for p in (out / "masks").iterdir()}
    assert main(["bigram", "--quick", "--out", str(out)]) == 0
    again = json.loads((out / "metrics.json").read_text())
    assert again["bigram_subnetwork"] == m["bigram_subnetwork"]
    assert again["timings"] == m["timings"]  # reused stages keep the time they really took
    assert {p.name: p.stat().st_mtime_ns for p in (out / "masks").iterdir()} == masks_before


def test_run_dir_of_another_config_is_refused(quick_run, capsys):
    out, _ = quick_run
    assert main(["bigram", "--quick", "--out", str(out), "--lambdas", "0,2"]) == 2
    assert "another configuration" in capsys.readouterr().err


def _without_timings(m: dict) -> dict:
    m = dict(m)
    m.pop("timings")
    m["model"] = {k: v for k, v in m["model"].items()
                  if k not in ("steps_per_second", "resumed_from")}
    m["controls"] = json.loads(json.dumps(m["controls"]).replace('"seconds"', '"_"'))
    return m


def test_interrupted_run_resumes_to_the_same_metrics(tmp_path, small_study, monkeypatch):
    """A stage that raises mid-sweep (after the first λ is saved) leaves a run directory that
    a rerun completes, with metrics identical to an uninterrupted run's."""
    whole = run_bigram_study(small_study(tmp_path / "whole"))

    real_fit, calls = stages.fit_subnetwork, []

    def failing_fit(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated crash in the middle of the sweep")
        return real_fit(*args, **kwargs)

    out = tmp_path / "interrupted"
    monkeypatch.setattr(stages, "fit_subnetwork", failing_fit)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_bigram_study(small_study(out))
    assert (out / "masks" / "bigram-lam0.eval.json").is_file()  # the first λ survived
    assert not (out / "masks" / "bigram-lam1.eval.json").exists()
    assert not list(out.rglob("*.tmp"))  # nothing half-written
    monkeypatch.setattr(stages, "fit_subnetwork", real_fit)
    resumed = run_bigram_study(small_study(out))
    assert _without_timings(resumed.metrics) == _without_timings(whole.metrics)
    assert resumed.metrics["recipe"]["overrides"]["mask_steps"] == 30
    # every result renders compactly in a notebook
    html = resumed._repr_html_()
    assert html.startswith("<table>") and "claims holding" in html and len(html) < 3000
    assert isinstance(BigramStudyResult.from_dict(resumed.to_dict()).metrics, dict)
    assert not math.isnan(resumed.metrics["bigram_subnetwork"]["surprisal_r"])
