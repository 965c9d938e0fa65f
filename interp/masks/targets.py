"""Which weights of a model a mask set can mask, named in TransformerLens terms.

A :class:`Target` is one weight tensor the forward pass really reads, e.g.
``blocks.0.attn.q`` (block kind ``q``) or ``blocks.1.mlp.in`` (``mlp_in``), together with the
module and attribute that hold it (where a parametrization is attached), the axis of its
output features (for per-head and per-neuron edits) and, for HF models, where it sits in
the HF checkpoint (for the bigram paper's released masks).

What the TransformerBridge (TransformerLens 4.3) really reads, checked against HF models:

- native bridges: ``blocks[l].attn.q.original_component`` etc. are ``nn.Linear`` ([out, in]).
- GPT-2: the bridge splits the fused ``c_attn`` (Conv1D, [in, 3 * out]) into three
  ``nn.Linear`` q/k/v whose weights are transposed column *views* sharing c_attn's storage,
  and the forward pass calls those q/k/v linears, never c_attn. Masks therefore go on the
  split q/k/v; each maps to a block of c_attn columns. ``o`` and the MLP stay Conv1D.
- GPT-NeoX / Pythia: q/k/v are separate *copies* of rows of HF's ``query_key_value``,
  which HF interleaves per head ([head][q, k, v][d_head]); the forward reads the copies and
  the fused weight is stale. Masks go on the copies; each maps to de-interleaved rows.

Any other ``nn.Module`` (image models, conv kernels) gets targets from an explicit selection:
a dict ``name -> (module, param_name)`` or a predicate over ``named_parameters()``.

Structured masks (:func:`group_targets`) tie a target's mask to one logit per attention head
or MLP neuron: the head's ``d_head`` output rows of q/k/v (in these split layouts, whatever
the HF checkpoint's fused order) and its ``d_head`` input features of o; the neuron's output
feature of mlp in/gate and its input feature of mlp out.
"""

from __future__ import annotations

import fnmatch
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from jaxtyping import Bool
from torch import Tensor, nn
from torch.nn.utils import parametrize

from interp.errors import MaskError, suggest

__all__ = ["BLOCK_KINDS", "GRANULARITIES", "Group", "HFSlice", "Selection", "Target",
           "find_targets", "group_targets", "head_dims"]

log = logging.getLogger(__name__)

#: Block kinds of transformer targets, in model order within a layer.
BLOCK_KINDS = ("q", "k", "v", "o", "mlp_gate", "mlp_in", "mlp_out")

_ATTN = ("q", "k", "v", "o")
_MLP = (("gate", "mlp_gate"), ("in", "mlp_in"), ("out", "mlp_out"))

#: What ``find_targets(model, include=...)`` accepts besides ``None``.
Selection = (
    Sequence[str]
    | Sequence["Target"]
    | Mapping[str, "tuple[nn.Module, str] | Target"]
    | Callable[[str, nn.Parameter], bool]
)


@dataclass(frozen=True)
class HFSlice:
    """Where a target's mask sits inside one HF checkpoint weight.

    ``take(full)[...]`` is the target's mask (in the target's layout) given a tensor of the
    HF weight's full ``shape``: the ``index`` entries along ``axis`` (all of it if ``axis``
    is None), transposed if ``transposed``. Several targets can share one HF weight
    (GPT-2's ``c_attn``, GPT-NeoX's ``query_key_value``).
    """

    name: str
    shape: tuple[int, ...]
    axis: int | None = None
    index: tuple[int, ...] = ()
    transposed: bool = False

    def take(self, full: Tensor) -> Tensor:
        """The target-layout part of an HF-layout tensor."""
        part = full
        if self.axis is not None:
            idx = torch.as_tensor(self.index, dtype=torch.long, device=full.device)
            part = full.index_select(self.axis, idx)
        return part.T if self.transposed else part

    def put(self, full: Tensor, part: Tensor) -> None:
        """Write a target-layout ``part`` into the HF-layout tensor ``full`` (in place)."""
        part = part.T if self.transposed else part
        if self.axis is None:
            full.copy_(part)
            return
        idx = torch.as_tensor(self.index, dtype=torch.long, device=full.device)
        full.index_copy_(self.axis, idx, part.to(full.dtype))


