"""One exception family for the toolkit: every message says what was wrong and what to do.

Each class also derives from the builtin a caller would naturally catch (``ValueError`` for
bad values and contents, ``OSError`` for loading), so ``except ValueError`` keeps working.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class InterpError(Exception):
    """Base class of all errors raised on purpose by interp."""


class ConfigError(InterpError, ValueError):
    """An option or argument has a value that makes no sense (unknown name, out of range),
    or a run directory holds a run of another configuration."""


class DataError(InterpError, ValueError):
    """A corpus, dataset, tokenizer or data file is missing, empty or malformed."""


class ModelLoadError(InterpError, OSError):
    """A model or tokenizer could not be loaded (bad path, no network, unknown family)."""


class CheckpointError(InterpError, ValueError):
    """A checkpoint directory is missing, corrupt or belongs to another configuration."""


class MaskError(InterpError, ValueError):
    """A mask set does not fit a model, or a mask file is malformed or unsafe."""


class MissingDependencyError(InterpError, ImportError):
    """An optional package or program a feature needs is not installed (the message names
    what to install)."""


class HookError(InterpError, KeyError):
    """A hook point name does not exist on the model."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0]) if self.args else ""


def suggest(name: str, valid: Iterable[str], n: int = 3) -> str:
    """Return ' Did you mean: a, b?' for the closest valid names, or '' if none is close."""
    close = difflib.get_close_matches(name, list(valid), n=n, cutoff=0.5)
    return f" Did you mean: {', '.join(close)}?" if close else ""


def check_number(
    name: str,
    value: float,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
) -> float:
    """Return ``value`` if it lies in the interval, else raise :class:`ConfigError`.

    ``low_open``/``high_open`` exclude the bound itself (``low=0, low_open=True`` means > 0).
    """
    import math

    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be a number, got {value!r}.")
    if integer and int(value) != value:
        raise ConfigError(f"{name} must be a whole number, got {value!r}.")
    if not math.isfinite(value):
        raise ConfigError(f"{name} must be finite, got {value!r}.")
    bad_low = low is not None and (value <= low if low_open else value < low)
    bad_high = high is not None and (value >= high if high_open else value > high)
    if bad_low or bad_high:
        lo = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
        hi = "" if high is None else f"{'<' if high_open else '<='} {high:g}"
        rule = " and ".join(x for x in (lo, hi) if x)
        raise ConfigError(f"{name} must be {rule}, got {value!r}.")
    return value
