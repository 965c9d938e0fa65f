"""A set of weight masks over a model: attach, modes, counts, algebra, edits, files.

A :class:`MaskSet` holds one tensor of mask logits per :class:`~interp.masks.targets.Target`
and a mask kind that turns logits into masks. Attached to a model, it puts a
``torch.nn.utils.parametrize`` parametrization on each real weight, so every forward pass
(bridge hooks, ``run_with_cache``, the wrapped HF module) sees ``W * mask``; detaching
restores the very same parameter objects. Modes:

- ``soft``: ``W * kind.soft(logits)`` (differentiable; training),
- ``keep``: ``W * hard`` (the subnetwork alone),
- ``ablate``: ``W * ~hard`` (the model without the subnetwork),
- ``off``: ``W`` (the full model).

Exactly-zero weights are never part of a subnetwork (the ``allowed`` buffers). Results of
algebra, edits and imports hold "hard" logits (+-``HARD_LOGIT``), which every kind maps to
the intended binary mask.

Files live in :mod:`interp.masks.files` (save/load) and :mod:`interp.masks.paper` (the bigram
paper's pickle format); this module keeps the thin methods that call them.
"""

from __future__ import annotations

import contextlib
import html
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor, nn
from torch.nn.utils import parametrize

from interp.errors import MaskError, suggest
from interp.masks import files, paper
from interp.masks.kinds import ContinuousSparsification, MaskKind, kind_from_config
from interp.masks.paper import load_paper_masks
from interp.masks.sampling import random_masks
from interp.masks.targets import Selection, Target, _check_shape, find_targets, head_dims

__all__ = ["HARD_LOGIT", "MODES", "MaskSet", "load_paper_masks"]

log = logging.getLogger(__name__)

#: Logit magnitude of a decided mask entry (keep: +HARD_LOGIT, drop: -HARD_LOGIT).
HARD_LOGIT = 1e4
MODES = ("soft", "keep", "ablate", "off")


def _clear_parametrize_cache() -> None:
    """Forget weights cached by ``parametrize.cached()``: they were computed in another mode.

    Inside ``fit_masks`` (which trains under ``parametrize.cached()``) a teacher pass in mode
    "off" would otherwise leave unmasked weights in the cache for the student's pass.
    """
    from torch.nn.utils import parametrize

    cache = getattr(parametrize, "_cache", None)
    if isinstance(cache, dict):
        cache.clear()


def _key(name: str) -> str:
    """ParameterDict key for a target name (keys cannot contain dots)."""
    return name.replace(".", "__")


class _Mask(nn.Module):
    """The parametrization on one weight: asks its mask set for ``W * mask``.

    The mask set is held outside the module tree so the model never registers the mask
    logits as its own parameters.
    """

    def __init__(self, owner: MaskSet, name: str) -> None:
        super().__init__()
        object.__setattr__(self, "_owner", owner)
        self.target_name = name

    def forward(self, weight: Tensor) -> Tensor:
        return self._owner._masked(self.target_name, weight)


class _Buffers(nn.Module):
    """Holds the ``allowed`` buffers so ``MaskSet.to(device)`` moves them."""