@dataclass(frozen=True, eq=False)
class Target:
    """One maskable weight: ``getattr(module, param_name)`` of shape ``shape``.

    Attributes:
        name: TL-style name (``blocks.0.attn.q``) or the user's name for custom targets.
        layer, block: position for counts and edits (``block`` in :data:`BLOCK_KINDS` for
            transformers); ``layer`` is None where there is none.
        out_axis: axis of output features (0 for ``nn.Linear`` / conv, 1 for HF Conv1D);
            heads and neurons index it (q/k/v, mlp_in) or the other axis (o, mlp_out).
        hf: where the mask sits in the HF checkpoint (None for native and custom models).
        module_path: the module's path inside the root model, to re-find it in a copy.
        module: the module holding the weight; None for a target loaded without a model.
    """

    name: str
    module: nn.Module | None = field(repr=False)
    param_name: str = "weight"
    shape: tuple[int, ...] = ()
    layer: int | None = None
    block: str = ""
    out_axis: int = 0
    hf: HFSlice | None = None
    module_path: str | None = None

    @property
    def hf_name(self) -> str | None:
        """The HF parameter name holding this weight, or None."""
        return self.hf.name if self.hf else None

    @property
    def in_axis(self) -> int:
        """Axis of input features of a 2-D weight."""
        return 1 - self.out_axis

    @property
    def weight(self) -> Tensor:
        """The tensor the forward pass reads (masked while a mask set is attached)."""
        return getattr(self._bound_module(), self.param_name)

    @property
    def original(self) -> Tensor:
        """The unmasked parameter, also while a parametrization is attached."""
        self._bound_module()
        if parametrize.is_parametrized(self.module, self.param_name):
            return self.module.parametrizations[self.param_name].original
        return getattr(self.module, self.param_name)

    def nonzero(self) -> Bool[Tensor, "*shape"]:
        """True where the unmasked weight is not exactly zero (exact zeros are never masked)."""
        return self.original.detach() != 0

    def _bound_module(self) -> nn.Module:
        if self.module is None:
            raise MaskError(
                f"Target {self.name!r} is not bound to a model (mask set loaded without one). "
                "Pass model= to MaskSet.load, or attach the set to a model."
            )
        return self.module

    def __deepcopy__(self, memo: dict) -> Target:
        """Targets are immutable references into a model: copies share them."""
        return self

    def info(self) -> dict[str, Any]:
        """JSON-able description (for sidecars and reports)."""
        return {
            "name": self.name, "layer": self.layer, "block": self.block,
            "shape": list(self.shape), "param_name": self.param_name,
            "out_axis": self.out_axis, "hf_name": self.hf_name, "module_path": self.module_path,
        }

    def rebind(self, model: nn.Module) -> Target:
        """The same target in another instance of the model (found by ``module_path``)."""
        if self.module_path is None:
            raise MaskError(
                f"Target {self.name!r} has no module path, so it cannot be found in another "
                "model. Build the mask set for that model with find_targets(model, ...)."
            )
        try:
            module = model.get_submodule(self.module_path)
        except AttributeError as e:
            raise MaskError(
                f"Target {self.name!r}: the model has no module {self.module_path!r}. "
                "The mask set belongs to another architecture: load it with the model it was "
                "made for, or without model= to inspect it."
            ) from e
        new = replace(self, module=module)
        _check_shape(self.name, tuple(new.original.shape), self.shape)
        return new


def _check_shape(name: str, model_shape: tuple, mask_shape: tuple) -> None:
    if tuple(model_shape) != tuple(mask_shape):
        raise MaskError(
            f"Mask does not fit this model: weight {name!r} has shape {tuple(model_shape)} in "
            f"the model but {tuple(mask_shape)} in the mask. Use the model the mask was made "
            "for."
        )


# --------------------------------------------------------------------------- public entry


