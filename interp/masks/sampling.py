"""Random subnetworks as plain dicts of boolean masks: the null for ablations and overlaps."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from interp.errors import MaskError

__all__ = ["random_masks"]


def random_masks(
    masks: Mapping[str, Tensor],
    *,
    eligible: Mapping[str, Tensor] | None = None,
    seed: int = 0,
) -> dict[str, Tensor]:
    """A random subnetwork with as many kept weights per target as ``masks``.

    For each target (in ``masks``' order) the kept count is that of ``masks[name]`` (within
    ``eligible[name]`` when given), and the kept positions are drawn uniformly among the
    eligible elements (all elements when ``eligible`` is None or lacks the name). Each result
    has its input mask's shape and device; the same seed gives the same result.

    Args:
        masks: target name -> mask (True or nonzero = keep), e.g. ``MaskSet.hard_masks()``;
            targets have their own shapes.
        eligible: target name -> mask of the weights a subnetwork can contain at all (e.g.
            ``MaskSet.eligible_masks()``, which excludes exact zeros), same shapes as ``masks``.
        seed: seed of the one ``torch.Generator`` the draws of all targets share.

    Returns:
        target name -> boolean mask (True = keep), in ``masks``' order.
    """
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, Tensor] = {}
    for name, mask in masks.items():
        flat = mask.detach().to(torch.bool).flatten().cpu()
        pool = torch.arange(flat.numel())
        if eligible is not None and name in eligible:
            elig = eligible[name]
            if tuple(elig.shape) != tuple(mask.shape):
                raise MaskError(
                    f"eligible[{name!r}] has shape {tuple(elig.shape)} but the mask has "
                    f"{tuple(mask.shape)}; pass eligibility masks of the same targets."
                )
            elig = elig.detach().to(torch.bool).flatten().cpu()
            flat, pool = flat & elig, pool[elig]
        k = int(flat.sum())
        chosen = pool[torch.randperm(pool.numel(), generator=gen)[:k]]
        new = torch.zeros(flat.numel(), dtype=torch.bool)
        new[chosen] = True
        out[name] = new.view(mask.shape).to(mask.device)
    return out
