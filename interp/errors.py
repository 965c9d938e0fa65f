"""One exception family for the toolkit: every message says what was wrong and what to do."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class InterpError(Exception):
    """Base class of all errors raised on purpose by interp."""


class DataError(InterpError, ValueError):
    """A corpus, dataset or tokenizer is missing, empty or malformed."""


class ModelLoadError(InterpError, OSError):
    """A model or tokenizer could not be loaded (bad path, no network, unknown family)."""


class CheckpointError(InterpError, ValueError):
    """A checkpoint directory is missing, corrupt or belongs to another configuration."""


class MaskError(InterpError, ValueError):
    """A mask set does not fit a model, or a mask file is malformed or unsafe."""


def suggest(name: str, valid: Iterable[str], n: int = 3) -> str:
    """Return ' Did you mean: a, b?' for the closest valid names, or '' if none is close."""
    close = difflib.get_close_matches(name, list(valid), n=n, cutoff=0.5)
    return f" Did you mean: {', '.join(close)}?" if close else ""