class MaskSet(nn.Module):
    """Mask logits for a list of targets, plus the kind that maps them to masks.

    Build with :meth:`for_model`, :meth:`empty`, :meth:`full`, :meth:`load` or
    :meth:`import_paper`. ``parameters()`` are the logits only.

    Attributes:
        targets: the masked weights, in model order.
        kind: the :class:`~interp.masks.kinds.MaskKind` shared by all targets.
        mode: how an attached set acts (see module docs).
        identity: :func:`interp.models.lm.model_identity` of the model (empty if unknown).
        metadata: free-form provenance saved with the mask set; ``objective`` and ``lam``
            read and write its ``"objective"`` and ``"lambda"`` entries.
    """

    def __init__(
        self,
        targets: Sequence[Target],
        kind: MaskKind | None = None,
        logits: Mapping[str, Tensor] | None = None,
        allowed: Mapping[str, Tensor] | None = None,
        *,
        heads: tuple[int, int, int] | None = None,
        identity: dict | None = None,
        metadata: dict | None = None,
    ) -> None:
        super().__init__()
        self.targets = list(targets)
        self.kind = kind if kind is not None else ContinuousSparsification()
        keys = [_key(t.name) for t in self.targets]
        if len(set(keys)) != len(keys):
            raise MaskError("Target names collide once dots become '__'; rename the targets.")
        self._logits = nn.ParameterDict()
        self._allowed = _Buffers()
        for t, k in zip(self.targets, keys):
            lg = logits[t.name] if logits is not None else self.kind.init_logits(t.shape)
            al = allowed[t.name] if allowed is not None else t.nonzero()
            _check_shape(t.name, tuple(lg.shape), t.shape)
            self._logits[k] = nn.Parameter(lg.detach().to(torch.float32).clone())
            self._allowed.register_buffer(k, al.detach().to(torch.bool).clone())
        self._by_name = {t.name: t for t in self.targets}
        self.heads = heads
        self.identity = dict(identity or {})
        self.metadata = dict(metadata or {})
        self._mode = "soft"
        self._bound: list[Target] | None = None
        self._frozen: list[tuple[Tensor, bool]] = []

    # ------------------------------------------------------------------ construction

    @classmethod
    def for_model(
        cls,
        model: nn.Module,
        kind: MaskKind | None = None,
        targets: Selection | None = None,
        seed: int = 0,
    ) -> MaskSet:
        """A fresh mask set over ``model``'s targets (default: all attention and MLP weights).

        ``seed`` seeds the kind's initial logits (hard concrete adds noise).
        """
        kind = kind if kind is not None else ContinuousSparsification()
        ts = find_targets(model, targets)
        gen = torch.Generator().manual_seed(seed)
        logits = {t.name: kind.init_logits(t.shape, generator=gen).to(t.original.device)
                  for t in ts}
        return cls(ts, kind, logits, heads=head_dims(model), identity=_identity(model))

    @classmethod
    def full(cls, model: nn.Module, kind: MaskKind | None = None,
             targets: Selection | None = None) -> MaskSet:
        """Every (nonzero) weight kept."""
        return cls.for_model(model, kind, targets)._filled(True)

    @classmethod
    def empty(cls, model: nn.Module, kind: MaskKind | None = None,
              targets: Selection | None = None) -> MaskSet:
        """No weight kept (embeddings, biases and norms are never masked, so they remain)."""
        return cls.for_model(model, kind, targets)._filled(False)

    def _filled(self, keep: bool) -> MaskSet:
        for name in self.names:
            self.set_target(name, keep)
        return self

    def _from_hard(self, masks: Mapping[str, Tensor]) -> MaskSet:
        """A new mask set over the same targets whose logits encode ``masks``."""
        return MaskSet(
            self.targets, kind_from_config(self.kind.config()),
            {n: _hard_logits(m) for n, m in masks.items()}, self.allowed, heads=self.heads,
            identity=self.identity, metadata=self.metadata,
        )

    # ------------------------------------------------------------------ views

    @property
    def objective(self) -> str | None:
        """Name of the objective the masks were trained for (``metadata["objective"]``)."""
        return self.metadata.get("objective")

    @objective.setter
    def objective(self, value: str | None) -> None:
        self.metadata["objective"] = value

    @property
    def lam(self) -> float | None:
        """Sparsity weight the masks were trained with (``metadata["lambda"]``)."""
        return self.metadata.get("lambda")

    @lam.setter
    def lam(self, value: float | None) -> None:
        self.metadata["lambda"] = value

    @property
    def names(self) -> list[str]:
        """Target names in model order."""
        return [t.name for t in self.targets]

    @property
    def logits(self) -> dict[str, nn.Parameter]:
        """Target name -> mask logits (the trainable tensors)."""
        return {t.name: self._logits[_key(t.name)] for t in self.targets}

    @property
    def allowed(self) -> dict[str, Bool[Tensor, "*shape"]]:
        """Target name -> True where the weight may be kept (False at exact zeros)."""
        return {t.name: getattr(self._allowed, _key(t.name)) for t in self.targets}

    def eligible_masks(self) -> dict[str, Bool[Tensor, "*shape"]]:
        """Copies of :attr:`allowed`: the weights a subnetwork can contain at all."""
        return {n: a.clone() for n, a in self.allowed.items()}

    def target(self, name: str) -> Target:
        """The target called ``name`` (MaskError with suggestions if there is none)."""
        if name not in self._by_name:
            raise MaskError(f"No mask target {name!r}.{suggest(name, self.names)}")
        return self._by_name[name]

    @property
    def n_weights(self) -> int:
        """Number of maskable weights (exact zeros excluded)."""
        return sum(int(a.sum()) for a in self.allowed.values())

    @torch.no_grad()
    def hard_masks(self) -> dict[str, Bool[Tensor, "*shape"]]:
        """Target name -> binary mask (True = keep); exact zeros are False."""
        al = self.allowed
        return {n: self.kind.hard(lg.detach()) & al[n] for n, lg in self.logits.items()}

    def penalty(self) -> Float[Tensor, ""]:
        """Differentiable sum of expected mask values over maskable weights.

        The hot path of mask training: the sum over all entries minus the (few, cached)
        exact-zero entries, whose value is subtracted without a gradient. They are forced out
        whatever their logits, and a full-size ``where`` or product with the bool buffer
        cost about 15% of a Pythia-160M-sized step.
        """
        terms = []
        for n, lg in self.logits.items():
            e = self.kind.expected(lg)
            t = e.sum()
            bad = self._forbidden(n)
            if bad.numel():
                t = t - e.detach().flatten().index_select(0, bad).sum()
            terms.append(t)
        return torch.stack(terms).sum()

    def _forbidden(self, name: str) -> Tensor:
        """Flat indices of ``name``'s exact-zero weights, cached per allowed-buffer state."""
        al = getattr(self._allowed, _key(name))
        state = (al.device, al.data_ptr(), al._version)
        cache = self.__dict__.setdefault("_forbidden_cache", {})
        hit = cache.get(name)
        if hit is None or hit[0] != state:
            hit = (state, (~al).flatten().nonzero().squeeze(1))
            cache[name] = hit
        return hit[1]

    def n_active(self) -> int:
        """Weights kept by the hard mask (the subnetwork's size)."""
        return sum(int(m.sum()) for m in self.hard_masks().values())

    def active_fraction(self) -> float:
        """Kept weights / maskable weights under the hard mask."""
        return self.n_active() / max(1, self.n_weights)

    # ------------------------------------------------------------------ attaching

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, mode: str) -> None:
        if mode not in MODES:
            hint = (" 'hard' was another name for 'keep' (the subnetwork alone): use 'keep'."
                    if mode == "hard" else suggest(mode, MODES))
            raise MaskError(f"Unknown mask mode {mode!r}; modes are {MODES}.{hint}")
        if mode != getattr(self, "_mode", None):
            _clear_parametrize_cache()
        self._mode = mode

    @property
    def attached(self) -> bool:
        return self._bound is not None

    def attach(self, model: nn.Module, *, freeze: bool = True) -> MaskSet:
        """Parametrize every target weight of ``model`` with this set's masks.

        ``model`` may be the model the set was built for or another instance of the same
        architecture (targets are found again by module path and shape-checked). With
        ``freeze``, every model parameter gets ``requires_grad=False`` until :meth:`detach`,
        so gradients reach only the mask logits.
        """
        if self.attached:
            raise MaskError("This mask set is already attached; call detach() first.")
        bound = [t if _owns(model, t) else t.rebind(model) for t in self.targets]
        done: list[Target] = []
        try:
            for t in bound:
                if parametrize.is_parametrized(t.module, t.param_name):
                    raise MaskError(
                        f"Weight {t.name!r} is already parametrized (another mask set "
                        "attached?). Detach that first."
                    )
                parametrize.register_parametrization(t.module, t.param_name, _Mask(self, t.name))
                done.append(t)
        except BaseException:
            _remove(done)
            raise
        self._bound = bound
        if freeze:
            self._frozen = [(p, p.requires_grad) for p in model.parameters()]
            for p, _ in self._frozen:
                p.requires_grad_(False)
        return self

    def detach(self) -> None:
        """Remove the parametrizations; the original parameter objects come back unchanged."""
        if self._bound is None:
            return
        bound, self._bound = self._bound, None
        try:
            _remove(bound)
        finally:
            for p, flag in self._frozen:
                p.requires_grad_(flag)
            self._frozen = []

    @contextlib.contextmanager
    def applied(self, model: nn.Module, mode: str = "keep") -> Iterator[MaskSet]:
        """Attach in ``mode`` for the block's duration; detach on exit, also on errors.

        If the set is already attached, only the mode is switched (and restored).
        """
        if self.attached:
            if not _owns(model, self._bound[0]):
                raise MaskError("This mask set is attached to another model; detach it first.")
            with self.using(mode):
                yield self
            return
        old = self.mode
        self.mode = mode
        self.attach(model)
        try:
            yield self
        finally:
            self.mode = old
            self.detach()

    @contextlib.contextmanager
    def using(self, mode: str) -> Iterator[MaskSet]:
        """Switch the mode for the block's duration."""
        old = self.mode
        self.mode = mode
        try:
            yield self
        finally:
            self.mode = old

    def _masked(self, name: str, weight: Tensor) -> Tensor:
        """``weight`` under the current mode (called by the parametrizations)."""
        mode = self._mode
        if mode == "off":
            return weight
        key = _key(name)
        logits = self._logits[key]
        if mode == "soft":
            mask = self.kind.soft(logits)
        else:
            keep = self.kind.hard(logits) & getattr(self._allowed, key)
            mask = ~keep if mode == "ablate" else keep
        return weight * mask.to(device=weight.device, dtype=weight.dtype)

    # ------------------------------------------------------------------ counts

    def table(self) -> list[dict[str, Any]]:
        """One row per target: name, layer, block, kept, total (maskable), fraction."""
        rows = []
        al = self.allowed
        for t, (n, m) in zip(self.targets, self.hard_masks().items()):
            kept, total = int(m.sum()), int(al[n].sum())
            rows.append({"name": n, "layer": t.layer, "block": t.block, "kept": kept,
                         "total": total, "fraction": kept / max(1, total)})
        return rows

    def counts(self) -> dict[int | None, dict[str, int]]:
        """Kept weights per layer and block: ``{layer: {block: kept}}``."""
        out: dict[int | None, dict[str, int]] = {}
        for r in self.table():
            row = out.setdefault(r["layer"], {})
            row[r["block"]] = row.get(r["block"], 0) + r["kept"]
        return out

    def summary(self) -> str:
        """A text table of kept weights per layer and block."""
        rows = self.table()
        kept = sum(r["kept"] for r in rows)
        title = (f"MaskSet({len(rows)} targets, kind={self.kind.name}, mode={self.mode}, "
                 f"kept {kept:,} / {self.n_weights:,} = {kept / max(1, self.n_weights):.2%})")
        lines = [
            title,
            f"{'layer':>5}  {'block':<8} {'kept':>10} {'total':>10} {'%':>8}",
        ]
        for r in rows:
            layer = "-" if r["layer"] is None else r["layer"]
            lines.append(f"{layer:>5}  {r['block']:<8} {r['kept']:>10,} {r['total']:>10,} "
                         f"{r['fraction']:>8.2%}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.summary()

    def _repr_html_(self) -> str:
        rows = self.table()
        blocks = list(dict.fromkeys(r["block"] for r in rows))
        layers = list(dict.fromkeys(r["layer"] for r in rows))
        cell = {(r["layer"], r["block"]): r for r in rows}
        head = "".join(f"<th>{html.escape(b)}</th>" for b in blocks)
        body = []
        for layer in layers:
            tds = []
            for b in blocks:
                r = cell.get((layer, b))
                tds.append("<td></td>" if r is None else
                           f"<td title='{r['kept']:,} / {r['total']:,}'>{r['kept']:,} "
                           f"({r['fraction']:.1%})</td>")
            body.append(f"<tr><th>{'-' if layer is None else layer}</th>{''.join(tds)}</tr>")
        title = html.escape(self.summary().splitlines()[0])
        return (f"<div><p>{title}</p><table><thead><tr><th>layer</th>{head}</tr></thead>"
                f"<tbody>{''.join(body)}</tbody></table></div>")

    # ------------------------------------------------------------------ algebra

    def _check_compatible(self, other: MaskSet) -> None:
        if not isinstance(other, MaskSet):
            raise MaskError(f"Cannot combine a MaskSet with {type(other).__name__}.")
        if self.names != other.names:
            missing = [n for n in self.names if n not in other.names] or [
                n for n in other.names if n not in self.names] or self.names
            raise MaskError(
                f"Mask sets cover different targets (first difference: {missing[0]!r}). "
                "Combine mask sets built for the same model and targets."
            )
        for t, u in zip(self.targets, other.targets):
            _check_shape(t.name, u.shape, t.shape)

    def _combine(self, other: MaskSet, op: Callable[[Tensor, Tensor], Tensor]) -> MaskSet:
        self._check_compatible(other)
        a, b, al = self.hard_masks(), other.hard_masks(), self.allowed
        return self._from_hard({n: op(a[n], b[n].to(a[n].device)) & al[n] for n in a})

    def __or__(self, other: MaskSet) -> MaskSet:
        return self._combine(other, torch.logical_or)

    def __and__(self, other: MaskSet) -> MaskSet:
        return self._combine(other, torch.logical_and)

    def __sub__(self, other: MaskSet) -> MaskSet:
        return self._combine(other, lambda x, y: x & ~y)

    def __invert__(self) -> MaskSet:
        al = self.allowed
        return self._from_hard({n: ~m & al[n] for n, m in self.hard_masks().items()})

    def hardened(self) -> MaskSet:
        """A copy whose logits encode this set's current hard masks."""
        return self._from_hard(self.hard_masks())

    def random_like(self, seed: int = 0) -> MaskSet:
        """A random mask set with the same number kept in every target (element level).

        Kept positions are drawn uniformly among maskable weights; same seed, same result.
        The plain-dict form is :func:`~interp.masks.sampling.random_masks`.
        """
        return self._from_hard(random_masks(self.hard_masks(), eligible=self.allowed, seed=seed))

    # ------------------------------------------------------------------ editing

    @torch.no_grad()
    def _set(self, name: str, keep: bool, axis: int | None = None, index=None) -> None:
        lg = self._logits[_key(self.target(name).name)]
        value = HARD_LOGIT if keep else -HARD_LOGIT
        if axis is None:
            lg.fill_(value)
        else:
            idx = torch.as_tensor(index, dtype=torch.long, device=lg.device).reshape(-1)
            lg.index_fill_(axis, idx, value)

    def set_target(self, name: str, keep: bool) -> MaskSet:
        """Keep (True) or drop (False) a whole target; returns self."""
        self._set(name, keep)
        return self

    def set_layer(self, layer: int, keep: bool) -> MaskSet:
        """Keep or drop every target of a layer; returns self."""
        names = [t.name for t in self.targets if t.layer == layer]
        if not names:
            layers = sorted({t.layer for t in self.targets if t.layer is not None})
            raise MaskError(f"No mask targets in layer {layer}; layers are {layers}.")
        for n in names:
            self._set(n, keep)
        return self

    def set_head(self, layer: int, head: int, keep: bool, which: str = "qkvo") -> MaskSet:
        """Keep or drop attention head ``head`` of ``layer`` in the weights named by ``which``.

        q/k/v: the head's ``d_head`` output features; o: its input features. With grouped
        key/value heads, k and v edit the shared key/value head of ``head``. Returns self.
        """
        if self.heads is None:
            raise MaskError("This mask set knows no head layout (n_heads, d_head).")
        n_heads, d_head, n_kv = self.heads
        if not 0 <= head < n_heads:
            raise MaskError(f"Head {head} out of range: the model has {n_heads} heads.")
        bad = set(which) - set("qkvo")
        if bad or not which:
            raise MaskError(f"which={which!r} must be letters from 'qkvo'.")
        for letter in which:
            t = self.target(f"blocks.{layer}.attn.{letter}")
            h = head // (n_heads // n_kv) if letter in "kv" else head
            axis = t.in_axis if letter == "o" else t.out_axis
            self._set(t.name, keep, axis, range(h * d_head, (h + 1) * d_head))
        return self

    def set_neuron(self, layer: int, index: int | Sequence[int], keep: bool) -> MaskSet:
        """Keep or drop MLP neuron(s): row(s) of mlp_in (and gate), column(s) of mlp_out."""
        found = False
        for t in self.targets:
            if t.layer == layer and t.block in ("mlp_in", "mlp_gate", "mlp_out"):
                axis = t.in_axis if t.block == "mlp_out" else t.out_axis
                idx = torch.as_tensor(index).reshape(-1)
                if idx.numel() and (idx.min() < 0 or idx.max() >= t.shape[axis]):
                    raise MaskError(f"Neuron index out of range for {t.name} ({t.shape[axis]}).")
                self._set(t.name, keep, axis, idx)
                found = True
        if not found:
            raise MaskError(f"No MLP mask targets in layer {layer}.")
        return self

    # ------------------------------------------------------------------ files

    def save(self, path: str | Path) -> Path:
        """Write logits (safetensors) and a JSON sidecar (same stem) atomically.

        Returns the ``.safetensors`` path (the suffix is added if ``path`` lacks it).
        """
        side = files.build_sidecar(identity=self.identity, heads=self.heads,
                                   targets=self.targets, kind=self.kind, mode=self.mode,
                                   metadata=self.metadata)
        return files.write_mask_files(path, self.logits, self.allowed, side)

    @classmethod
    def load(cls, path: str | Path, model: nn.Module | None = None,
             targets: Selection | None = None) -> MaskSet:
        """Load a mask set saved by :meth:`save`.

        With ``model``, targets are found in it now (by name for bridges, else by module
        path, or by the same ``targets`` selection used to build the set), and a model whose
        weights have other shapes raises MaskError naming the first mismatching weight and
        both shapes. Without ``model`` the set is unbound: counts, algebra, edits and saving
        work, and :meth:`attach` / :meth:`applied` find the weights in the model they get.
        Missing, empty, truncated or inconsistent files raise MaskError naming the file.
        """
        saved = files.read_mask_files(
            path, model, targets, model_identity=_identity(model) if model is not None else None)
        ms = cls(saved.targets, saved.kind, saved.logits, saved.allowed, heads=saved.heads,
                 identity=saved.identity, metadata=saved.metadata)
        if saved.mode not in MODES:
            raise MaskError(f"Mask-set sidecar {str(files.sidecar_path(path))!r} has mode "
                            f"{saved.mode!r}; modes are {MODES}. Fix or re-save the file.")
        ms.mode = saved.mode
        return ms

    @classmethod
    def import_paper(cls, source: str | Path | Mapping, model: nn.Module,
                     kind: MaskKind | None = None) -> MaskSet:
        """Import a bigram-subnetwork mask: HF parameter name -> bool array (True = keep).

        ``source`` is a pickle file (read with a restricted unpickler that admits numpy
        boolean arrays only; see :func:`load_paper_masks`) or an already loaded dict.
        """
        data, orig = paper.read_paper(source)
        ms = cls.for_model(model, kind)
        masks = paper.masks_from_paper(data, ms.targets, orig)
        with torch.no_grad():
            for name, mask in masks.items():
                lg = ms._logits[_key(name)]
                lg.copy_(_hard_logits(mask).to(lg.device))
        ms.metadata["orig_model_name"] = orig
        return ms

    def export_paper(self, path: str | Path, orig_model_name: str | None = None) -> Path:
        """Write the bigram paper's format: pickled dict HF name -> bool array (True = keep).

        Fused weights are assembled from their q/k/v parts (GPT-NeoX rows re-interleaved
        per head, GPT-2 ``c_attn`` columns in Conv1D layout); entries of a fused weight no
        target covers are True (unmasked weights are kept).
        """
        data = paper.paper_dict(self.targets, self.hard_masks(),
                                orig_model_name or self.identity.get("name"))
        return paper.write_paper(path, data)


# --------------------------------------------------------------------------- helpers


def _hard_logits(mask: Tensor) -> Float[Tensor, "*shape"]:
    m = mask.to(torch.bool)
    return torch.where(m, HARD_LOGIT, -HARD_LOGIT).to(torch.float32)


def _owns(model: nn.Module, t: Target) -> bool:
    """True if ``t.module`` is the module at ``t.module_path`` in ``model``."""
    if t.module is None:
        return False
    if t.module_path is None:
        return True
    try:
        return model.get_submodule(t.module_path) is t.module
    except AttributeError:
        return False


def _remove(targets: Sequence[Target]) -> None:
    """Remove parametrizations leaving the original parameters; try all, raise the first error."""
    err: BaseException | None = None
    for t in targets:
        try:
            if parametrize.is_parametrized(t.module, t.param_name):
                parametrize.remove_parametrizations(t.module, t.param_name,
                                                    leave_parametrized=False)
        except BaseException as e:  # noqa: BLE001  keep going: leave little behind
            err = err or e
    if err is not None:
        raise err


def _identity(model: nn.Module) -> dict:
    if getattr(model, "cfg", None) is None or not hasattr(model.cfg, "n_layers"):
        return {}
    from interp.models.lm import model_identity

    return model_identity(model)
