"""The hook-free execution path: run a bridge's wrapped module with the same masked weights.

A ``TransformerBridge`` (TransformerLens 4.3) puts its components *inside* the module it
wraps (the HF model, or ``NativeModel`` for native bridges): every call dispatches hooks, and
attention runs the bridge's own eager code. That costs up to 2x per training step on a GPU
in bf16 (docs/CONTRACTS.md, benchmarks/RESULTS.md). For the hot loop of mask training,
:func:`unwrap` builds a second, hook-free module tree over the *same* weights:

- every bridge component is replaced by the module it wraps; modules holding no component
  stay the very objects the bridge uses, containers above them are shallow copies. So each
  ``nn.Linear`` / Conv1D / norm / embedding is shared, and the parametrizations a
  :class:`~interp.masks.MaskSet` puts on them act on both paths, with one set of logits;
- fused QKV weights the bridge does not read (GPT-NeoX's ``query_key_value`` is a stale
  copy; GPT-2's ``c_attn`` is bypassed) are replaced by :class:`FusedQKV`, which rebuilds
  the fused weight in HF's layout (GPT-NeoX: rows interleaved per head ``[head][q, k,
  v][d_head]``; GPT-2: columns ``[Q | K | V]``) from the split q/k/v weights and biases the
  bridge reads, masked where masks are attached;
- HF attention runs with ``attn_implementation`` (default ``"sdpa"``) on a copy of the HF
  config; the bridge's own config is untouched.

Nothing of the bridge changes: its hooks, ``run_with_cache`` and analyses work as before
and see the masks trained on the fast path. :func:`check_paths` compares the logits of both
paths (``fit_masks(path="hf")`` does so before training, with the masks attached).
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn
from torch.nn.utils import parametrize

from interp.errors import ConfigError, MaskError, suggest

__all__ = ["PATHS", "FusedQKV", "UnwrappedLM", "check_paths", "execution_path",
           "max_logit_gap", "unwrap"]

log = logging.getLogger(__name__)

#: Execution paths of ``fit_masks``: through the bridge (hooks) or its wrapped HF module.
PATHS = ("bridge", "hf")


# --------------------------------------------------------------------------- fused QKV


class FusedQKV(nn.Module):
    """A fused QKV projection computed from the split q/k/v ``nn.Linear`` s the bridge reads.

    ``forward(x) = x @ W.T + b`` with ``W`` (``[3 * d_qkv, d_in]``, Linear layout) and ``b``
    assembled from the (masked) q/k/v weights and biases: output feature ``f`` is row
    ``src[f]`` of ``cat([W_q, W_k, W_v])``. The HF attention splits the output as it would
    split its own fused projection's, so the layout is HF's (see :func:`_source_rows`).

    Args:
        q, k, v: the split ``nn.Linear`` modules (shared with the bridge, parametrized by an
            attached mask set).
        src: ``src[f]``: which row of ``cat([q, k, v])`` is output feature ``f``.
    """

    def __init__(self, q: nn.Linear, k: nn.Linear, v: nn.Linear, src: Tensor,
                 n_heads: int, d_head: int) -> None:
        super().__init__()
        self.q, self.k, self.v = q, k, v
        n = q.weight.shape[0] + k.weight.shape[0] + v.weight.shape[0]
        if tuple(src.shape) != (n,):
            raise MaskError(f"FusedQKV: {tuple(src.shape)} source rows for {n} outputs.")
        self.register_buffer("src", src.to(torch.long), persistent=False)
        self.n_heads, self.d_head = n_heads, d_head
        self.layout = _layout_of(src, n_heads, d_head)

    def _fuse(self, parts: list[Tensor]) -> Tensor:
        if self.layout == "blocks":
            return torch.cat(parts, 0)
        if self.layout == "heads":  # GPT-NeoX: one copy, no gather
            n, dh = self.n_heads, self.d_head
            return torch.stack([p.unflatten(0, (n, dh)) for p in parts], 1).flatten(0, 2)
        return torch.cat(parts, 0).index_select(0, self.src)

    def fused_weight(self) -> Float[Tensor, "d_qkv d_in"]:
        """The fused weight in Linear layout, masked like the split weights."""
        return self._fuse([self.q.weight, self.k.weight, self.v.weight])

    def fused_bias(self) -> Float[Tensor, " d_qkv"] | None:
        biases = [self.q.bias, self.k.bias, self.v.bias]
        if all(b is None for b in biases):
            return None
        biases = [b if b is not None else self.q.weight.new_zeros(w.weight.shape[0])
                  for b, w in zip(biases, (self.q, self.k, self.v))]
        return self._fuse(biases)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.fused_weight(), self.fused_bias())

    def extra_repr(self) -> str:
        return f"layout={self.layout!r}, out={self.src.numel()}"


def _layout_of(src: Tensor, n_heads: int, d_head: int) -> str:
    """``blocks`` ([Q | K | V]), ``heads`` (per-head interleaved) or ``gather`` (other)."""
    n = src.numel()
    if torch.equal(src, torch.arange(n)):
        return "blocks"
    if n == 3 * n_heads * d_head:
        h = torch.arange(n_heads).view(n_heads, 1, 1)
        j = torch.arange(3).view(1, 3, 1)
        i = torch.arange(d_head).view(1, 1, d_head)
        if torch.equal(src, (j * n_heads * d_head + h * d_head + i).flatten()):
            return "heads"
    return "gather"


def _source_rows(slices: dict[str, Any], sizes: dict[str, int]) -> Tensor:
    """``src`` for :class:`FusedQKV` from the HF slices of q, k, v (``Target.hf``).

    Each slice lists, in the split weight's row order, the fused output features it fills
    (rows of GPT-NeoX's ``query_key_value``, columns of GPT-2's ``c_attn``).
    """
    total = sum(sizes.values())
    src = torch.full((total,), -1, dtype=torch.long)
    offset = 0
    for c in "qkv":
        idx = torch.as_tensor(slices[c].index, dtype=torch.long)
        if idx.numel() != sizes[c]:
            raise MaskError(f"HF slice of {c} has {idx.numel()} entries for {sizes[c]} rows.")
        src[idx] = torch.arange(offset, offset + sizes[c])
        offset += sizes[c]
    if (src < 0).any() or torch.unique(src).numel() != total:
        raise MaskError("The q/k/v slices do not cover the fused QKV weight exactly once.")
    return src


# --------------------------------------------------------------------------- unwrapping


def _is_component(module: nn.Module) -> bool:
    try:
        from transformer_lens.model_bridge.generalized_components.base import (
            GeneralizedComponent,
        )
    except ImportError:  # pragma: no cover - another TransformerLens layout
        return hasattr(module, "original_component") and hasattr(module, "hook_in")
    return isinstance(module, GeneralizedComponent)


def _is_bridge(model: Any) -> bool:
    try:
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, TransformerBridge)


def _fused_replacements(bridge: nn.Module) -> dict[int, FusedQKV]:
    """id(fused QKV component) -> :class:`FusedQKV` for every joint-QKV attention block."""
    from interp.masks.targets import find_targets, head_dims

    by_module = {}
    for t in find_targets(bridge):
        by_module[(t.layer, t.block)] = t
    heads = head_dims(bridge)
    out: dict[int, FusedQKV] = {}
    for layer, blk in enumerate(bridge.blocks):
        attn = getattr(blk, "attn", None)
        qkv = getattr(attn, "qkv", None) if attn is not None else None
        if qkv is None:
            continue
        comps = {c: getattr(attn, c, None) for c in "qkv"}
        lins = {c: getattr(comp, "original_component", None) for c, comp in comps.items()}
        if not all(isinstance(m, nn.Linear) for m in lins.values()):
            raise ConfigError(
                f"blocks.{layer}.attn has a fused QKV projection but no split q/k/v Linear "
                "layers, so the HF path cannot rebuild what the bridge reads. Use "
                "path='bridge'."
            )
        slices = {c: getattr(by_module.get((layer, c)), "hf", None) for c in "qkv"}
        if any(s is None for s in slices.values()) or heads is None:
            raise ConfigError(
                f"blocks.{layer}.attn: the layout of its fused QKV weight is unknown (grouped "
                "heads, or a family other than GPT-2 / GPT-NeoX), so the HF path cannot "
                "rebuild it from the split q/k/v weights the bridge reads. Use path='bridge'."
            )
        sizes = {c: int(lins[c].weight.shape[0]) for c in "qkv"}
        src = _source_rows(slices, sizes)
        fused = FusedQKV(lins["q"], lins["k"], lins["v"], src, heads[0], heads[1])
        out[id(qkv)] = fused
        inner = getattr(qkv, "original_component", None)
        if inner is not None:
            out[id(inner)] = fused
    return out


def _shallow_copy(module: nn.Module, children: dict[str, nn.Module | None]) -> nn.Module:
    """A copy of ``module`` sharing its parameters and buffers, with new ``children``."""
    new = copy.copy(module)
    d = new.__dict__
    d["_modules"] = dict(children)
    for key in ("_parameters", "_buffers"):
        d[key] = dict(getattr(module, key))
    d["_non_persistent_buffers_set"] = set(module._non_persistent_buffers_set)
    for key, value in module.__dict__.items():
        if key.endswith("hooks") and isinstance(value, dict):
            d[key] = type(value)(value)
    return new


def _unwrap_tree(module: nn.Module, memo: dict[int, nn.Module],
                 fused: dict[int, FusedQKV]) -> nn.Module:
    key = id(module)
    if key in memo:
        return memo[key]
    if key in fused:
        out: nn.Module = fused[key]
    elif _is_component(module):
        inner = getattr(module, "original_component", None)
        if inner is None:
            raise ConfigError(
                f"Bridge component {type(module).__name__} wraps no module, so the HF path has "
                "nothing to run. Use path='bridge'."
            )
        out = _unwrap_tree(inner, memo, fused)
    else:
        kids = module._modules
        new = {n: (None if c is None else _unwrap_tree(c, memo, fused)) for n, c in kids.items()}
        changed = any(new[n] is not c for n, c in kids.items())
        out = _shallow_copy(module, new) if changed else module
    memo[key] = out
    return out


def _with_config(root: nn.Module, originals: set[int], attn_implementation: str) -> None:
    """Give the copied modules (not in ``originals``) a copy of their HF config with
    ``attn_implementation``; the modules the bridge uses keep theirs."""
    copies: dict[int, Any] = {}
    for m in root.modules():
        cfg = m.__dict__.get("config")
        if cfg is None or not hasattr(cfg, "_attn_implementation") or id(m) in originals:
            continue
        if id(cfg) not in copies:
            new = copy.deepcopy(cfg)
            new._attn_implementation = attn_implementation
            copies[id(cfg)] = new
        m.__dict__["config"] = copies[id(cfg)]


def _check_attn(attn_implementation: str | None) -> None:
    if attn_implementation is None:
        return
    try:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        valid = ["eager", *ALL_ATTENTION_FUNCTIONS.keys()]
    except ImportError:  # pragma: no cover
        valid = ["eager", "sdpa"]
    if attn_implementation not in valid:
        raise ConfigError(
            f"Unknown attn_implementation {attn_implementation!r}; valid: {valid}."
            f"{suggest(attn_implementation, valid)}"
        )


class UnwrappedLM(nn.Module):
    """The wrapped module of a bridge without its hooks: ``model(tokens) -> logits``.

    Built by :func:`unwrap`. Shares every weight (and so every attached mask) with
    ``bridge``; holds the bridge without registering it, so parameters are not listed twice.

    Attributes:
        inner: the hook-free module tree (an HF ``*ForCausalLM`` or a ``NativeModel``).
        bridge: the bridge it was built from (for ``cfg`` and the tokenizer).
        attn_implementation: HF attention kernel (None for native bridges: eager).
    """

    def __init__(self, inner: nn.Module, bridge: nn.Module,
                 attn_implementation: str | None) -> None:
        super().__init__()
        self.inner = inner
        object.__setattr__(self, "bridge", bridge)
        self.attn_implementation = attn_implementation
        self._hf = attn_implementation is not None

    @property
    def cfg(self):
        """The bridge's TransformerLens config."""
        return self.bridge.cfg

    def forward(self, tokens: Int[Tensor, "*batch pos"],
                attention_mask: Tensor | None = None) -> Float[Tensor, "batch pos d_vocab"]:
        """Logits of the masked model for ``[batch, pos]`` (or ``[pos]``) tokens."""
        if tokens.ndim == 1:
            tokens = tokens.unsqueeze(0)
        if not self._hf:
            return self.inner(tokens, attention_mask=attention_mask)
        out = self.inner(input_ids=tokens, attention_mask=attention_mask, use_cache=False)
        return out.logits if hasattr(out, "logits") else out[0]


