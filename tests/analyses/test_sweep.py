"""The sparsity sweep: the paper's selection rule and a resumable, reusing sweep."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from analyses.sweep import (
    SweepEntry,
    SweepResult,
    lam_tag,
    lambda_sweep,
    load_selected,
    plot_sweep,
    select_lambda,
)
from interp.errors import InterpError


def _e(lam: float, r: float, active: float) -> SweepEntry:
    return SweepEntry(lam=lam, active_fraction=active, surprisal_r=r, path=f"m-{lam}")


# --------------------------------------------------------------------------- select_lambda


def test_selects_the_sparsest_entry_within_tolerance_of_the_smallest_lambda():
    entries = [_e(0.1, 0.90, 0.50), _e(1.0, 0.88, 0.20), _e(3.0, 0.87, 0.10),
               _e(10.0, 0.80, 0.05)]
    assert select_lambda(entries) == 3.0  # 0.87 >= 0.90 - 0.04; 0.80 is not
    assert select_lambda(entries, tolerance=0.1) == 10.0
    assert select_lambda(entries, tolerance=0.0) == 0.1  # only the base itself qualifies
    # order does not matter: the base is the smallest lambda, not the first entry
    shuffled = entries[:]
    random.Random(0).shuffle(shuffled)
    assert shuffled[0].lam != 0.1
    assert select_lambda(shuffled) == 3.0
    # an entry better than the base qualifies too; sparsity decides, not r
    assert select_lambda([_e(0.1, 0.70, 0.5), _e(1.0, 0.95, 0.3), _e(2.0, 0.69, 0.1)]) == 2.0


def test_ties_in_active_fraction_go_to_the_larger_lambda():
    entries = [_e(0.5, 0.90, 0.4), _e(4.0, 0.89, 0.1), _e(2.0, 0.89, 0.1), _e(8.0, 0.5, 0.1)]
    assert select_lambda(entries) == 4.0  # 8.0 is as sparse but fails the r test
    assert select_lambda([_e(1.0, 0.9, 0.3), _e(1.5, 0.9, 0.3)]) == 1.5


def test_tolerance_boundary_is_inclusive():
    # binary-exact numbers: base r 0.75, tolerance 0.25 -> threshold exactly 0.5
    at = [_e(1.0, 0.75, 0.9), _e(2.0, 0.5, 0.2)]
    assert select_lambda(at, tolerance=0.25) == 2.0
    below = [_e(1.0, 0.75, 0.9), _e(2.0, 0.5 - 1e-9, 0.2)]  # rounding slack is ~1e-12
    assert select_lambda(below, tolerance=0.25) == 1.0


def test_tolerance_boundary_with_decimal_values():
    """r exactly `tolerance` below the base counts, although 0.40 - 0.04 != 0.36 in floats."""
    assert select_lambda([_e(1.0, 0.40, 0.9), _e(2.0, 0.36, 0.2)], tolerance=0.04) == 2.0
    assert select_lambda([_e(1.0, 0.40, 0.9), _e(2.0, 0.3599, 0.2)], tolerance=0.04) == 1.0


def test_select_lambda_needs_entries():
    with pytest.raises(InterpError, match="at least one"):
        select_lambda([])


# --------------------------------------------------------------------------- lambda_sweep


class FakeMask:
    """Stands in for a MaskSet: a lambda and a save() that writes a file."""

    def __init__(self, lam: float):
        self.lam = lam

    def save(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"lam": self.lam}))
        return path

    @classmethod
    def load(cls, path: Path) -> FakeMask:
        return cls(json.loads(Path(path).read_text())["lam"])


class Counting:
    """train and evaluate callables that count their calls (per lambda)."""

    def __init__(self):
        self.trained: list[float] = []
        self.evaluated: list[float] = []

    def train(self, lam: float):
        self.trained.append(lam)
        return FakeMask(lam), {"steps": int(100 * lam), "stopped_reason": "max_steps"}

    def evaluate(self, mask: FakeMask) -> dict:
        self.evaluated.append(mask.lam)
        # r falls and the mask shrinks as lambda grows
        return {"surprisal_r": 0.9 - 0.01 * mask.lam, "active_fraction": 0.5 / (1 + mask.lam),
                "ce_to_bigram": 0.25 * mask.lam}


LAMBDAS = [2.0, 0.5, 1.0, 10.0]  # out of order on purpose


def _sweep(calls: Counting, out: Path) -> SweepResult:
    return lambda_sweep(LAMBDAS, calls.train, calls.evaluate, out, prefix="bigram",
                        load=FakeMask.load)


def test_sweep_trains_each_lambda_once_in_ascending_order(tmp_path):
    calls = Counting()
    res = _sweep(calls, tmp_path)
    assert calls.trained == calls.evaluated == [0.5, 1.0, 2.0, 10.0]
    assert [e.lam for e in res.entries] == [0.5, 1.0, 2.0, 10.0]
    # r: 0.895, 0.89, 0.88, 0.80; threshold 0.855 -> 2.0 is the sparsest that passes
    assert res.selected_lambda == 2.0 and res.selected.lam == 2.0
    e = res.selected
    assert e.surprisal_r == pytest.approx(0.88) and e.active_fraction == pytest.approx(0.5 / 3)
    assert e.metrics == {"ce_to_bigram": 0.5}  # r and active fraction popped out of metrics
    assert e.fit == {"steps": 200, "stopped_reason": "max_steps"}
    assert e.path == "bigram-lam2.safetensors"
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(f"bigram-lam{t}.{ext}" for t in ("0.5", "1", "2", "10")
                           for ext in ("safetensors", "eval.json"))
    assert load_selected(res, tmp_path, FakeMask.load).lam == 2.0
    back = SweepResult.from_json(res.to_json())
    assert back == res


def test_rerun_reuses_finished_lambdas_and_retrains_only_a_missing_one(tmp_path):
    first = _sweep(Counting(), tmp_path)
    again = Counting()
    assert _sweep(again, tmp_path) == first
    assert again.trained == again.evaluated == []  # nothing retrained
    # delete one lambda's files: only that lambda is retrained, and the result is identical
    for suffix in ("safetensors", "eval.json"):
        (tmp_path / f"bigram-lam1.{suffix}").unlink()
    resumed = Counting()
    res = _sweep(resumed, tmp_path)
    assert resumed.trained == resumed.evaluated == [1.0]
    assert res == first
    assert (tmp_path / "bigram-lam1.safetensors").is_file()


def test_a_lambda_without_its_eval_record_counts_as_unfinished(tmp_path):
    """The record is written last: a crash between saving the mask and writing it leaves the
    lambda to be retrained (and its mask file overwritten)."""
    first = _sweep(Counting(), tmp_path)
    (tmp_path / "bigram-lam10.eval.json").unlink()
    resumed = Counting()
    assert _sweep(resumed, tmp_path) == first
    assert resumed.trained == [10.0]


def test_lam_tag_and_plot(tmp_path):
    assert [lam_tag(x) for x in (0.5, 10.0, 1e-3, 2.5e-5, 3)] == ["0.5", "10", "0.001",
                                                                   "2.5e-05", "3"]
    res = _sweep(Counting(), tmp_path)
    fig = plot_sweep(res)
    assert [t.name for t in fig.data] == ["bigram subnetworks", "selected"]
    assert list(fig.data[0].x) == pytest.approx([100 * e.active_fraction for e in res.entries])
    assert list(fig.data[0].text) == ["λ=0.5", "λ=1", "λ=2", "λ=10"]
    assert list(fig.data[1].x) == pytest.approx([100 * res.selected.active_fraction])
    # the dotted line marks the threshold r of the smallest lambda minus the tolerance
    (line,) = fig.layout.shapes
    assert line.y0 == line.y1 == pytest.approx(0.895 - 0.04)
    assert fig.layout.xaxis.type == "log"
    rows = res.rows()
    assert [r["selected"] for r in rows] == ["", "", "yes", ""]
    assert rows[0]["CE to bigram"] == 0.125 and math.isnan(rows[0]["r capped"])


def test_a_record_whose_mask_file_was_deleted_is_retrained(tmp_path):
    first = _sweep(Counting(), tmp_path)
    (tmp_path / "bigram-lam1.safetensors").unlink()  # the record stays, the mask is gone
    again = Counting()
    assert _sweep(again, tmp_path) == first
    assert again.trained == [1.0] and (tmp_path / "bigram-lam1.safetensors").is_file()
