"""The bigram-subnetwork paper's mask format: a pickled dict HF parameter name -> bool array.

Chang & Bergen (2025) release their masks as ``{hf_param_name: np.ndarray[bool], ...,
"orig_model_name": str}`` pickles, in the HF layout of each weight (GPT-2 ``c_attn`` as one
Conv1D ``[in, 3 * d_model]`` column block, GPT-NeoX ``query_key_value`` interleaved per head).
Reading never runs code from the file: :class:`_BoolArrayUnpickler` admits numpy arrays and
plain containers only.

The functions here work on targets, dicts and tensors; :class:`~interp.masks.maskset.MaskSet`
turns their results into logits (``MaskSet.import_paper`` / ``MaskSet.export_paper``).
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from interp.errors import MaskError, suggest
from interp.io import atomic_write_bytes, read_bytes
from interp.masks.targets import Target

__all__ = ["load_paper_masks"]

#: The non-mask entry of a paper-format dict: the HF id of the model the mask was made for.
ORIG_NAME = "orig_model_name"
_FIX = ("Re-download or re-export it (MaskSet.export_paper); the paper's masks are pickled "
        "dicts of numpy boolean arrays.")


# --------------------------------------------------------------------------- safe unpickling


def _latin1_encode(obj: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` as protocol-2 numpy pickles use it (latin1 only)."""
    if not isinstance(obj, str) or encoding not in ("latin1", "latin-1"):
        raise MaskError("Refusing a mask pickle that encodes data other than latin1 text.")
    return obj.encode("latin1")


def _numpy_globals() -> dict[tuple[str, str], Any]:
    core = getattr(np, "_core", None) or np.core
    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
               ("_codecs", "encode"): _latin1_encode}
    for mod in ("numpy.core", "numpy._core"):
        allowed[(f"{mod}.multiarray", "_reconstruct")] = core.multiarray._reconstruct
        allowed[(f"{mod}.multiarray", "scalar")] = core.multiarray.scalar
        allowed[(f"{mod}.numeric", "_frombuffer")] = core.numeric._frombuffer
    return allowed


