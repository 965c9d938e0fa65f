"""The distillation study: a tiny end-to-end run (tens of seconds on one thread) checked
against its own artifacts by hand, a rerun that trains nothing, an interrupted run that
resumes to the same metrics; config validation; the CLI's answers to bad input."""

import json
import math
import re

import pytest
from scipy import stats

from analyses.cli import main
from analyses.studies import _distill_stages as stages
from analyses.studies._distill_config import DistillStudyConfig
from analyses.studies.distill import DistillStudyResult, run_distill_study
from interp.errors import ConfigError

#: The whole pipeline at toy size: every stage runs, every artifact is written.
TINY = dict(n_train=500, n_val=200, n_test=300, teacher_channels=(4, 8), teacher_hidden=32,
            teacher_epochs=6, teacher_lr=0.1, batch_size=32, student_hidden=(16,),
            student_epochs=3, curve_points=3, curve_seeds=2, alone_seeds=2, pairs=3,
            ensemble_teachers=2, ensemble_seeds=2, lam=1.0, mask_steps=40, mask_lr=0.1,
            mask_batch=100, mask_seeds=2)
STAGES = ["data", "teacher", "ensemble_teachers", "information", "students", "ensembles",
          "subnetworks"]


def _tiny(out) -> DistillStudyConfig:
    return DistillStudyConfig(out=str(out), **TINY)


def _students(out, key: str) -> list[float]:
    files = sorted((out / "students").glob(f"{key}-seed*.json"))
    return [json.loads(p.read_text())["test_accuracy"] for p in files]


def _mean(xs):
    return sum(xs) / len(xs)


def _stable(m):
    """Metrics without wall-clock times (they differ between runs; claims quote some)."""
    if isinstance(m, dict):
        return {k: ({c: v["holds"] for c, v in m[k].items()} if k == "claims" else _stable(v))
                for k, v in m.items() if "seconds" not in k and k != "timings"}
    if isinstance(m, list):
        return [_stable(v) for v in m]
    return m


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("distill") / "tiny"
    result = run_distill_study(_tiny(out))
    return out, result


@pytest.mark.slow
def test_metrics_keys_types_and_hand_checks(tiny_run):
    out, result = tiny_run
    m = json.loads((out / "metrics.json").read_text())
    cfg = _tiny(out).validate()
    assert cfg.compared_epochs == (3, 6) and cfg.curve_epochs == (2, 3, 4, 6)
    assert cfg.subnetwork_epochs == (1, 3, 6) and cfg.snapshot_epochs == (2, 3, 4)
    # teachers: one row per checkpoint; a subnetwork size only where one was fitted
    assert [t["epoch"] for t in m["teachers"]] == [1, 2, 3, 4, 5, 6]
    for t in m["teachers"]:
        assert isinstance(t["accuracy"], float) and 0 <= t["accuracy"] <= 1
        assert isinstance(t["ixf"], float) and isinstance(t["iyf"], float)
        frac = t["subnetwork_active_fraction"]
        assert (frac is None) == (t["epoch"] not in cfg.subnetwork_epochs)
        assert frac is None or 0 <= frac <= 1
    assert m["teachers"][-1]["accuracy"] > 0.5  # the toy teacher learned something
    # students: per checkpoint, mean and t-interval recomputed from the student files
    by_epoch = {s["epoch"]: s for s in m["students"]}
    assert set(by_epoch) == set(cfg.curve_epochs) | {m["selected_teacher_epoch"]}
    for e, s in by_epoch.items():
        accs = _students(out, f"epoch{e:03d}")
        assert s["n"] == len(accs) == (cfg.pairs if e in (3, 6) else cfg.curve_seeds)
        assert s["mean_accuracy"] == pytest.approx(_mean(accs))
        sd = math.sqrt(sum((a - _mean(accs)) ** 2 for a in accs) / (len(accs) - 1))
        half = stats.t.ppf(0.975, len(accs) - 1) * sd / math.sqrt(len(accs))
        assert s["ci95"] == pytest.approx([_mean(accs) - half, _mean(accs) + half])
    assert m["student_alone_accuracy"] == pytest.approx(_mean(_students(out, "alone")))
    assert m["final_teacher_student_accuracy"] == by_epoch[6]["mean_accuracy"]
    assert m["selected_student_accuracy"] == by_epoch[m["selected_teacher_epoch"]][
        "mean_accuracy"]
    assert m["best_teacher_epoch"] == max(cfg.curve_epochs,
                                          key=lambda e: by_epoch[e]["mean_accuracy"])
    assert m["selected_teacher_epoch"] not in cfg.info_exclude
    rows = [t for t in m["teachers"] if t["epoch"] not in cfg.info_exclude]
    assert m["selected_teacher_epoch"] == max(rows, key=lambda t: t["score"])["epoch"]
    assert m["snapshot_ensemble"]["student_accuracy"] == pytest.approx(
        _mean(_students(out, "snapshot")))
    assert m["full_ensemble"]["student_accuracy"] == pytest.approx(
        _mean(_students(out, "full-ensemble")))
    assert m["snapshot_ensemble"]["epochs"] == [2, 3, 4]
    assert m["full_ensemble"]["teacher_runs"] == 2
    # the pre-registered comparison, by hand from the paired files
    pre = m["preregistered"]
    diffs = [100 * (a - b) for a, b in zip(_students(out, "epoch003"),
                                           _students(out, "epoch006"))]
    assert pre["n_pairs"] == 3 and pre["differences_points"] == pytest.approx(diffs)
    assert pre["mean_difference_points"] == pytest.approx(_mean(diffs))
    lo, hi = stats.t.interval(0.95, len(diffs) - 1, loc=_mean(diffs),
                              scale=stats.sem(diffs))
    assert pre["ci95_points"] == pytest.approx([lo, hi])
    assert pre["intermediate_wins"] == sum(d > 0 for d in diffs)
    assert pre["interval_excludes_zero"] == (lo > 0 or hi < 0)
    assert (pre["intermediate_epoch"], pre["final_epoch"]) == (3, 6)
    # subnetworks: sizes from the saved masks, overlaps of consecutive ones
    subs = m["subnetworks"]["checkpoints"]
    assert [s["epoch"] for s in subs] == [1, 3, 6]
    for s in subs:
        assert s["active_weights"] == round(s["active_fraction"] * s["maskable_weights"])
        assert s["maskable_weights"] == 4 * 9 + 8 * 4 * 9 + 8 * 7 * 7 * 32 + 32 * 10
        assert s["layout"]["layers"] == [0, 1, 2, 3]
    assert [(o["epoch_a"], o["epoch_b"]) for o in m["subnetworks"]["overlaps"]] == [(1, 3),
                                                                                   (3, 6)]
    assert list(m["timings"]) == STAGES
    assert isinstance(m["selection"]["seconds"], float)
    assert m["selection"]["student_sweep_students"] == 2 + 3 + 2 + 3
    assert any(k.startswith("pre-registered: epoch 3") for k in m["claims"])
    n_files = len(list((out / "students").glob("*.json")))
    assert result.trained == {"students": n_files, "masks": 3}
    assert n_files == 10 + 2 + 2 * 2 + 3 * 2 + 2 + (0 if m["selected_teacher_epoch"]
                                                    in cfg.curve_epochs else 2)


