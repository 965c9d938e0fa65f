"""Task losses for :func:`~interp.masks.fit_masks`: ``objective(model, batch) -> scalar``.

Each objective is a small callable class with a ``name`` and a JSON-able ``config()`` that
mask files keep as metadata. ``fit_masks`` adds the sparsity penalty itself.

- :class:`BigramObjective`: cross-entropy of the masked model's next-token distribution to the
  bigram distribution ``p(next | current token)`` (soft targets), mean over positions. Every
  position has a target, the last one included, since it depends on the current token only.
- :class:`SelfDistillationObjective`: cross-entropy to the unmasked model's own distribution
  (the paper's "optimal pruning" subnetwork).
- :class:`LMObjective`: plain next-token cross-entropy.

A batch is a ``[batch, pos]`` LongTensor of tokens, a dict with ``"tokens"`` (and optionally
``"teacher_logits"``), or a ``(tokens, teacher_logits)`` pair.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from interp.data.bigram import BigramCounts
from interp.errors import InterpError
from interp.models.lm import lm_loss

__all__ = ["BigramObjective", "LMObjective", "PixelMatchObjective", "SelfDistillationObjective",
           "soft_target_ce"]

Tokens = Int[Tensor, "batch pos"]


def _unpack(batch: Any) -> tuple[Tokens, Tensor | None]:
    """(tokens, teacher logits or None) from the accepted batch forms."""
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, dict):
        if "tokens" not in batch:
            raise InterpError(
                f"A dict batch needs a 'tokens' entry; it has {sorted(batch)}."
            )
        return batch["tokens"], batch.get("teacher_logits")
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise InterpError(
        f"Unsupported batch of type {type(batch).__name__}: pass a [batch, pos] token tensor, "
        "a dict with 'tokens', or a (tokens, teacher_logits) pair."
    )


def soft_target_ce(
    logits: Float[Tensor, "*shape V"], target_logits: Float[Tensor, "*shape V"]
) -> Float[Tensor, "*shape"]:
    """``-sum_j softmax(target)_j log softmax(logits)_j`` per position (float32 math)."""
    target = torch.softmax(target_logits.float(), dim=-1)
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -torch.where(target > 0, target * logp, 0.0).sum(-1)


class LMObjective:
    """Mean next-token cross-entropy of the (masked) model on the batch's own tokens."""

    name = "lm"

    def __call__(self, model, batch) -> Tensor:
        tokens, _ = _unpack(batch)
        return lm_loss(model(tokens), tokens)

    def config(self) -> dict:
        return {"objective": self.name}

    def __repr__(self) -> str:
        return "LMObjective()"


class BigramObjective:
    """Cross-entropy of the model's next-token distribution to the bigram distribution.

    Args:
        counts: bigram statistics counted with the model's tokenizer (their ``interpolate``
            is honoured); moved to the model's device on first use.
        method: how :meth:`~interp.data.bigram.BigramCounts.soft_cross_entropy` builds the
            targets (``"auto"`` gathers only nonzeros at large vocabularies).
    """

    name = "bigram"

    def __init__(self, counts: BigramCounts, method: Literal["auto", "sparse", "dense"] = "auto"):
        if not isinstance(counts, BigramCounts):
            raise InterpError(
                "BigramObjective needs BigramCounts: BigramCounts.from_tokens(tokens, len(tok))."
            )
        self.counts = counts
        self.method = method

    def __call__(self, model, batch) -> Tensor:
        tokens, _ = _unpack(batch)
        logits = model(tokens)
        return self.counts.soft_cross_entropy(logits, tokens, method=self.method).mean()

    def config(self) -> dict:
        c = self.counts
        return {
            "objective": self.name, "vocab_size": c.vocab_size, "n_pairs": c.n_pairs,
            "nnz": c.nnz, "separator": c.separator, "interpolate": c.interpolate,
            "counts_meta": c.meta,
        }

    def __repr__(self) -> str:
        return f"BigramObjective({self.counts!r})"


class SelfDistillationObjective:
    """Cross-entropy of the masked model to the unmasked model's own next-token distribution.

    The teacher logits come from the batch when it carries them; otherwise they are computed
    under ``torch.no_grad()`` with the mask set switched ``"off"`` for that forward pass.

    Args:
        maskset: the attached :class:`~interp.masks.MaskSet` being trained (needed unless
            every batch carries ``teacher_logits``).
    """

    name = "self_distillation"

    def __init__(self, maskset=None):
        self.maskset = maskset

    @torch.no_grad()
    def teacher_logits(self, model, tokens: Tokens) -> Float[Tensor, "batch pos V"]:
        """The unmasked model's logits on ``tokens`` (no graph)."""
        if self.maskset is None:
            raise InterpError(
                "SelfDistillationObjective has no mask set to switch off: pass "
                "SelfDistillationObjective(maskset) or batches with 'teacher_logits'."
            )
        with self.maskset.using("off"):
            return model(tokens)

    def __call__(self, model, batch) -> Tensor:
        tokens, teacher = _unpack(batch)
        if teacher is None:
            teacher = self.teacher_logits(model, tokens)
        elif teacher.shape[:-1] != tokens.shape:
            raise InterpError(
                f"teacher_logits {tuple(teacher.shape)} do not match tokens {tuple(tokens.shape)}."
            )
        return soft_target_ce(model(tokens), teacher.to(tokens.device)).mean()

    def config(self) -> dict:
        return {"objective": self.name}

    def __repr__(self) -> str:
        return "SelfDistillationObjective()"


class PixelMatchObjective:
    """KL(teacher || model) between two pixel models' predicted distributions, in bits per
    subpixel: the masked model learns to predict like ``teacher`` (a local model for the
    image analogue of a bigram subnetwork, or an unmasked copy of the model itself for its
    optimal subnetwork). Batches are uint8 images ``[batch, C, H, W]``.

    With two categorical heads the KL is exact (a sum over the 256 values). Otherwise it is
    the Monte Carlo estimate ``E_v~teacher[log p_teacher(v) - log p_model(v)]`` over
    ``samples`` values per subpixel: unbiased, and 256 / ``samples`` times cheaper than the
    exact sum over a logistic mixture's values.
    """

    name = "pixel_match"

    def __init__(self, teacher, label: str = "teacher", samples: int = 8, seed: int = 0):
        self.teacher = teacher.eval()
        self.label = label
        self.samples = samples
        self._gen: torch.Generator | None = None
        self.seed = seed
        for p in self.teacher.parameters():
            p.requires_grad_(False)

    def __call__(self, model, batch) -> Tensor:
        with torch.no_grad():
            self.teacher.to(batch.device)
            t_params = self.teacher(batch)
        params = model(batch)
        if self.teacher.config.head == model.config.head == "categorical":
            target, log_q = t_params.log_softmax(2), params.log_softmax(2)
            return (target.exp() * (target - log_q)).sum(2).mean() / math.log(2.0)
        if self._gen is None or self._gen.device != batch.device:
            self._gen = torch.Generator(device=batch.device).manual_seed(self.seed)
        with torch.no_grad():
            values = self.teacher.sample_values(t_params, self.samples, self._gen)
            log_t = self.teacher.log_prob_of(t_params, values)
        log_q = model.log_prob_of(params, values)
        return (log_t - log_q).mean() / math.log(2.0)

    def config(self) -> dict:
        return {"name": self.name, "teacher": self.label, "samples": self.samples}

    def __repr__(self) -> str:
        return f"PixelMatchObjective(teacher={self.label!r}, samples={self.samples})"
