"""Subnetworks across checkpoints: resumable per-step records and consecutive overlaps."""

from __future__ import annotations

import pytest
import torch

from analyses.checkpoints import (
    CheckpointEntry,
    CheckpointsResult,
    across_checkpoints,
    measure_entry,
    metrics_record,
    plot_checkpoint_layout,
    plot_checkpoint_overlap,
    plot_checkpoint_r,
)
from analyses.overlap import overlap_analysis
from interp.masks import MaskSet


def _masks_for(model, step: int) -> MaskSet:
    """A subnetwork that keeps the first MLP densely and more of it at later steps."""
    ms = MaskSet.empty(model)
    ms.set_neuron(0, list(range(0, 8 + step // 10)), True)
    ms.set_head(1, 0, True, which="v")
    return ms


def test_entries_resume_and_consecutive_overlaps(native_model, tmp_path):
    calls = []

    def measure(step):
        calls.append(step)
        ms = _masks_for(native_model, step)
        path = ms.save(tmp_path / f"mask-{step}")
        return measure_entry(step, ms, val_loss=5.0 - step / 100, full_r=0.5 + step / 1000,
                             subnetwork_r=0.9, mask_path=path.name)

    load = lambda p: MaskSet.load(tmp_path / p)  # noqa: E731
    res = across_checkpoints([20, 10, 30], measure, tmp_path, 1.0, recipe={"name": "mini"},
                             load_masks=load)
    assert calls == [10, 20, 30] and [e.step for e in res.entries] == [10, 20, 30]
    first = res.entries[0]
    assert first.plurality_in_first_mlp is True and first.layer_shares[0] > 0.5
    assert sum(first.block_shares.values()) == pytest.approx(1.0)
    # consecutive overlaps equal the overlap analysis of the saved masks, per layer too
    assert [(o.label_a, o.label_b) for o in res.overlaps] == [("step 10", "step 20"),
                                                               ("step 20", "step 30")]
    direct = overlap_analysis(load(res.entries[0].mask_path), load(res.entries[1].mask_path))
    assert res.overlaps[0].overlap == direct.overlap
    assert [lo.p_value for lo in res.overlaps[0].layers] == [lo.p_value for lo in direct.layers]
    # a rerun reuses every record and measures nothing
    calls.clear()
    again = across_checkpoints([10, 20, 30], measure, tmp_path, 1.0, load_masks=load)
    assert calls == [] and again.entries == res.entries
    # delete one step's record: only that step is measured again, with the same result
    (tmp_path / "checkpoint-000020.json").unlink()
    third = across_checkpoints([10, 20, 30], measure, tmp_path, 1.0, load_masks=load)
    assert calls == [20] and third.entries == res.entries
    # round trip and metrics
    back = CheckpointsResult.from_json(res.to_json())
    assert back.entries == res.entries and back.overlaps[1].layers == res.overlaps[1].layers
    rec = metrics_record(res.to_dict())
    assert [(o["step_a"], o["step_b"]) for o in rec["overlaps"]] == [(10, 20), (20, 30)]
    assert "mask_path" not in rec["entries"][0]
    rows = res.overlap_rows()
    assert [(r["pair"], r["layer"]) for r in rows] == [
        ("step 10 → step 20", 0), ("step 10 → step 20", 1),
        ("step 20 → step 30", 0), ("step 20 → step 30", 1)]
    assert all(r["p"].startswith("p ") for r in rows)  # formatted, never a bare 0
    assert len(rec["overlaps"][0]["layers"]) == 2


def test_figures(native_model, tmp_path):
    entries = [CheckpointEntry(step=s, val_loss=None, full_r=0.5, subnetwork_r=0.8 + s / 1000,
                               active_fraction=0.05, block_shares={"mlp_in": 0.7, "q": 0.3})
               for s in (100, 200)]
    res = CheckpointsResult(1.0, entries)
    fig = plot_checkpoint_r(res)
    assert [t.name for t in fig.data] == ["full model", "bigram subnetwork"]
    assert list(fig.data[1].y) == pytest.approx([0.9, 1.0])
    layout = plot_checkpoint_layout(res)
    assert [t.name for t in layout.data] == ["q", "mlp_in"]  # BLOCK_KINDS order, empty kinds out
    assert list(layout.data[1].y) == pytest.approx([70.0, 70.0])
    a, b = _masks_for(native_model, 10), _masks_for(native_model, 20)
    res.overlaps = [overlap_analysis(a, b, label_a="step 100", label_b="step 200")]
    over = plot_checkpoint_overlap(res)
    assert list(over.data[0].x) == ["layer 0", "layer 1"]
    assert over.data[0].y[0] == pytest.approx(res.overlaps[0].layers[0].ratio)


def test_entry_of_an_empty_subnetwork_has_no_plurality(native_model):
    entry = measure_entry(5, MaskSet.empty(native_model), val_loss=None, full_r=0.1,
                          subnetwork_r=float("nan"))
    assert entry.active_fraction == 0.0 and entry.plurality_in_first_mlp is None
    assert torch.isnan(torch.tensor(CheckpointEntry.from_json(entry.to_json()).subnetwork_r))
