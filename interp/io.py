"""Every file the toolkit reads or writes goes through here.

Writes are atomic (temp file in the same directory, fsync, rename): a reader sees the old file
or the whole new one, never half of one. Reads raise the caller's :mod:`interp.errors` type
with a message that names the file, says what is wrong with it (missing, empty, truncated,
not JSON, a key missing) and what to do, instead of a raw ``JSONDecodeError``,
``SafetensorError`` or ``KeyError``.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from interp.errors import DataError, InterpError

__all__ = [
    "atomic_write_bytes", "atomic_write_text", "read_bytes", "read_json", "read_tensors",
    "read_text", "require_keys", "save_tensors", "write_json",
]

ErrorType = type[InterpError]


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


# --------------------------------------------------------------------------- writing


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` so readers see either the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file normal permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any) -> Path:
    """Atomically write ``obj`` as indented strict JSON (non-finite floats become null)."""
    text = json.dumps(_finite(obj), indent=2, sort_keys=False, default=_default, allow_nan=False)
    return atomic_write_text(path, text + "\n")


def save_tensors(path: str | Path, tensors: dict, metadata: dict | None = None) -> Path:
    """Atomically save a dict of tensors with safetensors (contiguous CPU copies)."""
    from safetensors.torch import save

    data = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    meta = {k: str(v) for k, v in (metadata or {}).items()}
    return atomic_write_bytes(path, save(data, metadata=meta))


# --------------------------------------------------------------------------- reading


def _fail(error: ErrorType, path: Path, what: str, problem: str, fix: str) -> InterpError:
    return error(f"{what} {str(path)!r} {problem}. {fix}".rstrip())


def read_bytes(path: str | Path, *, error: ErrorType = DataError, what: str = "File",
               fix: str = "", allow_empty: bool = False) -> bytes:
    """The bytes of ``path``; a missing, unreadable or (unless allowed) empty file raises
    ``error`` naming the file, with ``fix`` as the advice."""
    path = Path(path)
    if path.is_dir():
        raise _fail(error, path, what, "is a directory, not a file", fix)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise _fail(error, path, what, "does not exist", fix or "Check the path.") from None
    except OSError as e:
        raise _fail(error, path, what, f"cannot be read ({e.strerror or e})", fix) from e
    if not data and not allow_empty:
        raise _fail(error, path, what, "is empty (an interrupted write?)", fix)
    return data


def read_text(path: str | Path, *, error: ErrorType = DataError, what: str = "Text file",
              fix: str = "", allow_empty: bool = False) -> str:
    """UTF-8 text of ``path`` (see :func:`read_bytes`); other encodings raise ``error``."""
    data = read_bytes(path, error=error, what=what, fix=fix, allow_empty=allow_empty)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _fail(error, Path(path), what, f"is not UTF-8 text ({e.reason} at byte {e.start})",
                    fix) from e


def read_json(path: str | Path, *, error: ErrorType = DataError, what: str = "JSON file",
              fix: str = "", expect: type | None = dict) -> Any:
    """Parse ``path`` as JSON; missing, empty, malformed or (with ``expect``) wrongly typed
    content raises ``error`` naming the file and the line of the problem."""
    path = Path(path)
    text = read_text(path, error=error, what=what, fix=fix)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise _fail(error, path, what,
                    f"is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}; "
                    "truncated or edited by hand?)", fix) from e
    if expect is not None and not isinstance(obj, expect):
        raise _fail(error, path, what, f"holds a JSON {type(obj).__name__}, not a "
                    f"{expect.__name__}", fix)
    return obj


def read_tensors(path: str | Path, *, device: str = "cpu", error: ErrorType = DataError,
                 what: str = "Tensor file", fix: str = "",
                 required: Iterable[str] = ()) -> dict:
    """Load a safetensors file; a missing, empty, truncated or foreign file, or one without
    a ``required`` tensor, raises ``error`` naming the file."""
    from safetensors.torch import load

    path = Path(path)
    data = read_bytes(path, error=error, what=what, fix=fix)
    try:
        tensors = load(data)
    except Exception as e:  # safetensors raises its own SafetensorError (and others)
        raise _fail(error, path, what, f"is truncated or not a safetensors file ({e})",
                    fix) from e
    missing = [k for k in required if k not in tensors]
    if missing:
        raise _fail(error, path, what, f"has no tensor {missing[0]!r} (and {len(missing) - 1} "
                    "more missing); the file is incomplete or of another kind", fix)
    if str(device) != "cpu":
        tensors = {k: v.to(device) for k, v in tensors.items()}
    return tensors


def require_keys(obj: dict, keys: Iterable[str], path: str | Path, *,
                 error: ErrorType = DataError, what: str = "JSON file", fix: str = "") -> dict:
    """``obj`` if it has every key; else ``error`` naming the file and the first missing key."""
    missing = [k for k in keys if k not in obj]
    if missing:
        raise _fail(error, Path(path), what, f"has no {missing[0]!r} entry", fix)
    return obj


# --------------------------------------------------------------------------- JSON values


def _finite(obj: Any) -> Any:
    """Non-finite floats -> None, recursively (strict JSON has no NaN or Infinity)."""
    if isinstance(obj, float):
        return obj if obj == obj and obj not in (float("inf"), float("-inf")) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _default(o):
    import numpy as np

    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return _finite(float(o))
    if isinstance(o, np.ndarray):
        return _finite(o.tolist())
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "to_dict"):
        return o.to_dict()
    raise TypeError(f"Object of type {type(o).__name__} is not JSON serializable")