def find_targets(model: nn.Module, include: Selection | None = None) -> list[Target]:
    """The weights of ``model`` a mask set can mask, in model order.

    Args:
        model: a ``TransformerBridge`` (native, GPT-2, GPT-NeoX, other HF families) or any
            ``nn.Module`` / ``HookedRootModule`` together with an explicit ``include``.
        include: None for all attention and MLP weight matrices of a bridge (never
            embeddings, unembedding, positional embeddings, norms or biases); a list of
            target names or glob patterns (``"blocks.0.mlp.*"``) to pick some of them; a
            dict ``name -> (module, param_name)`` (or ``Target``) for any module; or a
            predicate ``(param_name, param) -> bool`` over ``model.named_parameters()``.
    """
    if include is not None and not isinstance(include, (str, Mapping)) and callable(include):
        return _unique(_from_predicate(model, include))
    if isinstance(include, Mapping):
        return _unique(_from_dict(model, include))
    if isinstance(include, str):
        include = [include]
    if include is not None and all(isinstance(t, Target) for t in include) and include:
        return _unique(list(include))
    if not _is_bridge(model):
        raise MaskError(
            f"{type(model).__name__} is not a TransformerBridge, so its maskable weights are "
            "unknown. Pass include= a dict name -> (module, 'weight') or a predicate "
            "(param_name, param) -> bool."
        )
    targets = _bridge_targets(model)
    return targets if include is None else _unique(_select(targets, include))


def _select(targets: list[Target], names: Sequence[str]) -> list[Target]:
    """Keep targets matching any name or glob pattern; unknown names raise with suggestions."""
    valid = [t.name for t in targets]
    keep: set[str] = set()
    for pat in names:
        hits = fnmatch.filter(valid, pat) if any(c in pat for c in "*?[") else (
            [pat] if pat in valid else [])
        if not hits:
            raise MaskError(
                f"Unknown mask target {pat!r}. Targets are named like 'blocks.0.attn.q' or "
                f"'blocks.0.mlp.in'.{suggest(pat, valid)}"
            )
        keep.update(hits)
    return [t for t in targets if t.name in keep]


def _unique(targets: list[Target]) -> list[Target]:
    seen: set[str] = set()
    for t in targets:
        if t.name in seen:
            raise MaskError(f"Two mask targets are named {t.name!r}; give each a unique name.")
        seen.add(t.name)
    if not targets:
        raise MaskError("The selection matched no weights; check the names or the predicate.")
    return targets


# --------------------------------------------------------------------------- any module


def _module_paths(model: nn.Module) -> dict[int, str]:
    return {id(m): n for n, m in model.named_modules()}


def _out_axis(module: nn.Module) -> int:
    """HF's Conv1D stores [in, out]; Linear and conv layers store out first."""
    return 1 if type(module).__name__ == "Conv1D" else 0


def _guess_position(name: str) -> tuple[int | None, str]:
    """(layer, block) from a parameter-style name: first integer part, last other part."""
    parts = [p for p in name.split(".") if p not in ("weight", "_original_component")]
    layer = next((int(p) for p in parts if re.fullmatch(r"\d+", p)), None)
    words = [p for p in parts if not re.fullmatch(r"\d+", p)]
    return layer, (words[-1] if words else name)


def _custom(name: str, module: nn.Module, param_name: str, paths: dict[int, str]) -> Target:
    if not isinstance(getattr(module, param_name, None), Tensor):
        raise MaskError(
            f"Target {name!r}: {type(module).__name__} has no tensor attribute {param_name!r}."
        )
    layer, block = _guess_position(name)
    return Target(
        name=name, module=module, param_name=param_name,
        shape=tuple(getattr(module, param_name).shape), layer=layer, block=block,
        out_axis=_out_axis(module), module_path=paths.get(id(module)),
    )


def _from_dict(model: nn.Module, sel: Mapping) -> list[Target]:
    paths = _module_paths(model)
    out = []
    for name, spec in sel.items():
        if isinstance(spec, Target):
            out.append(spec)
            continue
        try:
            module, param_name = spec
        except (TypeError, ValueError) as e:
            raise MaskError(
                f"Target {name!r}: expected (module, param_name) or a Target, got {spec!r}."
            ) from e
        out.append(_custom(name, module, param_name, paths))
    return out


def _from_predicate(model: nn.Module, pred: Callable) -> list[Target]:
    paths = _module_paths(model)
    out = []
    for pname, p in model.named_parameters():
        if pred(pname, p):
            mod_path, _, attr = pname.rpartition(".")
            module = model.get_submodule(mod_path) if mod_path else model
            out.append(_custom(pname, module, attr, paths))
    return out


