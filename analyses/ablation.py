"""Necessity: what the model loses without a subnetwork, and how it then generates.

- :func:`necessity`: validation LM loss of the full model and with each named subnetwork
  removed (``maskset.applied(model, mode="ablate")``: its complement kept). The paper compares
  the bigram subnetwork, a random subnetwork with the same count per block
  (``bigram.random_like(seed)``) and the optimal-pruning subnetwork: removing the bigram one
  hurts about as much as removing the much larger optimal one, random removal barely matters.
- :func:`generations`: greedy and low-temperature continuations of a prompt with the full
  model and without each subnetwork (the paper: without it, text collapses into one repeated
  token). A plain seeded sampling loop on ``model(tokens)`` logits.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import plotly.graph_objects as go
import torch
from jaxtyping import Int
from torch import Tensor

from interp.errors import InterpError
from interp.models.lm import mean_batch_loss, resolve_device
from interp.results import Result

__all__ = ["GenerationResult", "NecessityResult", "generate", "generations", "necessity",
           "plot_necessity"]

log = logging.getLogger(__name__)

#: How a mode reads in labels: the network that is left.
_MODE_LABEL = {"ablate": "without {}", "keep": "{} only"}


@dataclass(repr=False)
class NecessityResult(Result):
    """LM loss (nats/token) of the full model and with each subnetwork removed.

    Attributes:
        loss_full: the full model's loss.
        losses: name -> loss with that subnetwork removed.
        n_removed: name -> number of weights removed (the subnetwork's size).
        n_tokens: next-token predictions scored per network.
    """

    loss_full: float
    losses: dict[str, float]
    n_removed: dict[str, int] = field(default_factory=dict)
    n_tokens: int = 0

    @property
    def increase(self) -> dict[str, float]:
        """Loss increase over the full model, per removed subnetwork."""
        return {k: v - self.loss_full for k, v in self.losses.items()}


@torch.no_grad()
def necessity(
    model,
    batches: Iterable[Int[Tensor, "_batch _pos"]],
    masksets: Mapping[str, object],
    *,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> NecessityResult:
    """LM loss of the full model and of the model without each named subnetwork.

    Args:
        model: a TransformerLens bridge (any module the mask sets attach to).
        batches: held-out ``[batch, pos]`` token tensors (read once per network).
        masksets: name -> :class:`~interp.masks.MaskSet`; each is removed in turn
            (``mode="ablate"``). Pass ``bigram.random_like(seed)`` for the random control.
    """
    batches = list(batches)
    dev = resolve_device(model, device)
    was_training = model.training
    model.eval()
    try:
        full, n = mean_batch_loss(model, batches, device=dev, progress=progress,
                                  desc="loss (full)")
        losses, removed = {}, {}
        for name, ms in masksets.items():
            if getattr(ms, "attached", False):
                raise InterpError(
                    f"Mask set {name!r} is attached; detach it (or leave its applied() block) "
                    "before necessity(), which attaches each set in ablate mode."
                )
            with ms.applied(model, mode="ablate"):
                losses[name], _ = mean_batch_loss(model, batches, device=dev, progress=progress,
                                                  desc=f"loss without {name}")
            removed[name] = sum(int(m.sum()) for m in ms.hard_masks().values())
    finally:
        model.train(was_training)
    result = NecessityResult(full, losses, removed, n)
    log.info("necessity: full %.4f; %s", full,
             ", ".join(f"without {k} {v:.4f}" for k, v in losses.items()))
    return result


def plot_necessity(result: NecessityResult) -> go.Figure:
    """Bars: loss of the full model and without each subnetwork (with its size)."""
    from interp.plots import color_for, figure

    labels = ["full model"] + [f"without {k}" for k in result.losses]
    values = [result.loss_full] + list(result.losses.values())
    hover = ["nothing removed"] + [f"{result.n_removed.get(k, 0):,} weights removed"
                                   for k in result.losses]
    fig = figure(title="Necessity: LM loss with a subnetwork removed", xaxis_title="network",
                 yaxis_title="loss (nats/token)", showlegend=False)
    fig.add_trace(go.Bar(x=labels, y=values, hovertext=hover,
                         hovertemplate="%{x}: %{y:.4f} nats/token<br>%{hovertext}<extra></extra>",
                         marker_color=[color_for(x, i) for i, x in enumerate(labels)],
                         text=[f"{v:.3f}" for v in values], textposition="outside"))
    return fig


# --------------------------------------------------------------------------- generation


@dataclass(repr=False)
class GenerationResult(Result):
    """Continuations of one prompt, keyed ``"<network>, <decoding>"``.

    Attributes:
        prompt: the prompt text.
        texts: key -> prompt plus continuation, decoded.
        tokens: key -> generated token ids (continuation only).
        distinct_fraction: key -> distinct tokens / generated tokens (1 token repeated -> 1/n).
    """

    prompt: str
    texts: dict[str, str]
    tokens: dict[str, list[int]]
    distinct_fraction: dict[str, float]
    seed: int = 0


@torch.no_grad()
def generate(
    model,
    prompt: Int[Tensor, "1 n"],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    seed: int = 0,
) -> list[int]:
    """Continue ``prompt``: greedy at temperature 0, else softmax sampling (seeded).

    The context is cut to the model's ``n_ctx`` (when it has one) as it grows.
    """
    if temperature < 0:
        raise InterpError(f"temperature must be >= 0, got {temperature}.")
    dev = resolve_device(model)
    tokens = prompt.to(dev).long().reshape(1, -1)
    n_ctx = getattr(getattr(model, "cfg", None), "n_ctx", None)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out: list[int] = []
    for _ in range(max_new_tokens):
        context = tokens if n_ctx is None else tokens[:, -n_ctx:]
        logits = model(context)[0, -1].double().cpu()
        if temperature == 0:
            nxt = int(logits.argmax())
        else:
            probs = torch.softmax(logits / temperature, dim=-1)
            nxt = int(torch.multinomial(probs, 1, generator=gen))
        out.append(nxt)
        tokens = torch.cat([tokens, torch.tensor([[nxt]], device=dev)], dim=1)
    return out


def _decode(model, ids: list[int]) -> str:
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        return " ".join(map(str, ids))
    return tok.decode(ids)


def _prompt_ids(model, prompt) -> Tensor:
    if isinstance(prompt, Tensor):
        return prompt.reshape(1, -1)
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        raise InterpError("A text prompt needs model.tokenizer; pass token ids instead.")
    return tok(prompt, return_tensors="pt")["input_ids"]


def generations(
    model,
    prompt: str | Int[Tensor, "1 n"],
    masksets: Mapping[str, object],
    *,
    max_new_tokens: int = 40,
    temperatures: Sequence[float] = (0.0, 0.3),
    modes: Sequence[str] = ("ablate",),
    seed: int = 0,
) -> GenerationResult:
    """Continuations by the full model and by each masked network, at each temperature.

    Args:
        model: a bridge with a tokenizer (token ids are shown otherwise).
        prompt: text, or token ids ``[1, n]``.
        masksets: name -> mask set; each is applied in every mode of ``modes``
            (``"ablate"``: the model without it; ``"keep"``: the subnetwork alone).
        temperatures: 0 means greedy; others sample with the same seed for every network.
    """
    ids = _prompt_ids(model, prompt)
    prompt_text = _decode(model, ids.reshape(-1).tolist())
    networks: list[tuple[str, object, str | None]] = [("full", None, None)]
    for name, ms in masksets.items():
        for mode in modes:
            if mode not in _MODE_LABEL:
                raise InterpError(f"modes must be among {sorted(_MODE_LABEL)}, got {mode!r}.")
            networks.append((_MODE_LABEL[mode].format(name), ms, mode))
    texts, tokens, distinct = {}, {}, {}
    was_training = model.training
    model.eval()
    try:
        for label, ms, mode in networks:
            for temp in temperatures:
                key = f"{label}, " + ("greedy" if temp == 0 else f"T={temp:g}")
                if ms is None:
                    out = generate(model, ids, max_new_tokens, temperature=temp, seed=seed)
                else:
                    with ms.applied(model, mode=mode):
                        out = generate(model, ids, max_new_tokens, temperature=temp, seed=seed)
                tokens[key] = out
                texts[key] = prompt_text + _decode(model, out)
                distinct[key] = len(set(out)) / max(1, len(out))
    finally:
        model.train(was_training)
    return GenerationResult(prompt_text, texts, tokens, distinct, seed)
