"""interp.numerics: flush-to-zero on every torch thread inside no_denormals(), and the
caller's setting restored after it (the ``flush`` fixture is in tests/conftest.py)."""

from __future__ import annotations

import pytest
import torch

from interp.numerics import flush_denormal_enabled, no_denormals


@pytest.fixture()
def two(flush):
    """The flush probe with torch on two threads, so a probe op is split over two."""
    torch.set_num_threads(2)
    assert torch.get_num_threads() == 2
    return flush


@pytest.mark.parametrize("caller_flushes", [False, True])
def test_no_denormals_flushes_on_every_thread_and_restores(two, caller_flushes):
    assert two.set(caller_flushes)
    assert two.n_flushed() == (two.N if caller_flushes else 0)  # the caller's setting holds
    with no_denormals() as active:
        assert active is True
        assert flush_denormal_enabled()
        assert two.everywhere()  # every element: no thread left keeping subnormals
        # a product of two normal floats that lands in the subnormal range comes out as 0
        assert not (torch.full((two.N,), 1e-20) * 1e-20).any()
    assert flush_denormal_enabled() is caller_flushes
    assert two.n_flushed() == (two.N if caller_flushes else 0)


def test_subnormals_survive_without_flushing(two):
    """The probes can fail: with flushing off, subnormal * 1 and 1e-20 * 1e-20 are not zero."""
    two.set(False)
    assert two.nowhere()
    assert (torch.full((two.N,), 1e-20) * 1e-20).all()


@pytest.mark.parametrize("caller_flushes", [False, True])
def test_setting_restored_after_an_exception(two, caller_flushes):
    two.set(caller_flushes)
    with pytest.raises(RuntimeError, match="inside"), no_denormals():
        assert two.everywhere()
        raise RuntimeError("inside")
    assert two.n_flushed() == (two.N if caller_flushes else 0)


def test_disabled_block_leaves_the_callers_setting(two):
    for caller_flushes in (False, True):
        two.set(caller_flushes)
        with no_denormals(enabled=False) as active:
            assert active is caller_flushes
            assert two.n_flushed() == (two.N if caller_flushes else 0)
        assert flush_denormal_enabled() is caller_flushes


def test_nested_blocks_keep_flushing_until_the_outer_one_ends(two):
    two.set(False)
    with no_denormals():
        with no_denormals() as inner:
            assert inner is True and two.everywhere()
        assert two.everywhere()  # the inner block restores "on", not the caller's "off"
    assert two.nowhere()


def test_calling_thread_only_flushing_is_reported_and_fixed(two):
    """torch's own set_flush_denormal covers the calling thread only: that is reported as not
    flushing, and no_denormals() extends it to every worker."""
    two.set(False)
    torch.set_flush_denormal(True)  # torch's own call: the calling thread only
    assert 0 < two.n_flushed() < two.N  # half the workers' chunks keep their subnormals
    with no_denormals():
        assert two.everywhere()
    assert flush_denormal_enabled() is False