# --------------------------------------------------------------------------- bridges


def _is_bridge(model: nn.Module) -> bool:
    try:
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, TransformerBridge)


def _is_native(model: nn.Module) -> bool:
    return type(getattr(model, "adapter", None)).__name__ == "NativeArchitectureAdapter"


def _inner(component) -> nn.Module | None:
    """The wrapped module of a bridge component holding a 2-D ``weight``, or None."""
    if component is None:
        return None
    mod = getattr(component, "original_component", None)
    w = getattr(mod, "weight", None) if mod is not None else None
    return mod if isinstance(w, Tensor) and w.ndim == 2 else None


def _bridge_targets(model: nn.Module) -> list[Target]:
    paths = _module_paths(model)
    hf_ok = not _is_native(model)
    heads = head_dims(model)
    out: list[Target] = []
    for layer, blk in enumerate(model.blocks):
        attn = getattr(blk, "attn", None)
        fused = _fused_layout(model, blk, attn, heads) if (hf_ok and attn is not None) else None
        for letter in _ATTN:
            comp = getattr(attn, letter, None) if attn is not None else None
            mod = _inner(comp)
            if mod is None:
                continue
            hf = None
            if hf_ok and letter in "qkv" and fused is not None:
                hf = fused[letter]
            elif hf_ok and not (letter in "qkv" and _inner(getattr(attn, "qkv", None))):
                hf = _direct_hf(blk, attn, comp, mod)
            out.append(_target(f"blocks.{layer}.attn.{letter}", mod, layer, letter, hf, paths))
        mlp = getattr(blk, "mlp", None)
        for sub, kind in _MLP:
            comp = getattr(mlp, sub, None) if mlp is not None else None
            mod = _inner(comp)
            if mod is None:
                continue
            hf = _direct_hf(blk, mlp, comp, mod) if hf_ok else None
            out.append(_target(f"blocks.{layer}.mlp.{sub}", mod, layer, kind, hf, paths))
    if not out:
        raise MaskError(
            f"Found no attention or MLP weight matrices in {type(model).__name__}. Pass "
            "include= a dict name -> (module, 'weight') to choose weights by hand."
        )
    return out


def _target(name, mod, layer, kind, hf, paths) -> Target:
    return Target(
        name=name, module=mod, param_name="weight", shape=tuple(mod.weight.shape),
        layer=layer, block=kind, out_axis=_out_axis(mod), hf=hf, module_path=paths.get(id(mod)),
    )


def head_dims(model: nn.Module) -> tuple[int, int, int] | None:
    """(n_heads, d_head, n_key_value_heads) from a model's TL config, or None."""
    cfg = getattr(model, "cfg", None)
    n_heads = getattr(cfg, "n_heads", None)
    if not n_heads:
        return None
    d_head = getattr(cfg, "d_head", None) or cfg.d_model // n_heads
    n_kv = getattr(cfg, "n_key_value_heads", None) or n_heads
    return int(n_heads), int(d_head), int(n_kv)


def _direct_hf(blk, parent, comp, mod) -> HFSlice | None:
    """HF name of a weight the bridge uses as is: ``{block}.{parent}.{module}.weight``."""
    names = [getattr(blk, "name", None), getattr(parent, "name", None), getattr(comp, "name", None)]
    if not all(names):
        return None
    return HFSlice(name=".".join([*names, "weight"]), shape=tuple(mod.weight.shape))


# Fused QKV layouts: (weight-shape test, index builder) per layout. ``j`` is 0, 1, 2 for q, k, v.
def _gpt2_cols(W, n, dh, j):
    """Conv1D [d_model, 3 * n * dh]: q, k, v are consecutive column blocks (transposed)."""
    if W.shape[1] != 3 * n * dh:
        return None
    return 1, tuple(range(j * n * dh, (j + 1) * n * dh)), True


def _neox_rows(W, n, dh, j):
    """Linear [n * 3 * dh, d_model], rows interleaved per head: [head][q, k, v][d_head]."""
    if W.shape[0] != 3 * n * dh:
        return None
    return 0, tuple(h * 3 * dh + j * dh + i for h in range(n) for i in range(dh)), False