def unwrap(bridge: nn.Module, *, attn_implementation: str | None = "sdpa") -> UnwrappedLM:
    """The hook-free path through ``bridge``'s wrapped module, over the same weights.

    Args:
        bridge: a ``TransformerBridge`` (GPT-2, GPT-NeoX / Pythia, other HF families whose
            QKV is split or of a known fused layout, or a native bridge) with unprocessed
            weights (no ``enable_compatibility_mode``).
        attn_implementation: HF attention kernel (``"sdpa"``, ``"eager"``, a flash
            kernel if installed); None keeps the model's own. Native bridges always run
            their eager attention.

    Raises:
        ConfigError: not a bridge, processed weights, a fused QKV of unknown layout, or an
            unknown ``attn_implementation``.
        MaskError: a maskable weight the bridge reads is not read by the wrapped module.
    """
    if not _is_bridge(bridge):
        raise ConfigError(
            f"path='hf' runs the HF module a TransformerBridge wraps; "
            f"{type(bridge).__name__} is not a bridge. Use path='bridge' (the default)."
        )
    if getattr(bridge, "_weights_processed", False):
        raise ConfigError(
            "path='hf' needs a bridge with unprocessed weights: this one was processed "
            "(enable_compatibility_mode folds layer norms into the weights, which the wrapped "
            "module does not undo). Use path='bridge', or load the model without "
            "compatibility mode."
        )
    inner = getattr(bridge, "original_model", None)
    if not isinstance(inner, nn.Module):
        raise ConfigError("This bridge holds no wrapped module (original_model); use "
                          "path='bridge'.")
    native = type(getattr(bridge, "adapter", None)).__name__ == "NativeArchitectureAdapter"
    hf_attn = None if native else attn_implementation
    if not native and attn_implementation is None:
        hf_attn = getattr(getattr(inner, "config", None), "_attn_implementation", None) or "eager"
    _check_attn(hf_attn)
    fused = _fused_replacements(bridge)
    memo: dict[int, nn.Module] = {}
    root = _unwrap_tree(inner, memo, fused)
    if root is inner:
        raise ConfigError("The wrapped module holds no bridge components; use path='bridge'.")
    if not native:
        shared = {id(m) for m in inner.modules()}  # objects the bridge itself uses
        _with_config(root, shared, hf_attn)
    _check_reads(bridge, root)
    return UnwrappedLM(root, bridge, hf_attn)