class _BoolArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays; refuses every other global."""

    _allowed = _numpy_globals()

    def __init__(self, file, where: str = "a mask pickle") -> None:
        super().__init__(file)
        self.where = where

    def find_class(self, module: str, name: str) -> Any:
        obj = self._allowed.get((module, name))
        if obj is None:
            raise MaskError(
                f"Refusing to load {module}.{name} from {self.where}: only numpy boolean "
                "arrays are allowed. The file is not a bigram-subnetwork mask, or unsafe."
            )
        return obj

    def persistent_load(self, pid: Any) -> Any:
        raise MaskError(f"Refusing {self.where}: it has persistent references.")


def load_paper_masks(path: str | Path) -> dict[str, Any]:
    """Read a released bigram-subnetwork mask pickle without running code from it.

    Returns the dict (HF parameter name -> numpy bool array, plus ``orig_model_name``).
    A missing, empty or truncated file, and anything else in it (other classes, functions,
    non-bool arrays), raises MaskError naming the file.
    """
    data = read_bytes(path, error=MaskError, what="Mask pickle", fix=_FIX)
    where = f"mask pickle {str(path)!r}"
    try:
        obj = _BoolArrayUnpickler(io.BytesIO(data), where).load()
    except MaskError as e:
        if str(path) in str(e):
            raise
        raise MaskError(f"{e} (in {where})") from e
    except Exception as e:  # truncated (EOFError, UnpicklingError) or not a pickle at all
        raise MaskError(f"Mask pickle {str(path)!r} is not a readable mask pickle (truncated or "
                        f"not a pickle: {type(e).__name__}: {e}). {_FIX}") from e
    return _check_paper_dict(obj, repr(str(path)))


def _check_paper_dict(obj: Any, where: str) -> dict[str, Any]:
    """``obj`` if it is a dict of boolean numpy arrays (plus ``orig_model_name``)."""
    if not isinstance(obj, Mapping):
        raise MaskError(f"{where} holds a {type(obj).__name__}, not a dict of masks.")
    for k, v in obj.items():
        if k == ORIG_NAME:
            if v is not None and not isinstance(v, str):
                raise MaskError(f"{where}: {ORIG_NAME!r} is a {type(v).__name__}, not a model "
                                "name.")
            continue
        if not isinstance(k, str) or not isinstance(v, np.ndarray) or v.dtype != np.bool_:
            what = f"{type(v).__name__} {getattr(v, 'dtype', '')}".strip()
            raise MaskError(f"{where}: entry {k!r} is not a boolean numpy array ({what}).")
    return dict(obj)


def read_paper(source: str | Path | Mapping) -> tuple[dict[str, np.ndarray], str | None]:
    """The checked masks of a paper-format file or dict, without ``orig_model_name``, and
    that name (None if absent)."""
    data = (_check_paper_dict(source, "mask dict") if isinstance(source, Mapping)
            else load_paper_masks(source))
    orig = data.pop(ORIG_NAME, None)
    return data, orig


# --------------------------------------------------------------------------- targets <-> HF


def hf_groups(targets: Sequence[Target]) -> dict[str, list[Target]]:
    """HF parameter name -> the targets inside it, in model order (fused q/k/v share one)."""
    if any(t.module is None for t in targets):
        raise MaskError("This mask set is not bound to a model; load it with "
                        "MaskSet.load(path, model) to export it.")
    no_hf = [t.name for t in targets if t.hf is None]
    if no_hf:
        raise MaskError(
            f"Target {no_hf[0]!r} has no HF parameter name (native or custom model), so "
            "the paper format does not apply. Use save()/load() instead."
        )
    groups: dict[str, list[Target]] = {}
    for t in targets:
        groups.setdefault(t.hf.name, []).append(t)
    return groups


def masks_from_paper(data: Mapping[str, np.ndarray], targets: Sequence[Target],
                     orig_model_name: str | None = None) -> dict[str, Tensor]:
    """Target name -> bool mask (CPU) cut from paper-format ``data`` (see :func:`read_paper`).

    Every maskable HF weight must have an entry of its HF shape and every entry must name
    one; otherwise MaskError names the first mismatching weight (and both shapes).
    """
    groups = hf_groups(targets)
    for hf_name, ts in groups.items():  # model order: the first mismatch is reported
        if hf_name in data and tuple(np.shape(data[hf_name])) != ts[0].hf.shape:
            raise MaskError(
                f"Mask does not fit this model: weight {hf_name!r} has shape "
                f"{ts[0].hf.shape} in the model but {tuple(np.shape(data[hf_name]))} in "
                "the mask. Use the model the mask was made for"
                f"{f' ({orig_model_name})' if orig_model_name else ''}."
            )
    for key in data:
        if key not in groups:
            raise MaskError(f"Mask entry {key!r} matches no maskable weight of this model."
                            f"{suggest(key, groups)}")
    missing = [h for h in groups if h not in data]
    if missing:
        raise MaskError(f"The mask has no entry for {missing[0]!r} (and "
                        f"{len(missing) - 1} more); it covers another set of weights.")
    out: dict[str, Tensor] = {}
    for hf_name, ts in groups.items():
        full = torch.from_numpy(np.ascontiguousarray(data[hf_name]))
        for t in ts:
            out[t.name] = t.hf.take(full)
    return out


def paper_dict(targets: Sequence[Target], hard: Mapping[str, Tensor],
               orig_model_name: str | None) -> dict[str, Any]:
    """The paper-format dict of ``hard`` masks (target name -> bool) over ``targets``.

    Fused weights are assembled from their q/k/v parts (GPT-NeoX rows re-interleaved per
    head, GPT-2 ``c_attn`` columns in Conv1D layout); entries of a fused weight no target
    covers are True (unmasked weights are kept).
    """
    out: dict[str, Any] = {}
    for hf_name, ts in hf_groups(targets).items():
        full = torch.ones(ts[0].hf.shape, dtype=torch.bool)
        for t in ts:
            t.hf.put(full, hard[t.name].cpu())
        out[hf_name] = full.numpy()
    out[ORIG_NAME] = orig_model_name
    return out


def write_paper(path: str | Path, data: Mapping[str, Any]) -> Path:
    """Atomically pickle a paper-format dict (protocol 4, as the paper's files)."""
    return atomic_write_bytes(path, pickle.dumps(dict(data), protocol=4))