def _block_rows(W, n, dh, j):
    """Linear [3 * n * dh, d_model]: q, k, v are consecutive row blocks."""
    if W.shape[0] != 3 * n * dh:
        return None
    return 0, tuple(range(j * n * dh, (j + 1) * n * dh)), False


_LAYOUTS = {"gpt2": _gpt2_cols, "neox": _neox_rows, "rows": _block_rows}
_ADAPTER_LAYOUT = {"GPT2ArchitectureAdapter": "gpt2", "NeoxArchitectureAdapter": "neox"}


def _fused_layout(model, blk, attn, heads) -> dict[str, HFSlice] | None:
    """HF slices of q/k/v inside a fused QKV weight, or None if there is no fused weight.

    The layout of a known family is fixed (its fused weight may be stale after the bridge
    was trained); otherwise the layout whose slices equal the live q/k/v weights is used.
    """
    qkv = getattr(attn, "qkv", None)
    fused_mod = _inner(qkv)
    if fused_mod is None or heads is None:
        return None
    n, dh, n_kv = heads
    if n_kv != n:
        log.warning("fused QKV with grouped heads: HF names of q/k/v are not mapped")
        return None
    W = fused_mod.weight.detach()
    mods = {c: _inner(getattr(attn, c, None)) for c in "qkv"}
    if any(m is None for m in mods.values()):
        return None
    hf_name = f"{blk.name}.{attn.name}.{qkv.name}.weight"
    known = _ADAPTER_LAYOUT.get(type(getattr(model, "adapter", None)).__name__)
    order = [known] if known else list(_LAYOUTS)
    for layout in order:
        slices = _slices(_LAYOUTS[layout], W, n, dh, hf_name)
        if slices is None:
            continue
        if known or all(
            torch.equal(s.take(W), mods[c].weight.detach()) for c, s in slices.items()
        ):
            return slices
    log.warning("%s: unknown fused QKV layout; q/k/v get no HF names", hf_name)
    return None


def _slices(fn, W, n, dh, hf_name) -> dict[str, HFSlice] | None:
    out = {}
    for j, c in enumerate("qkv"):
        spec = fn(W, n, dh, j)
        if spec is None:
            return None
        axis, index, transposed = spec
        out[c] = HFSlice(hf_name, tuple(W.shape), axis, index, transposed)
    return out


# --------------------------------------------------------------------------- structure

#: Mask granularities: one logit per weight, per attention head (attention targets), per MLP
#: neuron (MLP targets), or both (``structured``). Targets a granularity does not cover stay
#: elementwise.
GRANULARITIES = ("element", "head", "neuron", "structured")


@dataclass(frozen=True)
class Group:
    """How a structured target's mask comes from a shared vector of ``n`` logits.

    Along ``axis`` the target's element logits are ``logits.repeat_interleave(size)``
    (``n * size == shape[axis]``), the same for every entry along the other axis; every
    target of one group (e.g. q, k, v, o of a layer) reads the same vector ``name``.
    """

    name: str
    axis: int
    size: int
    n: int

    def broadcast(self, vec: Tensor, ndim: int = 2) -> Tensor:
        """``vec`` [n] as a per-feature tensor that broadcasts against the target's weight."""
        v = vec.repeat_interleave(self.size) if self.size > 1 else vec
        shape = [1] * ndim
        shape[self.axis] = -1
        return v.view(shape)

    def expand(self, vec: Tensor, shape: Sequence[int]) -> Tensor:
        """``vec`` [n] as element logits of a target of ``shape`` (an expanded view, no copy)."""
        return self.broadcast(vec, len(shape)).expand(*shape)

    def first(self, element: Tensor) -> Tensor:
        """The group vector [n] read off an element tensor built by :meth:`expand`."""
        line = element.select(1 - self.axis, 0) if element.ndim == 2 else element
        return line.reshape(self.n, self.size)[:, 0]

    def per_group(self, element: Tensor) -> Tensor:
        """Sum of an element tensor within each group: [n] (e.g. allowed weights per head)."""
        other = tuple(d for d in range(element.ndim) if d != self.axis)
        return element.sum(other).reshape(self.n, self.size).sum(1)


