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

Granularity: by default every weight has its own logit (``"element"``), so the logits, their
gradients and AdamW's two moments cost four float32 tensors the size of the masked weights.
``granularity="head" | "neuron" | "structured"`` ties each attention head's q/k/v rows and o
columns to one logit (``blocks.{l}.attn.heads``) and each MLP neuron's in row and out column
to one logit (``blocks.{l}.mlp.neurons``): a few thousand logits instead of millions. Such a
set acts exactly as the elementwise set holding the expanded logits; ``logits`` and
``hard_masks()`` are elementwise, so counts, layout, overlap and algebra work unchanged.

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
from interp.masks.targets import (
    GRANULARITIES,
    Group,
    Selection,
    Target,
    _check_shape,
    find_targets,
    group_targets,
    head_dims,
)

__all__ = ["GRANULARITIES", "HARD_LOGIT", "MODES", "MaskSet", "load_paper_masks"]

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
        granularity: ``"element"``, ``"head"``, ``"neuron"`` or ``"structured"`` (see module
            docs); ``groups`` maps each structured target to its shared logits.
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
        granularity: str = "element",
    ) -> None:
        """``logits``: element logits by target name, and for a structured set either those
        (constant within each head / neuron) or the shared vectors by group name."""
        super().__init__()
        self.targets = list(targets)
        self.kind = kind if kind is not None else ContinuousSparsification()
        self.granularity = granularity
        self.groups: dict[str, Group] = group_targets(self.targets, granularity, heads)
        keys = [_key(t.name) for t in self.targets]
        group_keys = {_key(g.name) for g in self.groups.values()}
        if len(set(keys)) != len(keys) or group_keys & set(keys):
            raise MaskError("Target names collide once dots become '__'; rename the targets.")
        self._logits = nn.ParameterDict()
        self._allowed = _Buffers()
        for t, k in zip(self.targets, keys):
            al = allowed[t.name] if allowed is not None else t.nonzero()
            _check_shape(t.name, tuple(al.shape), t.shape)
            self._allowed.register_buffer(k, al.detach().to(torch.bool).clone())
            g = self.groups.get(t.name)
            if g is None:
                lg = logits[t.name] if logits is not None else self.kind.init_logits(t.shape)
                _check_shape(t.name, tuple(lg.shape), t.shape)
            elif _key(g.name) in self._logits:
                continue
            elif logits is not None:
                lg = self._group_init(g, logits)
            else:
                lg = self.kind.init_logits((g.n,))
            self._logits[_key(g.name if g else t.name)] = nn.Parameter(
                lg.detach().to(torch.float32).clone())
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
        granularity: str = "element",
    ) -> MaskSet:
        """A fresh mask set over ``model``'s targets (default: all attention and MLP weights).

        ``seed`` seeds the kind's initial logits (hard concrete adds noise). ``granularity``:
        ``"element"`` (one logit per weight), ``"head"`` (one per attention head, shared by
        its q/k/v rows and o columns), ``"neuron"`` (one per MLP neuron, shared by its in /
        gate row and out column) or ``"structured"`` (heads and neurons); targets the
        granularity does not cover keep one logit per weight.
        """
        kind = kind if kind is not None else ContinuousSparsification()
        ts = find_targets(model, targets)
        heads = head_dims(model)
        groups = group_targets(ts, granularity, heads)
        gen = torch.Generator().manual_seed(seed)
        logits: dict[str, Tensor] = {}
        for t in ts:
            g = groups.get(t.name)
            name, shape = (t.name, t.shape) if g is None else (g.name, (g.n,))
            if name not in logits:
                logits[name] = kind.init_logits(shape, generator=gen).to(t.original.device)
        return cls(ts, kind, logits, heads=heads, identity=_identity(model),
                   granularity=granularity)

    @classmethod
    def full(cls, model: nn.Module, kind: MaskKind | None = None,
             targets: Selection | None = None, granularity: str = "element") -> MaskSet:
        """Every (nonzero) weight kept."""
        return cls.for_model(model, kind, targets, granularity=granularity)._filled(True)

    @classmethod
    def empty(cls, model: nn.Module, kind: MaskKind | None = None,
              targets: Selection | None = None, granularity: str = "element") -> MaskSet:
        """No weight kept (embeddings, biases and norms are never masked, so they remain)."""
        return cls.for_model(model, kind, targets, granularity=granularity)._filled(False)

    @torch.no_grad()
    def _filled(self, keep: bool) -> MaskSet:
        for lg in self._logits.values():
            lg.fill_(HARD_LOGIT if keep else -HARD_LOGIT)
        return self

    def _group_init(self, g: Group, logits: Mapping[str, Tensor]) -> Tensor:
        """Group ``g``'s vector from ``logits``: given by group name, or read off the element
        logits of its targets, which must then be constant within each head / neuron."""
        if g.name in logits:
            lg = logits[g.name]
            if tuple(lg.shape) != (g.n,):
                raise MaskError(f"Logits of {g.name!r} have shape {tuple(lg.shape)}, not "
                                f"({g.n},).")
            return lg
        members = [t for t in self.targets if self.groups.get(t.name) == g]
        missing = [t.name for t in members if t.name not in logits]
        if missing:
            raise MaskError(f"No logits for {g.name!r} nor for its target {missing[0]!r}.")
        for t in members:
            _check_shape(t.name, tuple(logits[t.name].shape), t.shape)
        vec = g.first(logits[members[0].name])
        for t in members:
            lg = logits[t.name]
            if not torch.equal(g.expand(vec.to(lg.device), t.shape), lg):
                raise MaskError(
                    f"Logits of {t.name!r} differ within one {g.name.rsplit('.', 1)[1][:-1]}, "
                    f"so they cannot be stored as granularity {self.granularity!r}. Use "
                    "granularity='element' for them."
                )
        return vec

    def _from_hard(self, masks: Mapping[str, Tensor]) -> MaskSet:
        """A new mask set over the same targets whose logits encode ``masks``.

        A structured set keeps its granularity when every head / neuron is kept or dropped
        whole (its maskable weights all True or all False), else the result is elementwise.
        """
        logits = {n: _hard_logits(m) for n, m in masks.items()}
        granularity = self.granularity
        if self.groups:
            groups = self._hard_groups(masks)
            if groups is None:
                log.info("masks are not constant per head / neuron: the result of a %r mask "
                         "set is elementwise", self.granularity)
                granularity = "element"
            else:
                logits.update({n: _hard_logits(k) for n, k in groups.items()})
                logits = {n: lg for n, lg in logits.items() if n not in self.groups}
        return MaskSet(
            self.targets, kind_from_config(self.kind.config()), logits, self.allowed,
            heads=self.heads, identity=self.identity, metadata=self.metadata,
            granularity=granularity,
        )

    @torch.no_grad()
    def _group_counts(self, masks: Mapping[str, Tensor]
                      ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Per group and unit (head / neuron): kept maskable weights, and maskable weights."""
        kept: dict[str, Tensor] = {}
        total: dict[str, Tensor] = {}
        al = self.allowed
        for name, g in self.groups.items():
            ok = al[name]
            m = masks[name].to(ok.device) & ok
            kept[g.name] = kept.get(g.name, 0) + g.per_group(m.to(torch.int64))
            total[g.name] = total.get(g.name, 0) + g.per_group(ok.to(torch.int64))
        return kept, total

    def _hard_groups(self, masks: Mapping[str, Tensor]) -> dict[str, Tensor] | None:
        """Per group, True where all its maskable weights are kept, False where none is;
        None if some head / neuron is partly kept."""
        kept, total = self._group_counts(masks)
        if any(bool(((k != 0) & (k != total[n])).any()) for n, k in kept.items()):
            return None
        return {n: k > 0 for n, k in kept.items()}

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
    def logits(self) -> dict[str, Tensor]:
        """Target name -> element mask logits: the trainable tensors of an elementwise set;
        for structured targets an expanded (read-only) view of their group's logits."""
        out: dict[str, Tensor] = {}
        for t in self.targets:
            g = self.groups.get(t.name)
            out[t.name] = (self._logits[_key(t.name)] if g is None
                           else g.expand(self._logits[_key(g.name)], t.shape))
        return out

    @property
    def group_logits(self) -> dict[str, nn.Parameter]:
        """Group name (``blocks.{l}.attn.heads``, ``blocks.{l}.mlp.neurons``, ...) -> its
        trainable logits [n_heads] / [d_mlp]; empty for an elementwise set."""
        return {g.name: self._logits[_key(g.name)] for g in self.groups.values()}

    def group_members(self, group: str) -> list[str]:
        """Names of the targets reading group ``group``'s logits, in model order."""
        out = [n for n, g in self.groups.items() if g.name == group]
        if not out:
            raise MaskError(f"No mask group {group!r}.{suggest(group, self.group_logits)}")
        return out

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
        for t in self.targets:
            n = t.name
            if n in self.groups:
                continue
            e = self.kind.expected(self._logits[_key(n)])
            s = e.sum()
            bad = self._forbidden(n)
            if bad.numel():
                s = s - e.detach().flatten().index_select(0, bad).sum()
            terms.append(s)
        for name, lg in self.group_logits.items():
            # a head / neuron's expected mask counts once per maskable weight it governs
            terms.append((self.kind.expected(lg) * self._group_sizes(name)).sum())
        return torch.stack(terms).sum()

    def _group_sizes(self, group: str) -> Tensor:
        """Maskable weights per unit of ``group`` (float32 [n]), cached per allowed state."""
        al = self.allowed
        members = self.group_members(group)
        state = tuple((al[n].device, al[n].data_ptr(), al[n]._version) for n in members)
        cache = self.__dict__.setdefault("_sizes_cache", {})
        hit = cache.get(group)
        if hit is None or hit[0] != state:
            sizes = sum(self.groups[n].per_group(al[n].to(torch.int64)) for n in members)
            hit = (state, sizes.to(torch.float32))
            cache[group] = hit
        return hit[1]

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

    @property
    def n_logits(self) -> int:
        """Number of trainable mask logits (= ``n_weights``-sized for an elementwise set)."""
        return sum(p.numel() for p in self._logits.values())

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
        g = self.groups.get(name)
        if g is not None:
            # one value per head / neuron, broadcast over the weight: no full-size mask in
            # soft mode (training), so no full-size logits, gradients or optimizer state
            logits = self._logits[_key(g.name)]
            if mode == "soft":
                # within kind.reuse() (fit_masks) every target of a head shares one sample
                soft = self.kind._reused(logits, self.kind.soft, tag=f"soft:{self.kind.training}")
                mask = g.broadcast(soft, weight.ndim)
            else:
                keep = g.broadcast(self.kind.hard(logits), weight.ndim) & getattr(
                    self._allowed, key)
                mask = ~keep if mode == "ablate" else keep
            return weight * mask.to(device=weight.device, dtype=weight.dtype)
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
        gran = ("" if self.granularity == "element" else
                f"granularity={self.granularity} ({self.n_logits:,} logits), ")
        title = (f"MaskSet({len(rows)} targets, kind={self.kind.name}, {gran}mode={self.mode}, "
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
        """A random mask set of the same size, placed uniformly; same seed, same result.

        Elementwise targets keep as many weights as here, drawn among their maskable
        weights (the plain-dict form is :func:`~interp.masks.sampling.random_masks`). A
        structured set's groups keep as many heads / neurons as here, drawn among the units
        that have a maskable weight, so the null of a structured subnetwork is a random set
        of whole heads and neurons and the result keeps the granularity.
        """
        hard = self.hard_masks()
        loose = [n for n in hard if n not in self.groups]
        drawn = random_masks({n: hard[n] for n in loose},
                             eligible={n: self.allowed[n] for n in loose}, seed=seed)
        if not self.groups:
            return self._from_hard(drawn)
        logits = {n: _hard_logits(m) for n, m in drawn.items()}
        kept, total = self._group_counts(hard)
        gen = torch.Generator().manual_seed(seed)
        for name in self.group_logits:
            pool = (total[name] > 0).nonzero().flatten().cpu()
            pick = pool[torch.randperm(len(pool), generator=gen)[:int((kept[name] > 0).sum())]]
            units = torch.zeros(len(total[name]), dtype=torch.bool)
            units[pick] = True
            logits[name] = _hard_logits(units.to(total[name].device))
        return MaskSet(
            self.targets, kind_from_config(self.kind.config()), logits, self.allowed,
            heads=self.heads, identity=self.identity, metadata=self.metadata,
            granularity=self.granularity,
        )

    # ------------------------------------------------------------------ editing

    @torch.no_grad()
    def _set(self, name: str, keep: bool, axis: int | None = None, index=None) -> None:
        """Fill logits of an element target (``name``) or of a group (its group name)."""
        if _key(name) not in self._logits:
            self.target(name)  # unknown: raises with suggestions
            raise MaskError(f"{name!r} is structured: edit its group {self.groups[name].name!r}.")
        lg = self._logits[_key(name)]
        value = HARD_LOGIT if keep else -HARD_LOGIT
        if axis is None:
            lg.fill_(value)
        else:
            idx = torch.as_tensor(index, dtype=torch.long, device=lg.device).reshape(-1)
            lg.index_fill_(axis, idx, value)

    def _shared(self, name: str, editing: set[str]) -> Group | None:
        """``name``'s group (None if elementwise); MaskError if the edit would also change
        targets outside ``editing`` that share it."""
        g = self.groups.get(name)
        if g is None:
            return None
        others = [n for n in self.group_members(g.name) if n not in editing]
        if others:
            raise MaskError(
                f"{name!r} shares its {g.name!r} logits with {others} (granularity "
                f"{self.granularity!r}), so it cannot be edited alone. Edit them together "
                "(set_head with which covering all of them, set_neuron, set_layer), or use "
                "a mask set with granularity='element'."
            )
        return g

    def set_target(self, name: str, keep: bool) -> MaskSet:
        """Keep (True) or drop (False) a whole target; returns self."""
        g = self._shared(self.target(name).name, {name})
        self._set(g.name if g else name, keep)
        return self

    def set_layer(self, layer: int, keep: bool) -> MaskSet:
        """Keep or drop every target of a layer; returns self."""
        names = [t.name for t in self.targets if t.layer == layer]
        if not names:
            layers = sorted({t.layer for t in self.targets if t.layer is not None})
            raise MaskError(f"No mask targets in layer {layer}; layers are {layers}.")
        for n in names:
            g = self._shared(n, set(names))
            self._set(g.name if g else n, keep)
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
        names = {f"blocks.{layer}.attn.{letter}" for letter in which}
        for letter in which:
            t = self.target(f"blocks.{layer}.attn.{letter}")
            h = head // (n_heads // n_kv) if letter in "kv" else head
            g = self._shared(t.name, names)
            if g is not None:
                self._set(g.name, keep, 0, [h])
                continue
            axis = t.in_axis if letter == "o" else t.out_axis
            self._set(t.name, keep, axis, range(h * d_head, (h + 1) * d_head))
        return self

    def set_neuron(self, layer: int, index: int | Sequence[int], keep: bool) -> MaskSet:
        """Keep or drop MLP neuron(s): row(s) of mlp_in (and gate), column(s) of mlp_out."""
        found = False
        names = {t.name for t in self.targets
                 if t.layer == layer and t.block in ("mlp_in", "mlp_gate", "mlp_out")}
        for t in self.targets:
            if t.name in names:
                axis = t.in_axis if t.block == "mlp_out" else t.out_axis
                idx = torch.as_tensor(index).reshape(-1)
                if idx.numel() and (idx.min() < 0 or idx.max() >= t.shape[axis]):
                    raise MaskError(f"Neuron index out of range for {t.name} ({t.shape[axis]}).")
                g = self._shared(t.name, names)
                self._set(g.name if g else t.name, keep, 0 if g else axis, idx)
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
        # structured sets store their expanded element logits: any reader gets an
        # equivalent elementwise set; MaskSet.load regroups them by the sidecar's granularity
        side["granularity"] = self.granularity
        logits = {n: lg.detach().contiguous() for n, lg in self.logits.items()}
        return files.write_mask_files(path, logits, self.allowed, side)

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
        granularity = _saved_granularity(path)
        try:
            ms = cls(saved.targets, saved.kind, saved.logits, saved.allowed, heads=saved.heads,
                     identity=saved.identity, metadata=saved.metadata, granularity=granularity)
        except MaskError as e:
            if granularity == "element":
                raise
            raise MaskError(f"Mask file {str(files.mask_path(path))!r} (granularity "
                            f"{granularity!r}): {e} {files._FIX}") from e
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


def _saved_granularity(path: str | Path) -> str:
    """The granularity recorded in a mask set's sidecar ("element" for older files)."""
    from interp.io import read_json

    side_path = files.sidecar_path(path)
    side = read_json(side_path, error=MaskError, what="Mask-set sidecar", fix=files._FIX)
    value = side.get("granularity") or "element"
    if value not in GRANULARITIES:
        raise MaskError(f"Mask-set sidecar {str(side_path)!r} has granularity {value!r}; "
                        f"granularities are {GRANULARITIES}. {files._FIX}")
    return value


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