@pytest.mark.slow
def test_report_states_the_comparison_before_the_results(tiny_run):
    out, result = tiny_run
    html = (out / "report.html").read_text()
    stated = html.index("Pre-registered comparison (stated before any result)")
    assert stated < html.index("Results at a glance") < html.index("2. The pre-registered")
    assert "from the epoch-3 checkpoint" in html and "3 paired seeds" in html
    assert "fewer than the 15 the study requires" in html  # a toy run says it is underpowered
    n_divs = len(re.findall(r'<div id="fig\d+"', html))
    assert n_divs == len(list((out / "figures").glob("*.html"))) == len(result.figures) >= 10
    assert not re.search(r"<script[^>]*\bsrc=", html)  # opens offline
    assert "claims holding" in result._repr_html_()
    assert isinstance(DistillStudyResult.from_dict(result.to_dict()).metrics, dict)
    assert "pre-registered" in result.summary()


@pytest.mark.slow
def test_rerun_trains_nothing_and_a_lost_student_is_retrained(tiny_run):
    out, first = tiny_run
    watched = [p for sub in ("students", "masks", "teacher", "teachers")
               for p in (out / sub).rglob("*") if p.is_file()]
    before = {p: p.stat().st_mtime_ns for p in watched}
    metrics = json.loads((out / "metrics.json").read_text())
    again = run_distill_study(_tiny(out))
    assert again.trained == {"students": 0, "masks": 0}
    assert {p: p.stat().st_mtime_ns for p in watched} == before
    assert json.loads((out / "metrics.json").read_text()) == metrics  # timings kept too
    # a student whose file is gone (a kill while it trained) is the only thing retrained
    lost = out / "students" / "epoch006-seed002.json"
    record = json.loads(lost.read_text())
    lost.unlink()
    resumed = run_distill_study(_tiny(out))
    assert resumed.trained == {"students": 1, "masks": 0}
    assert json.loads(lost.read_text())["test_accuracy"] == record["test_accuracy"]
    assert _stable(json.loads((out / "metrics.json").read_text())) == _stable(metrics)


@pytest.mark.slow
def test_interrupted_run_resumes_to_the_same_metrics(tiny_run, tmp_path, monkeypatch):
    """A crash while training the 5th student leaves 4 student files (and nothing half
    written); the rerun trains only the rest and ends with the uninterrupted run's metrics."""
    whole_out, whole = tiny_run
    real, calls = stages.train_student, []

    def crashing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("simulated kill")
        return real(*args, **kwargs)

    out = tmp_path / "interrupted"
    monkeypatch.setattr(stages, "train_student", crashing)
    with pytest.raises(RuntimeError, match="simulated kill"):
        run_distill_study(_tiny(out))
    assert len(list((out / "students").glob("*.json"))) == 4
    assert not list(out.rglob("*.tmp")) and not (out / "metrics.json").exists()
    monkeypatch.setattr(stages, "train_student", real)
    resumed = run_distill_study(_tiny(out))
    assert resumed.trained["students"] == whole.trained["students"] - 4
    assert _stable(json.loads((out / "metrics.json").read_text())) == _stable(
        json.loads((whole_out / "metrics.json").read_text()))


