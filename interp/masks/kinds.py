"""Mask kinds: how a tensor of trainable logits becomes a weight mask.

A kind is a small stateless-but-for-schedule object shared by every target of a mask set.
It maps logits to

- ``soft``: the differentiable mask multiplied into the weights while training,
- ``hard``: the final binary mask (True = keep),
- ``expected``: the per-element expected mask whose sum is the sparsity penalty,

and advances its schedule with ``step()`` once per optimizer step. Two kinds exist:

- :class:`ContinuousSparsification` (Savarese et al. 2020), used by the bigram-subnetwork
  paper: ``sigmoid(T * s)`` with a temperature ``T`` that grows every step.
- :class:`HardConcrete` (Louizos et al. 2018): stretched, clamped binary-concrete gates with a
  closed-form expected L0 penalty, as in subnetwork probing and edge pruning.

``config()`` is JSON-able and includes schedule state, so a saved mask set resumes exactly.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from interp.errors import MaskError, suggest

__all__ = ["ContinuousSparsification", "HardConcrete", "MaskKind", "kind_from_config"]

_REGISTRY: dict[str, type[MaskKind]] = {}


class MaskKind:
    """Base class: maps mask logits to soft, hard and expected masks.

    ``training`` selects stochastic behaviour for kinds that sample (hard concrete);
    ``soft(..., sample=...)`` overrides it per call.
    """

    name: ClassVar[str] = ""
    training: bool = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name:
            _REGISTRY[cls.name] = cls

    # -- interface ----------------------------------------------------------------------
    def init_logits(
        self, shape: tuple[int, ...] | torch.Size, generator: torch.Generator | None = None
    ) -> Float[Tensor, "*shape"]:
        """Initial logits (float32, CPU) for a mask of ``shape``."""
        raise NotImplementedError

    def soft(self, logits: Float[Tensor, "*shape"], sample: bool | None = None) -> Float[Tensor, "*shape"]:
        """Differentiable mask in [0, 1] (same shape and dtype as ``logits``)."""
        raise NotImplementedError

    def hard(self, logits: Float[Tensor, "*shape"]) -> Bool[Tensor, "*shape"]:
        """Final binary mask, True = keep."""
        raise NotImplementedError

    def expected(self, logits: Float[Tensor, "*shape"]) -> Float[Tensor, "*shape"]:
        """Per-element expected mask; its sum is the differentiable sparsity penalty."""
        raise NotImplementedError

    def keep_probability(self, logits: Float[Tensor, "*shape"]) -> Float[Tensor, "*shape"]:
        """How sure the mask is to keep each weight, in [0, 1]; the stopping rule counts
        entries in [0.1, 0.9] as undecided. Default: the deterministic soft mask."""
        return self.soft(logits, sample=False)

    def step(self) -> None:
        """Advance the per-optimizer-step schedule (no-op by default)."""

    @contextlib.contextmanager
    def reuse(self) -> Iterator[MaskKind]:
        """Within the block, compute each logits tensor's soft mask once.

        The forward pass and the penalty then share one mask tensor where ``expected`` is the
        soft mask (continuous sparsification): ``fit_masks``' hot path. Entries are keyed by
        the tensor, its version counter, grad mode, temperature and a caller's tag, so
        in-place updates and schedule steps are never served stale. Structured mask sets
        route a group's soft mask through it (tag per sampling mode), so the targets sharing
        a head's logits also share a hard-concrete sample within the block.
        """
        outer = self.__dict__.get("_memo")
        self._memo: dict | None = {} if outer is None else outer
        try:
            yield self
        finally:
            if outer is None:
                self.__dict__.pop("_memo", None)

    def _reused(self, logits: Tensor, fn: Callable[[Tensor], Tensor], tag: str = "") -> Tensor:
        memo = self.__dict__.get("_memo")
        if memo is None:
            return fn(logits)
        key = (id(logits), logits._version, torch.is_grad_enabled(), self.temperature, tag)
        hit = memo.get(key)
        if hit is not None and hit[0] is logits:
            return hit[1]
        out = fn(logits)
        memo[key] = (logits, out)
        return out

    @property
    def temperature(self) -> float:
        """The schedule's current temperature (for logs and history)."""
        return 1.0

    # -- state ------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> MaskKind:
        """Switch sampling on (``True``) or off, like ``nn.Module.train``; returns self."""
        self.training = mode
        return self

    def eval(self) -> MaskKind:
        return self.train(False)

    def config(self) -> dict[str, Any]:
        """JSON-able description including schedule state; see :func:`kind_from_config`."""
        raise NotImplementedError

    def restore(self, cfg: dict[str, Any]) -> None:
        """Set parameters and schedule from ``cfg`` in place (holders of this object see it)."""
        self.__dict__.update(type(self).from_config(cfg).__dict__)

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> MaskKind:
        """Rebuild a kind from :meth:`config` output."""
        cfg = dict(cfg)
        name = cfg.pop("name", cls.name)
        if name != cls.name:
            raise MaskError(f"Config is for mask kind {name!r}, not {cls.name!r}.")
        try:
            return cls(**cfg)
        except TypeError as e:
            raise MaskError(f"Bad {cls.name!r} mask-kind config {cfg}: {e}") from e

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "name")
        return f"{type(self).__name__}({args})"


