"""End to end: `interp bigram --quick` on the built-in corpus (about 2-3 minutes on 2 cores)."""

import json
import re

import pytest

from analyses.cli import main

pytestmark = pytest.mark.slow

REQUIRED = [
    "full_model.surprisal_r", "bigram_subnetwork.surprisal_r", "bigram_subnetwork.lambda",
    "bigram_subnetwork.active_fraction", "optimal_subnetwork.active_fraction",
    "ablation.loss_full", "ablation.loss_without_bigram", "ablation.loss_without_random",
    "ablation.loss_without_optimal", "overlap.ratio", "overlap.p_value",
    "layout.first_mlp_share", "residual.rotation_to_input", "residual.rotation_to_output",
    "timings",
]


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
    n_layers = 2 + 1  # embeddings + one entry per block
    assert len(m["residual"]["rotation_to_input"]) == n_layers
    big, full, ab = m["bigram_subnetwork"], m["full_model"], m["ablation"]
    assert big["surprisal_r"] >= 0.9
    assert big["active_fraction"] <= 0.10
    assert full["surprisal_r"] < big["surprisal_r"]
    gain_bigram = ab["loss_without_bigram"] - ab["loss_full"]
    gain_random = ab["loss_without_random"] - ab["loss_full"]
    assert gain_bigram >= 5 * gain_random > 0
    assert m["overlap"]["ratio"] > 1 and m["overlap"]["p_value"] < 1e-3
    assert m["layout"]["first_mlp_share"] > 0.4  # plurality in the first MLP layer


def test_report_and_artifacts(quick_run):
    out, m = quick_run
    html = (out / "report.html").read_text()
    n_divs = len(re.findall(r'<div id="fig\d+"', html))
    assert n_divs == len(list((out / "figures").glob("*.html"))) >= 10
    assert "<script type='text/javascript'>" in html  # plotly.js embedded: opens offline
    assert not re.search(r"<script[^>]*\bsrc=", html)  # and nothing is fetched
    assert (out / "masks" / f"bigram-lam{m['bigram_subnetwork']['lambda']:g}.safetensors").is_file()


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