@pytest.mark.slow
def test_run_dir_of_another_config_is_refused(tiny_run, capsys):
    out, _ = tiny_run
    assert main(["distill", "--quick", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "another configuration" in err and "Traceback" not in err


# --------------------------------------------------------------------------- config


def test_defaults_are_the_calibrated_setup():
    cfg = DistillStudyConfig().validate()
    assert cfg.milestones == (15, 25) and cfg.compared_epochs == (15, 30)
    assert cfg.curve_epochs == (3, 6, 9, 12, 15, 18, 21, 24, 27, 30)
    assert cfg.snapshot_epochs == (9, 15, 21) and cfg.subnetwork_epochs == (6, 15, 30)
    assert cfg.info_exclude == (1, 3) and cfg.student_milestones == (10, 17)
    assert cfg.pairs >= 15 and cfg.alpha == 0 and cfg.temperature == 4
    assert (cfg.n_train, cfg.n_val, cfg.n_test) == (2000, 1000, 2000)
    assert cfg.validate().to_dict() == cfg.to_dict()  # validating twice changes nothing
    quick = DistillStudyConfig.quick_defaults()
    assert quick.pairs == 15 and quick.compared_epochs == (5, 10) and quick.quick
    other = DistillStudyConfig(teacher_epochs=20).validate()
    assert other.milestones == (10, 17) and other.compared_epochs == (10, 20)
    assert "epoch-15 checkpoint" in cfg.preregistration()
    assert cfg.student_seed(3) == 3 and DistillStudyConfig(seed=2).student_seed(3) == 2003


@pytest.mark.parametrize("overrides,match", [
    ({"n_train": 4000, "n_test": 2000}, "exceeds the 5000"),
    ({"pairs": 1}, "pairs must be >= 2"),
    ({"teacher_epochs": 1}, "teacher_epochs must be >= 2"),
    ({"intermediate_epoch": 30}, "intermediate_epoch must be an epoch before the final"),
    ({"subnetwork_epochs": (6, 40)}, "subnetwork_epochs has epoch 40"),
    ({"curve_epochs": (3, 3)}, "curve_epochs repeats an epoch"),
    ({"snapshot_epochs": ()}, "snapshot_epochs is empty"),
    ({"temperature": 0.0}, "temperature must be > 0"),
    ({"alpha": 1.5}, "alpha must be"),
    ({"n_val": 20}, "n_val = 20 is too small"),
    ({"milestones": (25, 15)}, "milestones must be strictly increasing"),
    ({"info_exclude": tuple(range(1, 31))}, "leaves no checkpoint"),
    ({"teacher_channels": ()}, "teacher_channels is empty"),
])
def test_bad_config_values_raise_config_error(overrides, match):
    with pytest.raises(ConfigError, match=match):
        DistillStudyConfig(**overrides).validate()


def test_fractional_epochs_are_refused(unchecked):
    with unchecked(), pytest.raises(ConfigError, match="curve_epochs must be a whole number"):
        DistillStudyConfig(curve_epochs=(2.5,)).validate()


# --------------------------------------------------------------------------- CLI


@pytest.mark.parametrize("argv,match", [
    (["--pairs", "1"], "pairs must be >= 2"),
    (["--teacher-epochs", "1"], "teacher_epochs must be >= 2"),
    (["--subnetwork-epochs", "6,40"], "subnetwork_epochs has epoch 40"),
    (["--alpha", "2"], "alpha must be"),
    (["--device", "nonsense"], "is not a device"),
])
def test_cli_bad_values_exit_2_with_a_message(tmp_path, capsys, argv, match):
    out = tmp_path / "run"
    assert main(["distill", "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err
    assert not (out / "students").exists()  # refused before any work


@pytest.mark.parametrize("argv,match", [
    (["--pairs", "x"], "expected a whole number"),
    (["--curve-epochs", "3,a"], "comma-separated epochs"),
    (["--subnetwork-epochs", "0,6"], "epochs >= 1"),
    (["--temperature", "-1"], "must be a finite number > 0"),
])
def test_cli_unparsable_values_exit_2(capsys, argv, match):
    with pytest.raises(SystemExit) as exc:
        main(["distill", *argv])
    assert exc.value.code == 2 and match in capsys.readouterr().err


def test_cli_out_that_is_a_file_exits_2(tmp_path, capsys):
    path = tmp_path / "file"
    path.write_text("x")
    assert main(["distill", "--out", str(path)]) == 2
    assert "is not a directory" in capsys.readouterr().err
