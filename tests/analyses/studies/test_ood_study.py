"""End to end: `interp ood --quick` on the built-in image pair, reuse of finished artifacts,
resume of an interrupted stage, and the CLI's answers to bad input."""

import json

import pytest

from analyses.cli import main
from analyses.studies._ood_config import OODStudyConfig
from analyses.studies.ood import OODStudyResult, run_ood_study
from interp.errors import ConfigError

pytestmark = pytest.mark.slow

REQUIRED = [
    "bpd.local_in", "bpd.full_in", "bpd.local_out", "bpd.full_out", "auroc.likelihood",
    "auroc.nonlocal", "auroc.nonlocal_subnetwork", "auroc.input_complexity",
    "auroc_per_seed.nonlocal", "typicality.auroc", "compression.bpd_model",
    "compression.bpd_png", "compression.bpd_webp", "compression.roundtrip_exact",
    "compression.encode_images_per_s", "compression.decode_images_per_s",
    "local_subnetwork.active_fraction", "claims", "timings",
]


def _get(d, dotted):
    for key in dotted.split("."):
        d = d[key]
    return d


def _tiny(out, **over):
    base = dict(out=str(out), n_train=300, n_test=40, seeds=(0,), local_steps=30,
                full_steps=10, compress_train=200, compress_test=6, compress_steps=30,
                mask_steps=8, hidden=8, stack_channels=4, dilations=(1, 2), typicality_batch=5)
    return OODStudyConfig(**{**base, **over}).validate()


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ood") / "quick"
    assert main(["ood", "--quick", "--out", str(out)]) == 0
    return out, json.loads((out / "metrics.json").read_text())


def test_quick_run_writes_every_key_figure_and_report(quick_run):
    out, m = quick_run
    for key in REQUIRED:
        _get(m, key)
    comp = m["compression"]
    assert comp["roundtrip_exact"] is True
    assert comp["bpd_model"] < comp["bpd_png"]  # even a briefly trained model beats PNG
    assert 0 < m["local_subnetwork"]["active_fraction"] < 1
    for name in ("bpd", "auroc", "roc", "histograms", "codecs", "layout", "overlap_layers"):
        assert (out / "figures" / f"{name}.html").is_file(), name
    report = (out / "report.html").read_text()
    assert "Lossless compression" in report and "local subnetwork" in report
    # the failure pair: digits are more likely than photo patches under the local model
    assert m["bpd"]["local_out"] < m["bpd"]["local_in"]


def test_rerun_reuses_everything_and_resumes_a_lost_stage(tmp_path):
    cfg = _tiny(tmp_path / "run")
    first = run_ood_study(cfg)
    assert isinstance(first, OODStudyResult)
    models = sorted((tmp_path / "run" / "models").rglob("*.safetensors"))
    stamps = {p: p.stat().st_mtime_ns for p in models}
    # a lost stage artifact: only that stage reruns, from the saved masks
    (tmp_path / "run" / "subnetwork.json").unlink()
    second = run_ood_study(_tiny(tmp_path / "run"))
    assert {p: p.stat().st_mtime_ns for p in models} == stamps  # nothing retrained
    assert second.metrics["local_subnetwork"] == first.metrics["local_subnetwork"]
    assert second.metrics["auroc"] == first.metrics["auroc"]
    assert "local_subnetwork" in second.summary()


def test_a_run_directory_refuses_another_configuration(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps(_tiny(run_dir).to_dict()))
    with pytest.raises(ConfigError, match="another configuration"):
        run_ood_study(_tiny(run_dir, horizon=2))


@pytest.mark.parametrize("over,match", [
    (dict(in_data="patchs"), "Did you mean"),
    (dict(in_data="mnist", out_data="mnist"), "different"),
    (dict(seeds=()), "seeds is empty"),
    (dict(seeds=(0, 0)), "duplicates"),
    (dict(typicality_batch=1), "typicality_batch"),
    (dict(compress_head="gauss"), "compress_head"),
    (dict(in_data="patches_rgb"), "same channels"),
    (dict(in_data="patches_rgb", out_data="patches_rgb"), "--hidden 33"),
])
def test_config_rejects_bad_values(over, match):
    with pytest.raises(ConfigError, match=match):
        OODStudyConfig(**over).validate()


@pytest.mark.parametrize("argv,message", [
    (["ood", "--seeds", "a,b"], "comma-separated list of integers"),
    (["ood", "--mask-lambda", "-1"], ">= 0"),
    (["ood", "--in-data", "cifar"], "invalid choice"),
])
def test_cli_rejects_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_reports_config_errors_with_exit_2(tmp_path, capsys):
    code = main(["ood", "--in-data", "mnist", "--out-data", "mnist", "--out",
                 str(tmp_path / "x")])
    assert code == 2
    assert "pick two different image sets" in capsys.readouterr().err


def test_models_trained_in_worker_processes_equal_those_trained_in_process(tmp_path):
    """Seeds and the compression model train as parallel jobs; on one thread per process
    the weights are bit-identical to training them one after another in this process."""
    import torch

    from analyses.studies import _ood_stages as st

    runs = {}
    for workers in (1, 2):
        cfg = _tiny(tmp_path / f"w{workers}", seeds=(0, 1), workers=workers)
        ctx = st.OODContext(cfg=cfg, out=tmp_path / f"w{workers}")
        st.prepare_data(ctx)
        with torch.random.fork_rng():
            torch.set_num_threads(1)
            st.train_models(ctx)
            comp = st.compression_model(ctx)
        runs[workers] = ({s: [m.state_dict() for m in ctx.models[s]] for s in cfg.seeds},
                         comp.state_dict(), ctx.bpd)
    (m1, c1, b1), (m2, c2, b2) = runs[1], runs[2]
    for seed in (0, 1):
        for a, b in zip(m1[seed], m2[seed]):
            assert all(torch.equal(a[k], b[k]) for k in a)
        assert all(torch.equal(b1[seed][k], b2[seed][k]) for k in b1[seed])
    assert all(torch.equal(c1[k], c2[k]) for k in c1)
    assert not torch.equal(m1[0][1]["correction.weight"], m1[1][1]["correction.weight"])
