"""Floating-point settings for training loops: subnormal floats are flushed to zero.

As a mask's temperature grows, ``sigmoid(T * s)`` of the dropped weights, their gradients,
the masked weights and AdamW's second moments fall below float32's smallest normal number
(1.2e-38) into the subnormal range. Intel cores handle subnormals in microcode, tens of times
slower: a bigram mask fit went from 10 s to 143 s per 100 steps as T grew. Clamping one
quantity would not help, since subnormals arise in several places (products, squared
gradients), and a subnormal carries nothing a training step needs. So every training loop
runs inside :func:`no_denormals`, which turns on flush-to-zero / denormals-are-zero for the
loop and restores the caller's setting afterwards. CUDA kernels are unaffected.

``torch.set_flush_denormal`` sets the flag of the calling thread only, while torch's
elementwise kernels run on its OpenMP worker threads too; so the flag is also set inside one
OpenMP parallel region of torch's own ``libgomp`` (whose pooled threads then keep it). Where
that library is not found (macOS' libomp, other builds), only the calling thread flushes.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
from collections.abc import Iterator
from pathlib import Path

import torch

__all__ = ["flush_denormal_enabled", "no_denormals", "set_flush_denormal"]

log = logging.getLogger(__name__)

#: Bits of the float32 subnormal 1e-40 (below the smallest normal, 1.18e-38).
_SUBNORMAL_BITS = 0x116C2
_PROBE_SIZE = 1 << 18  # large enough that torch splits the probe over its worker threads

_CALLBACK_TYPE = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
_flag = [False]


def _in_worker(_data) -> None:
    torch.set_flush_denormal(_flag[0])


_CALLBACK = _CALLBACK_TYPE(_in_worker)  # kept alive for the process


@functools.cache
def _gomp():
    """torch's own libgomp (the one its kernels use), or None."""
    for path in sorted((Path(torch.__file__).parent / "lib").glob("libgomp*.so*")):
        try:
            lib = ctypes.CDLL(str(path))
            lib.GOMP_parallel.argtypes = [_CALLBACK_TYPE, ctypes.c_void_p, ctypes.c_uint,
                                          ctypes.c_uint]
            return lib
        except (OSError, AttributeError):
            continue
    log.debug("torch's libgomp not found: flush-to-zero covers the calling thread only")
    return None


def set_flush_denormal(flag: bool) -> bool:
    """Set flush-to-zero on the calling thread and torch's OpenMP workers; False where the
    CPU does not support it."""
    ok = torch.set_flush_denormal(flag)
    gomp, n = _gomp(), torch.get_num_threads()
    if ok and gomp is not None and n > 1:
        _flag[0] = flag
        gomp.GOMP_parallel(_CALLBACK, None, n, 0)
    return ok


def flush_denormal_enabled() -> bool:
    """Whether CPU float math flushes subnormals to zero on every torch thread (torch has no
    getter: a subnormal times one comes out as zero exactly where flushing is on). The probe
    is built from its bit pattern: writing the float would already be flushed on a thread
    that flushes, hiding worker threads that do not."""
    probe = torch.full((_PROBE_SIZE,), _SUBNORMAL_BITS, dtype=torch.int32).view(torch.float32)
    return not bool((probe * 1.0).any())


@contextlib.contextmanager
def no_denormals(enabled: bool = True) -> Iterator[bool]:
    """Flush subnormal floats to zero inside the block; restore the previous setting after.

    Yields whether flushing is active (False where the CPU does not support it, or with
    ``enabled=False``, which leaves the setting alone).
    """
    before = flush_denormal_enabled()
    active = before
    if enabled and not before:
        active = set_flush_denormal(True)
    try:
        yield active
    finally:
        if active != before:
            set_flush_denormal(before)
