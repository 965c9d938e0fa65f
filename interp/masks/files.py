"""Mask-set files: ``<stem>.safetensors`` (logits + allowed masks) and a ``<stem>.json`` sidecar.

The sidecar records the model identity, head layout, targets (name, shape, module path, ...),
the mask kind's config (with its schedule state), the mode and free-form metadata. Both files
are written atomically, the sidecar last. Reading checks both completely and raises
:class:`~interp.errors.MaskError` naming the file for anything missing, empty, truncated or
inconsistent; a failed read never changes the files.

These functions work on targets, dicts and tensors;
:meth:`MaskSet.save <interp.masks.maskset.MaskSet.save>` and :meth:`MaskSet.load
<interp.masks.maskset.MaskSet.load>` build on them.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from interp.errors import MaskError, suggest
from interp.io import read_json, read_tensors, require_keys, save_tensors, write_json
from interp.masks.kinds import MaskKind, kind_from_config
from interp.masks.targets import Selection, Target, _check_shape, find_targets, head_dims

log = logging.getLogger(__name__)

FORMAT = "interp.maskset"
ALLOWED = "allowed/"  # key prefix of the allowed masks in saved files
_SIDECAR_KEYS = ("format", "targets", "kind")
_TARGET_KEYS = ("name", "param_name", "shape", "layer", "block", "out_axis", "module_path")
_FIX = "Save the mask set again (MaskSet.save), or restore both files from a backup."
#: Modes older files may hold, and what they mean now.
_LEGACY_MODES = {"hard": "keep"}


def mask_path(path: str | Path) -> Path:
    """The ``.safetensors`` path of a mask set saved at ``path`` (suffix added if missing)."""
    path = Path(path)
    return path if path.suffix == ".safetensors" else path.with_name(path.name + ".safetensors")


def sidecar_path(path: str | Path) -> Path:
    """The JSON sidecar next to :func:`mask_path` ``(path)``."""
    return mask_path(path).with_suffix(".json")


def build_sidecar(*, identity: dict, heads: tuple[int, int, int] | None,
                  targets: Sequence[Target], kind: MaskKind, mode: str,
                  metadata: dict) -> dict[str, Any]:
    """The JSON sidecar of a mask set (``objective``/``lambda`` copied from ``metadata``)."""
    return {
        "format": FORMAT, "version": 1, "model": identity,
        "heads": list(heads) if heads else None,
        "targets": [t.info() for t in targets], "kind": kind.config(),
        "mode": mode, "objective": metadata.get("objective"), "lambda": metadata.get("lambda"),
        "metadata": metadata,
    }


def write_mask_files(path: str | Path, logits: Mapping[str, Tensor],
                     allowed: Mapping[str, Tensor], sidecar: dict) -> Path:
    """Write the tensors, then the sidecar (both atomic); returns the ``.safetensors`` path."""
    path = mask_path(path)
    tensors = {n: lg.detach() for n, lg in logits.items()}
    tensors.update({ALLOWED + n: a for n, a in allowed.items()})
    save_tensors(path, tensors, metadata={"format": FORMAT})
    write_json(sidecar_path(path), sidecar)
    return path


@dataclass
class SavedMaskSet:
    """What a pair of mask-set files holds, checked; the arguments of ``MaskSet(...)``."""

    targets: list[Target]
    kind: MaskKind
    logits: dict[str, Tensor]
    allowed: dict[str, Tensor]
    heads: tuple[int, int, int] | None
    identity: dict
    metadata: dict
    mode: str


def read_mask_files(path: str | Path, model: nn.Module | None = None,
                    selection: Selection | None = None, *,
                    model_identity: dict | None = None) -> SavedMaskSet:
    """Read and check what :func:`write_mask_files` wrote.

    With ``model``, targets are found in it (by name, else by module path, or by the same
    ``selection`` used to build the set) and shape-checked; ``model_identity`` is its
    identity (compared with the saved one: a difference is logged). Without ``model`` the
    targets are unbound (known by name, shape and module path only).
    """
    path = mask_path(path)
    side_path = sidecar_path(path)
    side = read_json(side_path, error=MaskError, what="Mask-set sidecar", fix=_FIX)
    require_keys(side, _SIDECAR_KEYS, side_path, error=MaskError, what="Mask-set sidecar",
                 fix=_FIX)
    if side["format"] != FORMAT:
        raise MaskError(f"Mask-set sidecar {str(side_path)!r} is not an interp mask-set sidecar "
                        f"(format {side['format']!r}). Pass the path of a file written by "
                        "MaskSet.save.")
    saved = _saved_targets(side, side_path)
    names = [info["name"] for info in saved]
    tensors = read_tensors(path, error=MaskError, what="Mask file", fix=_FIX,
                           required=[k for n in names for k in (n, ALLOWED + n)])
    for info in saved:
        for key in (info["name"], ALLOWED + info["name"]):
            if tuple(tensors[key].shape) != tuple(info["shape"]):
                raise MaskError(
                    f"Mask file {str(path)!r}: tensor {key!r} has shape "
                    f"{tuple(tensors[key].shape)} but its sidecar says {tuple(info['shape'])}; "
                    f"the two files belong to different mask sets. {_FIX}")
    try:
        kind = kind_from_config(side["kind"] if isinstance(side["kind"], dict) else {})
    except MaskError as e:
        raise MaskError(f"Mask-set sidecar {str(side_path)!r}: {e}") from e
    mode = side.get("mode") or "soft"
    mode = _LEGACY_MODES.get(mode, mode)
    saved_model = side.get("model") if isinstance(side.get("model"), dict) else {}
    metadata = side.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise MaskError(f"Mask-set sidecar {str(side_path)!r}: 'metadata' is a "
                        f"{type(metadata).__name__}, not a dict. {_FIX}")
    if model is None:
        ts = [unbound_target(info) for info in saved]
        heads = tuple(side["heads"]) if side.get("heads") else None
        identity = saved_model
    else:
        ts = resolve_saved(model, saved, selection)
        heads = head_dims(model)
        ident = model_identity or {}
        if saved_model and ident and saved_model != ident:
            log.warning("mask set %s was made for %s, loading it for %s", path,
                        saved_model.get("name"), ident.get("name"))
        identity = saved_model or ident
    return SavedMaskSet(
        targets=ts, kind=kind,
        logits={t.name: tensors[t.name] for t in ts},
        allowed={t.name: tensors[ALLOWED + t.name] for t in ts},
        heads=heads, identity=identity, metadata=dict(metadata), mode=mode,
    )


def _saved_targets(side: dict, side_path: Path) -> list[dict]:
    """The sidecar's target list, each entry checked for the keys a target needs."""
    saved = side["targets"]
    if not isinstance(saved, list) or not all(isinstance(i, dict) for i in saved):
        raise MaskError(f"Mask-set sidecar {str(side_path)!r}: 'targets' is not a list of "
                        f"target descriptions. {_FIX}")
    for i, info in enumerate(saved):
        require_keys(info, _TARGET_KEYS, side_path, error=MaskError,
                     what=f"Mask-set sidecar (target {i})", fix=_FIX)
    return saved


def unbound_target(info: dict) -> Target:
    """A target known by name, shape and module path only (bound at attach time)."""
    return Target(name=info["name"], module=None, param_name=info["param_name"],
                  shape=tuple(info["shape"]), layer=info["layer"], block=info["block"],
                  out_axis=info["out_axis"], module_path=info["module_path"])


def resolve_saved(model: nn.Module, saved: list[dict], selection: Selection | None
                  ) -> list[Target]:
    """Targets of ``model`` matching a sidecar's target list, in the sidecar's order."""
    if selection is not None:
        ts = {t.name: t for t in find_targets(model, selection)}
    else:
        try:
            ts = {t.name: t for t in find_targets(model)}
        except MaskError:
            ts = {}
    out = []
    for info in saved:
        name = info["name"]
        if name in ts:
            out.append(ts[name])
            continue
        if not info.get("module_path"):
            raise MaskError(f"Mask target {name!r} is not in this model.{suggest(name, ts)}")
        out.append(unbound_target(info).rebind(model))
    for t, info in zip(out, saved):
        _check_shape(t.name, tuple(t.original.shape), tuple(info["shape"]))
    return out