class ContinuousSparsification(MaskKind):
    """``soft = sigmoid(T * s)``, ``hard = s > 0``; ``T *= temperature_factor`` every step.

    Args:
        init: initial logit value (0.0 gives soft masks of 0.5, as in the paper).
        temperature: current temperature ``T`` (1.0 at the start of training).
        temperature_factor: multiplier applied by :meth:`step` (paper: 1.001).
        steps: number of schedule steps taken so far (bookkeeping).
    """

    name = "continuous"

    def __init__(
        self,
        init: float = 0.0,
        temperature: float = 1.0,
        temperature_factor: float = 1.001,
        steps: int = 0,
    ) -> None:
        if temperature <= 0 or temperature_factor <= 0:
            raise MaskError(
                f"temperature ({temperature}) and temperature_factor ({temperature_factor}) "
                "must be positive."
            )
        self.init = float(init)
        self._temperature = float(temperature)
        self.temperature_factor = float(temperature_factor)
        self.steps = int(steps)

    @property
    def temperature(self) -> float:
        return self._temperature

    def init_logits(self, shape, generator=None):
        return torch.full(tuple(shape), self.init, dtype=torch.float32)

    def soft(self, logits, sample=None):
        return self._reused(logits, self._sigmoid)

    def _sigmoid(self, logits: Tensor) -> Tensor:
        return torch.sigmoid(logits * self._temperature)

    def hard(self, logits):
        return logits > 0

    def expected(self, logits):
        return self.soft(logits)

    def step(self) -> None:
        self._temperature *= self.temperature_factor
        self.steps += 1

    def config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "init": self.init,
            "temperature": self._temperature,
            "temperature_factor": self.temperature_factor,
            "steps": self.steps,
        }


class HardConcrete(MaskKind):
    """Hard-concrete L0 gates over ``log_alpha`` logits (Louizos et al. 2018).

    Training sample: ``s = sigmoid((logit(u) + log_alpha) / beta)`` with ``u ~ U(0, 1)``,
    stretched to ``(gamma, zeta)`` and clamped to [0, 1], so gates hit exactly 0 and 1 with
    positive probability. The deterministic gate replaces the noise by 0. The penalty is the
    expected L0 norm, ``P(gate != 0) = sigmoid(log_alpha - beta * log(-gamma / zeta))``.
    ``hard`` keeps a weight when its deterministic gate exceeds 0.5.

    Args:
        beta: temperature of the concrete distribution (2/3 as in the paper).
        gamma, zeta: stretch interval, ``gamma < 0 < 1 < zeta``.
        init_keep: initial probability that a sampled gate exceeds 0.5 (the weight would be
            kept); sets the mean initial ``log_alpha``. 0.9 starts near the full model.
        init_std: standard deviation of Gaussian noise added to the initial ``log_alpha``.
        eps: keeps the uniform noise away from 0 and 1.
    """

    name = "hard_concrete"

    def __init__(
        self,
        beta: float = 2 / 3,
        gamma: float = -0.1,
        zeta: float = 1.1,
        init_keep: float = 0.9,
        init_std: float = 0.01,
        eps: float = 1e-6,
    ) -> None:
        if not (gamma < 0.0 and zeta > 1.0 and beta > 0.0):
            raise MaskError(f"Need gamma < 0 < 1 < zeta and beta > 0; got {gamma}, {zeta}, {beta}.")
        if not 0.0 < init_keep < 1.0:
            raise MaskError(f"init_keep must lie strictly between 0 and 1, got {init_keep}.")
        self.beta, self.gamma, self.zeta = float(beta), float(gamma), float(zeta)
        self.init_keep, self.init_std, self.eps = float(init_keep), float(init_std), float(eps)

    @property
    def temperature(self) -> float:
        return self.beta

    def _stretch(self, s: Tensor) -> Tensor:
        return (s * (self.zeta - self.gamma) + self.gamma).clamp(0.0, 1.0)

    def init_logits(self, shape, generator=None):
        # a sampled gate exceeds 0.5 iff logistic noise > beta * logit(t) - log_alpha
        mean = math.log(self.init_keep / (1 - self.init_keep)) + self.beta * self._half_logit
        noise = torch.randn(tuple(shape), generator=generator, dtype=torch.float32)
        return mean + self.init_std * noise

    def soft(self, logits, sample=None):
        sample = self.training if sample is None else sample
        if not sample:
            return self._stretch(torch.sigmoid(logits))
        u = torch.rand_like(logits).clamp(self.eps, 1 - self.eps)
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + logits) / self.beta)
        return self._stretch(s)

    def hard(self, logits):
        return self._stretch(torch.sigmoid(logits)) > 0.5

    def expected(self, logits):
        return torch.sigmoid(logits - self.beta * math.log(-self.gamma / self.zeta))

    def keep_probability(self, logits):
        """P(sampled gate > 0.5): the deterministic gate saturates at 0 and 1 long before
        the gate distribution does, so it would call every weight decided at once."""
        return torch.sigmoid(logits - self.beta * self._half_logit)

    @property
    def _half_logit(self) -> float:
        t = (0.5 - self.gamma) / (self.zeta - self.gamma)
        return math.log(t / (1 - t))

    def config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "beta": self.beta,
            "gamma": self.gamma,
            "zeta": self.zeta,
            "init_keep": self.init_keep,
            "init_std": self.init_std,
            "eps": self.eps,
        }


def kind_from_config(cfg: dict[str, Any]) -> MaskKind:
    """Rebuild any mask kind from its :meth:`MaskKind.config` dict (dispatch on ``name``)."""
    name = cfg.get("name")
    if name not in _REGISTRY:
        raise MaskError(
            f"Unknown mask kind {name!r}; known kinds are {sorted(_REGISTRY)}."
            f"{suggest(str(name), _REGISTRY)}"
        )
    return _REGISTRY[name].from_config(cfg)
