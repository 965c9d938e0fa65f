"""fit_masks runs its steps with subnormals flushed to zero (on every torch thread) and gives
the caller's setting back; ``flush_denormals=False`` leaves the caller's setting alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from interp.masks import MaskSet, fit_masks
from interp.numerics import flush_denormal_enabled

STEPS = 3


def _recording_objective(flush):
    """LM cross-entropy that records, on each call, what the flush setting is (torch's
    probe and the all-threads count of the conftest probe)."""
    seen: list[tuple[bool, int]] = []

    def objective(model, batch):
        seen.append((flush_denormal_enabled(), flush.n_flushed()))
        logits = model(batch)
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten())

    return objective, seen


def _fit(model, objective, batches, **kwargs):
    ms = MaskSet.for_model(model, seed=0)
    res = fit_masks(model, ms, objective, batches, max_steps=STEPS, stop_rule=False,
                    progress=False, **kwargs)
    assert res.steps == STEPS
    return res


@pytest.fixture()
def two(flush):
    torch.set_num_threads(2)
    return flush


@pytest.mark.parametrize("caller_flushes", [False, True])
def test_fit_masks_flushes_during_its_steps_and_restores(native_model, two, token_batches,
                                                         caller_flushes):
    two.set(caller_flushes)
    objective, seen = _recording_objective(two)
    _fit(native_model, objective, token_batches(native_model.cfg.d_vocab))
    assert seen == [(True, two.N)] * STEPS  # every step, every thread
    assert flush_denormal_enabled() is caller_flushes
    assert two.n_flushed() == (two.N if caller_flushes else 0)


@pytest.mark.parametrize("caller_flushes", [False, True])
def test_fit_masks_without_flushing_sees_the_callers_setting(native_model, two, token_batches,
                                                             caller_flushes):
    two.set(caller_flushes)
    objective, seen = _recording_objective(two)
    _fit(native_model, objective, token_batches(native_model.cfg.d_vocab),
         flush_denormals=False)
    assert seen == [(caller_flushes, two.N if caller_flushes else 0)] * STEPS
    assert two.n_flushed() == (two.N if caller_flushes else 0)


def test_setting_restored_when_the_fit_fails(native_model, two, token_batches):
    two.set(False)
    calls = []

    def failing(model, batch):
        calls.append(two.everywhere())
        raise RuntimeError("objective failed")

    with pytest.raises(RuntimeError, match="objective failed"):
        _fit(native_model, failing, token_batches(native_model.cfg.d_vocab))
    assert calls == [True]
    assert two.nowhere()
