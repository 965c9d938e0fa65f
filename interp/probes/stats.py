"""Streaming sufficient statistics at hook points, and ridge regression solved from them.

Analyses of activations over millions of tokens never hold a cache: each batch's activations
at the requested hook points are reduced to float64 running sums (row count, sums, sums of
squares and cross-products ``X^T Y``) and dropped. Sums over disjoint data add, so statistics
gathered in pieces (batches, processes, checkpoints of a run) merge exactly. Means,
covariances and ridge maps (:func:`ridge_from_stats`) come from the sums alone.

Memory is therefore flat in the number of tokens: one batch's activations at the requested
hooks plus O(variables x d^2) sums (``tests/interp/probes/test_streaming_memory.py`` measures
it). The forward pass stops as soon as every requested hook has fired, so the layers after
the last one asked for, and the unembedding's ``[batch, pos, d_vocab]`` logits (the largest
activation of an LM with a big vocabulary), are never computed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from einops import rearrange
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from interp.errors import HookError, InterpError, suggest
from interp.models.lm import resolve_device

log = logging.getLogger(__name__)

Pair = tuple[str, str]


class StreamingStats:
    """Float64 running sums over rows of named variables, for means, covariances, ridge maps.

    Every variable gets its row count, sum and per-coordinate sum of squares; each pair
    ``(x, y)`` in ``pairs`` also gets the cross-product ``X^T Y`` (``(x, x)`` gives ``X^T X``).
    Rows are all leading dimensions of an update (``batch pos d`` -> ``batch*pos`` rows).

    Args:
        pairs: the variable pairs whose cross-products are tracked.
        device: where the sums live; default: the device of the first update.
    """

    def __init__(self, pairs: Iterable[Pair] = (), *, device: str | torch.device | None = None):
        self.pairs: list[Pair] = list(dict.fromkeys(tuple(p) for p in pairs))
        self.device = torch.device(device) if device is not None else None
        self.n = 0
        self.sums: dict[str, Tensor] = {}
        self.sq_sums: dict[str, Tensor] = {}
        self.products: dict[Pair, Tensor] = {}

    # ------------------------------------------------------------------ accumulate

    @property
    def names(self) -> list[str]:
        return list(self.sums)

    def update(self, values: Mapping[str, Float[Tensor, "*rows d"]]) -> None:
        """Add the rows of one batch; every variable must have the same rows."""
        flat = {k: _as_rows(v, self._target_device(v)) for k, v in values.items()}
        counts = {k: v.shape[0] for k, v in flat.items()}
        if len(set(counts.values())) > 1:
            raise InterpError(
                f"Variables in one update must have the same number of rows; got {counts}. "
                "Flatten them over the same tokens."
            )
        if self.n and set(flat) != set(self.sums):
            raise InterpError(
                f"Update has variables {sorted(flat)} but the statistics track "
                f"{sorted(self.sums)}. Pass the same variables to every update."
            )
        missing = {v for p in self.pairs for v in p} - set(flat)
        if missing:
            raise InterpError(f"Pairs need variables {sorted(missing)} missing from the update.")
        for k, x in flat.items():
            self.sums[k] = self.sums.get(k, 0) + x.sum(0)
            self.sq_sums[k] = self.sq_sums.get(k, 0) + (x * x).sum(0)
        for a, b in self.pairs:
            self.products[(a, b)] = self.products.get((a, b), 0) + flat[a].T @ flat[b]
        self.n += next(iter(counts.values()), 0)

    def _target_device(self, v: Tensor) -> torch.device:
        if self.device is None:
            # float64 is unavailable on MPS: keep those sums on the CPU.
            self.device = v.device if v.device.type != "mps" else torch.device("cpu")
        return self.device

    def merge(self, other: StreamingStats) -> StreamingStats:
        """Statistics of the union of both data sets (a new object; both stay unchanged)."""
        if set(self.pairs) != set(other.pairs) or (self.n and other.n and
                                                    set(self.sums) != set(other.sums)):
            raise InterpError(
                "Cannot merge statistics that track different variables or pairs: "
                f"{sorted(self.sums)} {self.pairs} vs {sorted(other.sums)} {other.pairs}."
            )
        out = StreamingStats(self.pairs, device=self.device or other.device)
        out.n = self.n + other.n
        for name in ("sums", "sq_sums", "products"):
            mine, theirs = getattr(self, name), getattr(other, name)
            dev = out.device
            setattr(out, name, {
                k: mine.get(k, 0) + (theirs[k].to(dev) if k in theirs else 0)
                for k in dict.fromkeys([*mine, *theirs])
            })
        return out

    __add__ = merge

    # ------------------------------------------------------------------ read out

    def _check(self, name: str) -> None:
        if self.n == 0:
            raise InterpError("No rows accumulated yet; call update() (or collect_stats) first.")
        if name not in self.sums:
            raise InterpError(
                f"Unknown variable {name!r}; tracked: {sorted(self.sums)}.{suggest(name, self.sums)}"
            )

    def mean(self, name: str) -> Float[Tensor, " d"]:
        self._check(name)
        return self.sums[name] / self.n

    def cross(self, x: str, y: str) -> Float[Tensor, "d_x d_y"]:
        """``X^T Y`` (uncentred), from the pair ``(x, y)`` or ``(y, x)``."""
        self._check(x)
        self._check(y)
        if (x, y) in self.products:
            return self.products[(x, y)]
        if (y, x) in self.products:
            return self.products[(y, x)].T
        raise InterpError(
            f"The cross-product of {x!r} and {y!r} was not tracked; add ({x!r}, {y!r}) to "
            f"pairs. Tracked pairs: {self.pairs}."
        )

    def scatter(self, x: str, y: str | None = None) -> Float[Tensor, "d_x d_y"]:
        """Centred cross-product ``sum_i (x_i - mean_x)(y_i - mean_y)^T``."""
        y = x if y is None else y
        return self.cross(x, y) - self.n * torch.outer(self.mean(x), self.mean(y))

    def cov(self, x: str, y: str | None = None, *, ddof: int = 1) -> Float[Tensor, "d_x d_y"]:
        """(Cross-)covariance matrix, normalised by ``n - ddof``."""
        return self.scatter(x, y) / (self.n - ddof)

    def total_variance(self, name: str) -> float:
        """Sum of per-coordinate variances (population, ``ddof=0``): the trace of the covariance."""
        self._check(name)
        return float((self.sq_sums[name].sum() - self.n * self.mean(name).square().sum()) / self.n)

    def state_dict(self) -> dict[str, Tensor]:
        """Flat tensors (for safetensors); keys ``n``, ``sum/{v}``, ``sq/{v}``, ``xty/{x}|{y}``."""
        out = {"n": torch.tensor(self.n, dtype=torch.int64)}
        out.update({f"sum/{k}": v for k, v in self.sums.items()})
        out.update({f"sq/{k}": v for k, v in self.sq_sums.items()})
        out.update({f"xty/{a}|{b}": v for (a, b), v in self.products.items()})
        return out

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Tensor]) -> StreamingStats:
        pairs = [tuple(k[4:].split("|", 1)) for k in state if k.startswith("xty/")]
        out = cls(pairs)
        out.n = int(state["n"])
        for k, v in state.items():
            if k.startswith("sum/"):
                out.sums[k[4:]] = v.double()
            elif k.startswith("sq/"):
                out.sq_sums[k[3:]] = v.double()
            elif k.startswith("xty/"):
                out.products[tuple(k[4:].split("|", 1))] = v.double()
        return out

    def __repr__(self) -> str:
        return f"StreamingStats(n={self.n}, variables={self.names}, pairs={self.pairs})"


def _as_rows(v: Tensor, device: torch.device) -> Float[Tensor, "rows d"]:
    v = v.detach().to(device=device, dtype=torch.float64)
    return v[:, None] if v.ndim == 1 else rearrange(v, "... d -> (...) d")


# ---------------------------------------------------------------------- ridge


@dataclass
class RidgeFit:
    """``y ~ x @ weight + bias``, fitted by ridge regression from streaming statistics."""

    weight: Float[Tensor, "d_x d_y"]
    bias: Float[Tensor, " d_y"]
    alpha: float
    n: int
    r2: float | None = None

    def predict(self, x: Float[Tensor, "*rows d_x"]) -> Float[Tensor, "*rows d_y"]:
        return x.to(self.weight) @ self.weight + self.bias

    def _repr_html_(self) -> str:
        """A compact table in Jupyter (the weights by shape, not by value)."""
        from interp.results import html_table

        d_x, d_y = self.weight.shape
        return html_table([("weight", f"{d_x} x {d_y}"), ("alpha", self.alpha), ("rows", self.n),
                           ("R²", self.r2)], caption="RidgeFit")


def ridge_from_stats(stats: StreamingStats, x: str, y: str, *, alpha: float = 1.0) -> RidgeFit:
    """Ridge regression of ``y`` on ``x`` with an unpenalised intercept (as sklearn's ``Ridge``).

    Minimises ``||Y - X W - 1 b^T||^2 + alpha ||W||^2`` using only ``X^T X``, ``X^T Y`` and the
    sums: ``W = (S_xx + alpha I)^-1 S_xy`` on centred scatters, ``b = mean_y - mean_x W``.
    ``r2`` is the variance-weighted R^2 on the statistics' own rows (from the per-coordinate
    sums of squares of ``y``; no ``(y, y)`` pair needed).
    """
    if alpha < 0:
        raise InterpError(f"alpha must be >= 0, got {alpha}.")
    sxx = stats.scatter(x)
    sxy = stats.scatter(x, y)
    eye = torch.eye(sxx.shape[0], dtype=sxx.dtype, device=sxx.device)
    weight = torch.linalg.solve(sxx + alpha * eye, sxy)
    bias = stats.mean(y) - stats.mean(x) @ weight
    syy = stats.n * stats.total_variance(y)
    rss = syy - 2 * (weight * sxy).sum() + (weight * (sxx @ weight)).sum()
    r2 = float(1 - rss / syy) if syy > 0 else None
    return RidgeFit(weight, bias, float(alpha), stats.n, r2)


# ---------------------------------------------------------------------- collection


def check_hook_names(model, hook_names: Sequence[str]) -> None:
    """Raise :class:`HookError` with the nearest valid names when a hook name does not exist
    on ``model``."""
    valid = model.hook_dict
    for name in hook_names:
        if name not in valid:
            raise HookError(
                f"Unknown hook name {name!r} for {type(model).__name__}.{suggest(name, valid)} "
                "List valid names with model.hook_dict.keys()."
            )


def residual_hook_names(model) -> list[str]:
    """The residual stream at every layer boundary: the embedding output (block 0's input),
    then each block's output. The last is taken before the final layer norm."""
    names = ["blocks.0.hook_resid_pre"] + [
        f"blocks.{layer}.hook_resid_post" for layer in range(model.cfg.n_layers)
    ]
    check_hook_names(model, names)
    return names


class _AllHooksFired(Exception):
    """Raised by the last requested hook to end a forward pass early."""


@torch.no_grad()
def iter_activations(
    model,
    batches: Iterable[Int[Tensor, "_batch _pos"]],
    hook_names: Sequence[str],
    *,
    device: str | torch.device | None = None,
    progress: bool = True,
    desc: str = "activations",
    stop_early: bool = True,
) -> Iterator[tuple[Int[Tensor, "batch pos"], dict[str, Float[Tensor, "batch pos ..."]]]]:
    """Run ``model`` on each batch and yield ``(tokens, {hook name: activation})``.

    Only the requested hook points of the current batch are held (never a full cache).
    Activations are keyed by the names asked for (TransformerLens aliases such as
    ``blocks.0.hook_resid_pre`` work). With ``device``, the model and batches move there.
    With ``stop_early`` the forward pass ends once every requested hook has fired (each
    hook's first activation is kept): later layers and the logits are never computed.
    """
    check_hook_names(model, hook_names)
    if device is not None:
        model.to(device)
    device = resolve_device(model, device)
    was_training = model.training
    model.eval()
    store: dict[str, Tensor] = {}
    wanted = list(dict.fromkeys(hook_names))

    def _hook_for(name: str) -> Callable:
        def hook(act: Tensor, hook) -> None:
            if stop_early and name in store:
                return
            store[name] = act.detach()
            if stop_early and len(store) == len(wanted):
                raise _AllHooksFired

        return hook

    fwd_hooks = [(name, _hook_for(name)) for name in wanted]
    total = len(batches) if hasattr(batches, "__len__") else None
    try:
        for tokens in tqdm(batches, desc=desc, total=total, disable=not progress):
            tokens = tokens.to(device)
            store.clear()
            try:
                with model.hooks(fwd_hooks=fwd_hooks):
                    model(tokens)
            except _AllHooksFired:
                pass
            missing = set(hook_names) - set(store)
            if missing:
                raise InterpError(f"Hooks {sorted(missing)} did not fire in the forward pass.")
            yield tokens, dict(store)
    finally:
        store.clear()
        model.train(was_training)


def collect_stats(
    model,
    batches: Iterable[Int[Tensor, "_batch _pos"]],
    hook_names: Sequence[str],
    *,
    pairs: Iterable[Pair] | None = None,
    extra: Callable[[Int[Tensor, "batch pos"]], Mapping[str, Tensor]] | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> StreamingStats:
    """Streaming statistics of activations at ``hook_names`` over token batches.

    Args:
        pairs: cross-products to track; default ``(h, h)`` for every hook (covariances).
        extra: more variables computed from each batch's tokens (e.g. the raw token
            embedding ``lambda t: {"embed": model.W_E[t]}``), rows aligned with the tokens.
        device: where the model runs and the sums live.
    """
    pairs = [(h, h) for h in hook_names] if pairs is None else pairs
    stats = StreamingStats(pairs)
    for tokens, acts in iter_activations(model, batches, hook_names, device=device,
                                         progress=progress, desc="collect stats"):
        if extra is not None:
            acts.update(extra(tokens))
        stats.update(acts)
    log.info("collected statistics over %d rows at %d hook points", stats.n, len(hook_names))
    return stats
