"""random_masks: the random null over plain dicts of boolean masks (and MaskSet.random_like)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from interp.errors import MaskError
from interp.masks import MaskSet, random_masks


def _masks(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {"a": torch.rand(6, 5, generator=gen) > 0.6,
            "b": torch.rand(4, 7, generator=gen) > 0.3,
            "c": torch.zeros(3, dtype=torch.bool)}


def _eligible(masks, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.rand(m.shape, generator=gen) > 0.2 for n, m in masks.items()}


def test_counts_shapes_and_devices_are_kept():
    masks = _masks()
    out = random_masks(masks, seed=4)
    assert list(out) == list(masks)
    for n, m in masks.items():
        assert out[n].dtype == torch.bool and out[n].shape == m.shape
        assert out[n].device == m.device
        assert int(out[n].sum()) == int(m.sum())
    assert not torch.equal(out["a"], masks["a"]) or not torch.equal(out["b"], masks["b"])


def test_only_eligible_positions_and_count_within_eligible():
    masks = _masks()
    elig = _eligible(masks)
    for seed in range(5):
        out = random_masks(masks, eligible=elig, seed=seed)
        for n, m in masks.items():
            assert not (out[n] & ~elig[n]).any()
            assert int(out[n].sum()) == int((m & elig[n]).sum())


def test_a_target_without_eligibility_uses_all_positions():
    masks = {"a": torch.ones(50, dtype=torch.bool).index_fill(0, torch.arange(25), False)}
    picked = torch.zeros(50, dtype=torch.bool)
    for seed in range(20):
        picked |= random_masks(masks, eligible={"other": torch.ones(3, dtype=torch.bool)},
                               seed=seed)["a"]
    assert picked[:25].any()  # positions the input never kept are drawn too


def test_same_seed_same_result_other_seed_other_result():
    masks, elig = _masks(), _eligible(_masks())
    r1 = random_masks(masks, eligible=elig, seed=7)
    r2 = random_masks(masks, eligible=elig, seed=7)
    r3 = random_masks(masks, eligible=elig, seed=8)
    assert all(torch.equal(r1[n], r2[n]) for n in masks)
    assert any(not torch.equal(r1[n], r3[n]) for n in masks)


def test_inputs_are_not_changed_and_shape_mismatch_is_explained():
    masks, elig = _masks(), _eligible(_masks())
    copies = {n: m.clone() for n, m in masks.items()}
    random_masks(masks, eligible=elig, seed=0)
    assert all(torch.equal(masks[n], copies[n]) for n in masks)
    with pytest.raises(MaskError, match=r"eligible\['a'\] has shape \(5, 6\)"):
        random_masks(masks, eligible={"a": torch.ones(5, 6, dtype=torch.bool)})


def _old_random_like(ms: MaskSet, seed: int) -> dict[str, torch.Tensor]:
    """MaskSet.random_like as it was before random_masks existed (pins its numbers)."""
    gen = torch.Generator().manual_seed(seed)
    al = ms.allowed
    out = {}
    for n, m in ms.hard_masks().items():
        pos = al[n].flatten().nonzero().squeeze(1).cpu()
        pick = pos[torch.randperm(len(pos), generator=gen)[: int(m.sum())]]
        flat = torch.zeros(m.numel(), dtype=torch.bool)
        flat[pick] = True
        out[n] = flat.view(m.shape).to(m.device)
    return out


def test_random_like_is_random_masks_and_keeps_its_old_results():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(7, 5), nn.Linear(5, 9))
    with torch.no_grad():
        net[0].weight[0, :3] = 0  # exact zeros are not eligible
    ms = MaskSet.for_model(net, targets={"a": (net[0], "weight"), "b": (net[1], "weight")})
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in ms.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    for seed in (0, 3, 17):
        new = ms.random_like(seed).hard_masks()
        old = _old_random_like(ms, seed)
        plain = random_masks(ms.hard_masks(), eligible=ms.eligible_masks(), seed=seed)
        assert all(torch.equal(new[n], old[n]) and torch.equal(new[n], plain[n])
                   for n in ms.names)
        assert not new["a"][0, :3].any()
