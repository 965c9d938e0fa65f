"""One base for every result: JSON round trip, files, and a compact view in Jupyter.

A result is a dataclass that subclasses :class:`Result`::

    @dataclass(repr=False)                # repr=False keeps the base's compact repr
    class OverlapResult(Result):
        ratio: float
        p_value: float
        blocks: list[dict] = bulky(list)     # kept in JSON, hidden from repr and summaries

It gets ``to_dict``/``from_dict`` (nested results and lists of them are rebuilt from the type
hints; non-finite floats become ``null`` and come back as NaN), ``to_json``/``from_json``,
atomic ``save``/``load`` through :mod:`interp.io`, a ``repr`` without bulky fields, and
``_repr_html_``: a two-column table of the scalar fields (lists and dicts shown by size), so a
notebook cell never dumps a per-step history or a sample array.
"""

from __future__ import annotations

import dataclasses
import html
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from interp.errors import DataError
from interp.io import _finite, read_json, write_json

__all__ = ["Result", "bulky", "format_value", "html_table"]

R = TypeVar("R", bound="Result")

_BULKY = "interp.bulky"


def bulky(default_factory: Any = list, **kwargs: Any) -> Any:
    """A dataclass field that is serialised but hidden from ``repr`` and HTML summaries
    (per-step histories, samples, per-block tables)."""
    return dataclasses.field(default_factory=default_factory, repr=False,
                             metadata={_BULKY: True}, **kwargs)


def format_value(v: Any) -> str:
    """How a value reads in a summary table or report cell (plain text, not escaped):
    4 significant digits, thousands separators for counts and large numbers, NaN/None as
    'n/a', containers by size."""
    if isinstance(v, bool) or v is None:
        return "n/a" if v is None else str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            return "n/a" if v != v else str(v)
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, (list, tuple)):
        return f"[{len(v)} items]"
    if isinstance(v, dict):
        if len(v) <= 6 and all(isinstance(x, (int, float, str, bool)) or x is None
                               for x in v.values()):
            return ", ".join(f"{k}: {format_value(x)}" for k, x in v.items())
        return f"{{{len(v)} entries}}"
    if isinstance(v, Result):
        return f"{type(v).__name__}(…)"
    return str(v)


def html_table(rows: list[tuple[str, Any]], caption: str = "") -> str:
    """A small two-column HTML table (name, formatted value) for notebook display."""
    cap = f"<caption style='text-align:left'><b>{html.escape(caption)}</b></caption>" if caption else ""
    body = "".join(f"<tr><th style='text-align:left'>{html.escape(str(k))}</th>"
                   f"<td style='text-align:right'>{html.escape(format_value(v))}</td></tr>"
                   for k, v in rows)
    return f"<table>{cap}{body}</table>"


class Result:
    """Base of result dataclasses (see the module docstring)."""

    #: File kind named in error messages of :meth:`load`.
    _what: ClassVar[str] = "Result file"

    # ------------------------------------------------------------------ dicts and JSON
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values; nested results become dicts, non-finite floats None."""
        return _finite({f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)})

    @classmethod
    def from_dict(cls: type[R], data: dict[str, Any]) -> R:
        """Rebuild from :meth:`to_dict` output (unknown keys are ignored, missing ones take
        their defaults; a missing required one raises DataError)."""
        if not isinstance(data, dict):
            raise DataError(f"{cls.__name__}.from_dict needs a dict, got {type(data).__name__}.")
        hints = _hints(cls)
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name in data:
                kwargs[f.name] = _revive(hints.get(f.name), data[f.name])
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise DataError(f"{cls.__name__} data has no {f.name!r} entry; it was written "
                                "by another version or is incomplete.")
        return cls(**kwargs)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    @classmethod
    def from_json(cls: type[R], text: str) -> R:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{cls.__name__}.from_json got text that is not JSON: {e}") from e
        return cls.from_dict(data)

    # ------------------------------------------------------------------ files
    def save(self, path: str | Path) -> Path:
        """Write the result as JSON, atomically."""
        return write_json(path, self.to_dict())

    @classmethod
    def load(cls: type[R], path: str | Path) -> R:
        """Read a result written by :meth:`save`; bad files raise DataError naming them."""
        return cls.from_dict(read_json(path, what=f"{cls.__name__} file",
                                       fix="Delete it to recompute it, or point to another file."))

    # ------------------------------------------------------------------ display
    def summary_rows(self) -> list[tuple[str, Any]]:
        """(name, value) rows for the notebook table: every field that is not bulky."""
        return [(f.name, getattr(self, f.name)) for f in dataclasses.fields(self)
                if not f.metadata.get(_BULKY)]

    def _repr_html_(self) -> str:
        return html_table(self.summary_rows(), caption=type(self).__name__)

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={format_value(v) if isinstance(v, (list, dict)) else repr(v)}"
                          for k, v in self.summary_rows())
        return f"{type(self).__name__}({inner})"


def _plain(v: Any) -> Any:
    if isinstance(v, Result):
        return v.to_dict()
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001  unresolvable annotations: revive nothing specially
        return {}


def _revive(hint: Any, value: Any) -> Any:
    """Turn JSON back into the annotated type where it matters: nested results, NaN floats."""
    if value is None:
        return math.nan if hint is float else None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if isinstance(hint, type) and issubclass(hint, Result) and isinstance(value, dict):
        return hint.from_dict(value)
    if origin is list and args and isinstance(value, list):
        return [_revive(args[0], x) for x in value]
    if origin is tuple and isinstance(value, list):
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_revive(args[0], x) for x in value)
        if len(args) == len(value):
            return tuple(_revive(a, x) for a, x in zip(args, value))
        return tuple(value)
    if origin is dict and len(args) == 2 and isinstance(value, dict):
        return {k: _revive(args[1], x) for k, x in value.items()}
    if origin is typing.Union or origin is types.UnionType:
        inner = [a for a in args if a is not type(None)]
        return _revive(inner[0], value) if len(inner) == 1 else value
    if hint is Path and isinstance(value, str):
        return Path(value)
    return value
