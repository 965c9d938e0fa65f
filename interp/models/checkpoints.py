"""A store of model states along a training run: safetensors + JSON metadata per step.

Layout of a store directory::

    store.json                       # the run's identity: model config, tokenizer, training config
    step-000250.safetensors          # model weights (+ optimizer state, prefixed "optim.",
                                     #  + an averaged copy of the weights, prefixed "average.")
    step-000250.json                 # step, validation loss, history, optimizer param groups

Every file is written atomically, and the JSON sidecar is written last, so a step is listed
only once both files are complete: a run killed mid-write leaves the previous checkpoint as
the latest one.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from interp.errors import CheckpointError
from interp.io import read_json, read_tensors, require_keys, save_tensors, write_json

log = logging.getLogger(__name__)

_STEP_RE = re.compile(r"^step-(\d+)\.json$")
_OPT_PREFIX = "optim."
_AVG_PREFIX = "average."
_FIX_STORE = ("Restore store.json from a backup, or delete the directory (or use another one) "
              "to start the run over.")


@dataclass
class Checkpoint:
    """One loaded checkpoint: its step, metadata and model state dict."""

    step: int
    metadata: dict
    state_dict: dict[str, torch.Tensor] = field(repr=False)


def _diff_keys(a: dict, b: dict) -> list[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


class CheckpointStore:
    """Checkpoints of one training run in one directory.

    ``identity`` (JSON-able: model config, tokenizer fingerprint, training config) is written
    to ``store.json`` on first use; opening the directory with a different identity raises
    :class:`CheckpointError`, so one run's checkpoints are never resumed by another.
    """

    def __init__(self, root: str | Path, identity: dict | None = None):
        self.root = Path(root)
        manifest = self.root / "store.json"
        if manifest.exists():
            stored = read_json(manifest, error=CheckpointError,
                               what="Checkpoint store manifest", fix=_FIX_STORE)
            if identity is not None and stored != _jsonable(identity):
                keys = _diff_keys(stored, _jsonable(identity))
                raise CheckpointError(
                    f"Checkpoint directory {str(self.root)!r} belongs to another configuration "
                    f"(differs in: {', '.join(keys)}). Use a different directory for this "
                    "configuration, or delete the old one to start over."
                )
            self.identity = stored
        elif identity is not None:
            self.identity = _jsonable(identity)
            write_json(manifest, self.identity)
        else:
            if not self.root.is_dir():
                raise CheckpointError(
                    f"Checkpoint directory {str(self.root)!r} does not exist. Check the path."
                )
            raise CheckpointError(
                f"{str(self.root)!r} is not a checkpoint store (no store.json). Point to a "
                "directory written by CheckpointStore."
            )

    # ------------------------------------------------------------------ listing
    def steps(self) -> list[int]:
        """Steps with a complete checkpoint, ascending."""
        if not self.root.is_dir():
            return []
        out = []
        for p in self.root.iterdir():
            m = _STEP_RE.match(p.name)
            if m and p.with_suffix(".safetensors").is_file():
                out.append(int(m.group(1)))
        return sorted(out)

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def _paths(self, step: int) -> tuple[Path, Path]:
        stem = self.root / f"step-{step:06d}"
        return stem.with_suffix(".safetensors"), stem.with_suffix(".json")

    def metadata(self, step: int) -> dict:
        """The JSON sidecar of ``step`` (validation loss, history, ...) without the tensors."""
        sidecar = self._paths(step)[1]
        if not sidecar.exists():
            raise CheckpointError(
                f"No checkpoint for step {step} in {str(self.root)!r}; available: {self.steps()}. "
                "Pass one of those steps."
            )
        return self._read_sidecar(step, sidecar)

    def _read_sidecar(self, step: int, sidecar: Path) -> dict:
        fix = self._fix_step(step)
        meta = read_json(sidecar, error=CheckpointError, what="Checkpoint sidecar", fix=fix)
        return require_keys(meta, ("step",), sidecar, error=CheckpointError,
                            what="Checkpoint sidecar", fix=fix)

    def _fix_step(self, step: int) -> str:
        others = [s for s in self.steps() if s != step]
        return (f"Delete both step-{step:06d} files to fall back to "
                f"{f'step {others[-1]}' if others else 'a fresh start'}, or restore them from a "
                "backup.")

    # ------------------------------------------------------------------ save / load
    def save(self, model, step: int, *, optimizer=None, average=None,
             metadata: dict | None = None) -> Path:
        """Save the model (and optimizer) state at ``step``; returns the weights path.

        ``average``: a module holding running averages of the weights (e.g. a
        ``torch.optim.swa_utils.AveragedModel``), saved beside them so a resumed run
        continues the same average.
        """
        tensors = {k: v for k, v in model.state_dict().items()}
        if average is not None:
            tensors.update({_AVG_PREFIX + k: v for k, v in average.state_dict().items()})
        meta = {"step": step, **(metadata or {})}
        if optimizer is not None:
            opt_state = optimizer.state_dict()
            for idx, state in opt_state["state"].items():
                for name, value in state.items():
                    t = value if torch.is_tensor(value) else torch.tensor(value)
                    tensors[f"{_OPT_PREFIX}{idx}.{name}"] = t
            meta["optimizer_param_groups"] = opt_state["param_groups"]
        meta["rng_state"] = torch.get_rng_state().tolist()
        weights, sidecar = self._paths(step)
        save_tensors(weights, _dedupe_shared(tensors))
        write_json(sidecar, meta)
        log.info("saved checkpoint step %d to %s", step, weights)
        return weights

    def load(self, step: int | None = None, *, model=None, optimizer=None, average=None,
             device=None) -> Checkpoint:
        """Load a checkpoint (latest when ``step`` is None) into ``model``/``optimizer``/
        ``average`` (see :meth:`save`) if given.

        A missing, empty, truncated or incomplete weights file or sidecar raises
        :class:`CheckpointError` naming the file.
        """
        if step is None:
            step = self.latest_step()
            if step is None:
                raise CheckpointError(f"No checkpoints in {str(self.root)!r} yet.")
        weights, sidecar = self._paths(step)
        if not sidecar.exists():
            raise CheckpointError(
                f"No checkpoint for step {step} in {str(self.root)!r}; available: {self.steps()}. "
                "Pass one of those steps, or step=None for the latest."
            )
        meta = self._read_sidecar(step, sidecar)
        tensors = read_tensors(weights, device=str(device) if device else "cpu",
                               error=CheckpointError, what="Checkpoint weights",
                               fix=self._fix_step(step))
        rng = None
        if "rng_state" in meta:  # checked before anything is loaded into the model
            try:
                rng = torch.tensor(meta["rng_state"], dtype=torch.uint8)
                if rng.shape != torch.get_rng_state().shape:
                    raise ValueError(f"{tuple(rng.shape)} entries, not "
                                     f"{tuple(torch.get_rng_state().shape)}")
            except (TypeError, ValueError, RuntimeError, OverflowError) as e:
                raise CheckpointError(
                    f"Checkpoint sidecar {str(sidecar)!r} has an invalid 'rng_state' ({e}). "
                    f"{self._fix_step(step)}") from e
        state = {k: v for k, v in tensors.items()
                 if not k.startswith((_OPT_PREFIX, _AVG_PREFIX))}
        if model is not None:
            _load_model_state(model, state, self.root)
        if average is not None:
            avg = {k[len(_AVG_PREFIX):]: v for k, v in tensors.items()
                   if k.startswith(_AVG_PREFIX)}
            if not avg:
                raise CheckpointError(
                    f"Checkpoint step {step} in {str(self.root)!r} holds no averaged weights: "
                    "it was saved by a run without weight averaging. Train with the same "
                    "settings as the run that wrote it, or use another directory.")
            _load_model_state(average, avg, self.root)
        if optimizer is not None:
            _load_optimizer_state(optimizer, tensors, meta)
        if rng is not None:
            torch.set_rng_state(rng)
        return Checkpoint(step, meta, state)


def _dedupe_shared(tensors: dict) -> dict:
    """Clone tensors that share storage (tied weights) so safetensors accepts them."""
    seen, out = set(), {}
    for k, v in tensors.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        out[k] = v.clone() if key in seen else v
        seen.add(key)
    return out


def _load_model_state(model, state: dict, root: Path) -> None:
    own = model.state_dict()
    for name, value in own.items():
        if name not in state:
            raise CheckpointError(
                f"Checkpoint in {str(root)!r} has no weight {name!r}: it was written by another "
                "model. Build the model with the store's configuration (store.json)."
            )
        if tuple(state[name].shape) != tuple(value.shape):
            raise CheckpointError(
                f"Checkpoint weight {name!r} has shape {tuple(state[name].shape)} but the model's "
                f"is {tuple(value.shape)}: the checkpoint belongs to another configuration."
            )
    with torch.no_grad():
        for name, value in own.items():
            value.copy_(state[name])


def _load_optimizer_state(optimizer, tensors: dict, meta: dict) -> None:
    state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith(_OPT_PREFIX):
            idx, _, name = k[len(_OPT_PREFIX):].partition(".")
            if not idx.isdigit() or not name:
                raise CheckpointError(f"Checkpoint has a malformed optimizer tensor {k!r}; it "
                                      "was not written by CheckpointStore.save.")
            state.setdefault(int(idx), {})[name] = v
    groups = meta.get("optimizer_param_groups")
    if groups is None:
        raise CheckpointError("Checkpoint has no optimizer state; cannot resume training from it.")
    try:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(
            f"Checkpoint optimizer state does not fit this optimizer ({e}). Build the optimizer "
            "the run was trained with, or resume without optimizer state.") from e


def _jsonable(obj):
    import json

    return json.loads(json.dumps(obj, default=str))