def _check_reads(bridge: nn.Module, root: nn.Module) -> None:
    """Every maskable weight of the bridge must be a module the unwrapped tree calls."""
    from interp.masks.targets import find_targets

    present = {id(m) for m in root.modules()}
    missing = [t.name for t in find_targets(bridge) if id(t.module) not in present]
    if missing:
        raise MaskError(
            f"The wrapped module does not read {missing[0]!r} (and {len(missing) - 1} more "
            "maskable weights) the way the bridge does, so masks would not act on it. Use "
            "path='bridge'."
        )


# --------------------------------------------------------------------------- checks


def _mask_owners(model: nn.Module) -> list[Any]:
    """The mask sets attached to ``model`` (found through their parametrizations)."""
    owners: dict[int, Any] = {}
    for m in model.modules():
        if not parametrize.is_parametrized(m):
            continue
        for plist in m.parametrizations.values():
            for p in plist:
                owner = getattr(p, "_owner", None)
                if owner is not None:
                    owners[id(owner)] = owner
    return list(owners.values())


@contextlib.contextmanager
def _deterministic_masks(model: nn.Module) -> Iterator[None]:
    """Sampling mask kinds (hard concrete) use their deterministic gate in the block."""
    kinds = [ms.kind for ms in _mask_owners(model)]
    flags = [k.training for k in kinds]
    for k in kinds:
        k.train(False)
    try:
        yield
    finally:
        for k, f in zip(kinds, flags):
            k.train(f)