def group_targets(targets: Sequence[Target], granularity: str,
                  heads: tuple[int, int, int] | None) -> dict[str, Group]:
    """Target name -> its :class:`Group` under ``granularity`` (elementwise targets absent).

    ``head``: q/k/v/o of layer ``l`` share ``blocks.{l}.attn.heads`` (one logit per head);
    with grouped key/value heads, k and v share ``blocks.{l}.attn.kv_heads`` instead (one per
    key/value head, as the weights are). ``neuron``: mlp in/gate/out of layer ``l`` share
    ``blocks.{l}.mlp.neurons``. ``structured``: both.
    """
    if granularity not in GRANULARITIES:
        raise MaskError(f"Unknown mask granularity {granularity!r}; granularities are "
                        f"{GRANULARITIES}.{suggest(str(granularity), GRANULARITIES)}")
    if granularity == "element":
        return {}
    out: dict[str, Group] = {}
    if granularity in ("head", "structured"):
        out.update(_head_groups(targets, heads))
    if granularity in ("neuron", "structured"):
        out.update(_neuron_groups(targets))
    if not out:
        what = {"head": "attention (q, k, v, o)", "neuron": "MLP",
                "structured": "attention or MLP"}[granularity]
        raise MaskError(
            f"granularity={granularity!r} needs {what} targets, and the selection has none "
            f"({', '.join(t.name for t in targets[:3])}{', ...' if len(targets) > 3 else ''}). "
            "Use granularity='element' or select such targets."
        )
    _check_groups(targets, out)
    return out


def _head_groups(targets: Sequence[Target], heads) -> dict[str, Group]:
    attn = [t for t in targets if t.block in _ATTN]
    if not attn:
        return {}
    if heads is None:
        raise MaskError(
            f"Per-head masks need the head layout (n_heads, d_head), and none is known for "
            f"{attn[0].name!r}. Build the mask set from a model with a TransformerLens config "
            "(model.cfg.n_heads), or use granularity='element'."
        )
    n_heads, d_head, n_kv = heads
    out = {}
    for t in attn:
        _need_layer(t)
        kv = t.block in ("k", "v") and n_kv != n_heads
        count = n_kv if kv else n_heads
        axis = t.in_axis if t.block == "o" else t.out_axis
        if len(t.shape) != 2 or t.shape[axis] != count * d_head:
            raise MaskError(
                f"Cannot mask {t.name!r} per head: its shape {t.shape} has no axis of "
                f"{count} heads x {d_head} (axis {axis}). Use granularity='element'."
            )
        name = f"blocks.{t.layer}.attn.{'kv_heads' if kv else 'heads'}"
        out[t.name] = Group(name, axis, d_head, count)
    return out


def _neuron_groups(targets: Sequence[Target]) -> dict[str, Group]:
    out = {}
    for t in targets:
        if t.block not in ("mlp_in", "mlp_gate", "mlp_out"):
            continue
        _need_layer(t)
        if len(t.shape) != 2:
            raise MaskError(f"Cannot mask {t.name!r} per neuron: it is not a matrix "
                            f"(shape {t.shape}). Use granularity='element'.")
        axis = t.in_axis if t.block == "mlp_out" else t.out_axis
        out[t.name] = Group(f"blocks.{t.layer}.mlp.neurons", axis, 1, t.shape[axis])
    return out


def _need_layer(t: Target) -> None:
    if t.layer is None:
        raise MaskError(f"Cannot group {t.name!r} per head or neuron: its layer is unknown. "
                        "Use granularity='element'.")


def _check_groups(targets: Sequence[Target], groups: Mapping[str, Group]) -> None:
    """Targets sharing a group must agree on its size (e.g. d_mlp across in and out)."""
    seen: dict[str, tuple[str, Group]] = {}
    names = {t.name for t in targets}
    for name, g in groups.items():
        if g.name in names:
            raise MaskError(f"Group {g.name!r} has the name of a target; rename the target.")
        first = seen.setdefault(g.name, (name, g))
        if (first[1].n, first[1].size) != (g.n, g.size):
            raise MaskError(
                f"{first[0]!r} and {name!r} would share {g.name!r} but have {first[1].n} and "
                f"{g.n} units. Use granularity='element'."
            )
