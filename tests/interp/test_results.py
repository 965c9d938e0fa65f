"""interp.results: the Result base (JSON round trip, files, compact repr and HTML)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest

import interp.io as io_mod
from interp.errors import DataError
from interp.results import Result, bulky, html_table


@dataclass
class Point(Result):
    x: float
    y: float = 0.0


@dataclass(repr=False)  # as the analyses declare them: Result's compact repr, not dataclass's
class Run(Result):
    name: str
    loss: float
    best: Point
    points: list[Point]
    scores: dict[str, float]
    out_dir: Path
    parent: Point | None = None
    history: list[dict] = bulky(list)
    samples: list[float] = bulky(list)


@dataclass
class _Plain(Result):
    history: list[float] = bulky(list)


def _run(**changes) -> Run:
    base = dict(name="<b>bigram</b>", loss=math.nan, best=Point(1.5, -2.0),
                points=[Point(0.0), Point(1.0, math.inf)], scores={"r": 0.9, "kl": math.nan},
                out_dir=Path("runs") / "a", parent=Point(3.0),
                history=[{"step": i, "loss": 1.0 / (i + 1)} for i in range(1000)],
                samples=[0.25] * 1000)
    return Run(**{**base, **changes})


def _same(a, b) -> bool:
    """Equality that treats NaN as equal to NaN (dataclass == does not)."""
    return json.dumps(a.to_dict()) == json.dumps(b.to_dict()) and type(a) is type(b)


def test_to_dict_is_plain_strict_json():
    d = _run().to_dict()
    assert d["loss"] is None  # NaN -> null
    assert d["best"] == {"x": 1.5, "y": -2.0}
    assert d["points"] == [{"x": 0.0, "y": 0.0}, {"x": 1.0, "y": None}]  # inf -> null
    assert d["scores"] == {"r": 0.9, "kl": None}
    assert d["out_dir"] == str(Path("runs") / "a")
    assert len(d["history"]) == 1000 and d["samples"] == [0.25] * 1000  # bulky kept in JSON
    json.dumps(d, allow_nan=False)  # raises on any NaN or Infinity left


def test_json_round_trip_rebuilds_types():
    run = _run()
    back = Run.from_json(run.to_json())
    assert isinstance(back.best, Point) and back.best == Point(1.5, -2.0)
    assert all(isinstance(p, Point) for p in back.points)
    assert back.points[0] == Point(0.0) and math.isnan(back.points[1].y)  # inf -> null -> NaN
    assert math.isnan(back.loss)
    assert back.scores["r"] == 0.9 and math.isnan(back.scores["kl"])
    assert isinstance(back.out_dir, Path) and back.out_dir == Path("runs") / "a"
    assert isinstance(back.parent, Point) and back.parent == Point(3.0)
    assert back.history == run.history and back.samples == run.samples
    assert _same(back, run)
    # a finite result round trips to an equal object
    finite = _run(loss=0.5, points=[Point(1.0)], scores={"r": 0.5})
    assert Run.from_json(finite.to_json()) == finite
    # optional nested result left out
    assert Run.from_dict({**finite.to_dict(), "parent": None}).parent is None


def test_from_dict_defaults_unknown_keys_and_missing_required_key(unchecked):
    d = Point(2.0, 3.0).to_dict()
    assert Point.from_dict({"x": 2.0}) == Point(2.0, 0.0)  # missing optional -> default
    assert Point.from_dict({**d, "added_later": 1}) == Point(2.0, 3.0)  # unknown key ignored
    with pytest.raises(DataError, match=r"Point data has no 'x' entry"):
        Point.from_dict({"y": 1.0})
    run_d = _run().to_dict()
    del run_d["best"]
    with pytest.raises(DataError, match="'best'"):
        Run.from_dict(run_d)
    with unchecked(), pytest.raises(DataError, match="needs a dict, got list"):
        Point.from_dict([1.0, 2.0])  # ill-typed on purpose: the library's own check
    with pytest.raises(DataError, match="not JSON"):
        Point.from_json('{"x": 1.0')


def test_bulky_fields_hidden_from_repr_and_html_but_kept():
    run = _run()
    text = repr(run)
    assert text.startswith("Run(name='<b>bigram</b>'")
    assert "history" not in text and "samples" not in text and "0.25" not in text
    assert "points=[2 items]" in text and "scores=r: 0.9, kl: n/a" in text
    page = run._repr_html_()
    assert page.startswith("<table>") and page.endswith("</table>")
    assert "<caption" in page and ">Run<" in page
    assert "history" not in page and "samples" not in page
    assert "0.25" not in page and "999" not in page  # no 1000-element list dumped
    assert len(page) < 2000
    assert page.count("<tr>") == 7  # the non-bulky fields, one row each
    assert "&lt;b&gt;bigram&lt;/b&gt;" in page and "<b>bigram</b>" not in page  # escaped
    assert ">n/a<" in page  # NaN loss
    assert ">Point(…)<" in page  # nested results summarised, not expanded
    assert [name for name, _ in run.summary_rows()] == [
        "name", "loss", "best", "points", "scores", "out_dir", "parent"]
    # with dataclass's own repr (plain @dataclass) bulky fields are still left out
    plain = repr(Point(1.0))
    assert plain == "Point(x=1.0, y=0.0)"
    assert "history" not in repr(_Plain([1.0] * 1000)) and "1.0" not in repr(_Plain([1.0] * 1000))


def test_html_table_formats_values():
    page = html_table([("n", 1234567), ("f", 0.123456), ("big", 123456.7), ("ok", True),
                       ("none", None), ("inf", math.inf), ("long", list(range(1000))),
                       ("many", {str(i): i for i in range(7)})], caption="a<b")
    assert ">1,234,567<" in page and ">0.1235<" in page and ">123,457<" in page
    assert ">True<" in page and ">n/a<" in page and ">inf<" in page
    assert ">[1000 items]<" in page and ">{7 entries}<" in page
    assert "a&lt;b" in page and "999" not in page


def test_save_and_load_are_atomic(tmp_path, monkeypatch):
    run = _run()
    path = run.save(tmp_path / "run.json")
    assert path == tmp_path / "run.json"
    assert _same(Run.load(path), run)
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]
    before = path.read_bytes()

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(io_mod.os, "fsync", full_disk)
    with pytest.raises(OSError):
        _run(name="second").save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before  # the old file is whole
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]  # no temp file left
    assert Run.load(path).name == "<b>bigram</b>"


def test_load_of_a_bad_file_names_it(tmp_path):
    path = tmp_path / "run.json"
    path.write_text('{"name": "x", "loss": 1.0')
    with pytest.raises(DataError) as info:
        Run.load(path)
    assert str(path) in str(info.value) and "Run file" in str(info.value)
    assert "Delete it to recompute it" in str(info.value)
    assert path.read_text() == '{"name": "x", "loss": 1.0'  # left as it was
    path.write_text('{"name": "x"}')
    with pytest.raises(DataError, match="'loss'"):
        Run.load(path)


def test_tuple_fields_round_trip_as_tuples():
    from dataclasses import dataclass

    from interp.results import Result

    @dataclass(repr=False)
    class Tagged(Result):
        tags: tuple[str, ...] = ()
        pair: tuple[int, float] = (0, 0.0)

    t = Tagged(tags=("a", "b"), pair=(3, float("nan")))
    back = Tagged.from_json(t.to_json())
    assert back.tags == ("a", "b") and back.pair[0] == 3 and back.pair[1] != back.pair[1]