def _probe_tokens(bridge: nn.Module, n: int = 16) -> Tensor:
    cfg = bridge.cfg
    n = max(2, min(n, int(getattr(cfg, "n_ctx", n) or n)))
    gen = torch.Generator().manual_seed(0)
    p = next(bridge.parameters())
    return torch.randint(0, int(cfg.d_vocab), (2, n), generator=gen).to(p.device)


@torch.no_grad()
def max_logit_gap(bridge: nn.Module, runner: nn.Module,
                  tokens: Int[Tensor, "batch pos"] | None = None) -> tuple[float, float]:
    """(max |bridge logits - runner logits|, max |bridge logits|) on ``tokens``.

    With the masks as they are attached (sampling kinds use their deterministic gate);
    ``tokens`` default to two seeded random rows of up to 16 tokens.
    """
    tokens = _probe_tokens(bridge) if tokens is None else tokens
    with _deterministic_masks(bridge):
        a = bridge(tokens).float()
        b = runner(tokens).float()
    return float((a - b).abs().max()), float(a.abs().max())


def check_paths(bridge: nn.Module, runner: nn.Module, tokens: Tensor | None = None,
                rtol: float | None = None) -> float:
    """Raise :class:`MaskError` unless both paths give the same logits; return the gap.

    The tolerance is ``rtol * (1 + max |logits|)``; ``rtol`` defaults to 1e-4 for float32
    weights and 5e-2 for 16-bit ones.
    """
    if rtol is None:
        dtype = next(bridge.parameters()).dtype
        rtol = 1e-4 if dtype in (torch.float32, torch.float64) else 5e-2
    gap, scale = max_logit_gap(bridge, runner, tokens)
    if not gap <= rtol * (1.0 + scale):
        raise MaskError(
            f"The HF path's logits differ from the bridge's by {gap:.3g} (logits up to "
            f"{scale:.3g}, tolerance {rtol:g} relative): the wrapped module does not compute "
            "what the bridge computes for this model. Use path='bridge'."
        )
    return gap


def execution_path(model: nn.Module, path: str = "bridge", *,
                   attn_implementation: str | None = "sdpa", check: bool = True) -> nn.Module:
    """What ``fit_masks`` calls the objective with: ``model`` itself or :func:`unwrap` of it.

    With ``check``, the logits of both paths are compared first (masks as attached).
    """
    if path not in PATHS:
        raise ConfigError(f"Unknown execution path {path!r}; paths are {PATHS}."
                          f"{suggest(str(path), PATHS)}")
    if path == "bridge":
        return model
    runner = unwrap(model, attn_implementation=attn_implementation)
    runner.train(model.training)
    if check:
        gap = check_paths(model, runner)
        log.debug("HF path matches the bridge: max |logit gap| %.3g", gap)
    return runner
