"""Peak memory of a block of code: torch tensors on the CPU or a GPU, and Python objects.

``tracemalloc`` does not see torch's CPU tensors (they come from torch's own allocator), and
the process's resident size moves with the C allocator's caching. What is measured instead:

- CPU tensors: every allocation and free of torch's CPU allocator during the block, recorded
  by ``torch.profiler`` (``profile_memory=True``) with the allocator's running total; the
  peak is the highest total minus the total at entry. Tensors allocated before the block and
  freed inside it are not seen as freed (the profiler never learnt their size), so the peak
  can only be overstated, never hidden.
- CUDA tensors: ``torch.cuda.max_memory_allocated`` minus the allocation at entry.
- Python objects (lists, numpy arrays): ``tracemalloc``'s peak, when ``python=True``.

Used by the memory benchmark (``benchmarks/bench_memory.py``) and the tests that show the
streaming analyses hold no activation cache.
"""

from __future__ import annotations

import contextlib
import tracemalloc
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from interp.errors import InterpError

__all__ = ["MemoryPeak", "peak_memory"]


@dataclass
class MemoryPeak:
    """What :func:`peak_memory` measured (bytes, relative to the block's entry).

    Attributes:
        device: where the torch tensors were counted (``cpu`` or a CUDA device).
        torch_peak: the most bytes of torch tensors alive at once, above the entry level.
        torch_end: torch tensor bytes still alive at the end, above the entry level.
        python_peak: tracemalloc's peak above its level at entry (None unless ``python``).
        n_events: allocator events seen (CPU; 0 on CUDA): a block that allocates nothing
            measured nothing.
    """

    device: str
    torch_peak: int = 0
    torch_end: int = 0
    python_peak: int | None = None
    n_events: int = 0

    @property
    def total_peak(self) -> int:
        """``torch_peak + python_peak`` (an upper bound of the combined peak)."""
        return self.torch_peak + (self.python_peak or 0)


@contextlib.contextmanager
def peak_memory(device: str | torch.device = "cpu", *, python: bool = False
                ) -> Iterator[MemoryPeak]:
    """Measure peak tensor memory (and optionally Python memory) of the ``with`` block.

    The yielded :class:`MemoryPeak` is filled in when the block ends. CPU measurement runs
    the block under ``torch.profiler``, which slows op-heavy code; use it around a few steps,
    not a training run.
    """
    dev = torch.device(device)
    if dev.type not in ("cpu", "cuda"):
        raise InterpError(f"peak_memory measures 'cpu' or 'cuda' devices, not {dev.type!r}.")
    out = MemoryPeak(device=str(dev))
    with (_cuda_peak(dev, out) if dev.type == "cuda" else _cpu_peak(out)):
        # innermost: the profiler's own start-up and bookkeeping are not traced or counted
        started = python and not tracemalloc.is_tracing()
        if started:
            tracemalloc.start()
        try:
            py0 = tracemalloc.get_traced_memory()[0] if python else 0
            if python:
                tracemalloc.reset_peak()
            yield out
            if python:
                out.python_peak = max(0, tracemalloc.get_traced_memory()[1] - py0)
        finally:
            if started:
                tracemalloc.stop()


@contextlib.contextmanager
def _cuda_peak(dev: torch.device, out: MemoryPeak) -> Iterator[None]:
    torch.cuda.synchronize(dev)
    start = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    yield
    torch.cuda.synchronize(dev)
    out.torch_peak = max(0, torch.cuda.max_memory_allocated(dev) - start)
    out.torch_end = torch.cuda.memory_allocated(dev) - start


@contextlib.contextmanager
def _cpu_peak(out: MemoryPeak) -> Iterator[None]:
    from torch.profiler import ProfilerActivity, profile

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            sentinel = torch.empty(1)  # its event gives the allocator's total at entry
            yield
            del sentinel
    events = _allocations(prof)
    first = next((e for e in events if e[0] > 0), None)
    if first is None:
        raise InterpError("peak_memory saw no CPU allocation events; this torch build's "
                          "profiler does not report memory.")
    base = first[1] - first[0]
    out.n_events = len(events)
    out.torch_peak = max(0, max(total for _, total in events) - base - first[0])
    out.torch_end = events[-1][1] - base


def _allocations(prof) -> list[tuple[int, int]]:
    """(bytes allocated (+) or freed (-), allocator total after it) of every CPU allocator
    event, in time order."""
    try:
        from torch._C._profiler import _EventType

        tree = prof.profiler.kineto_results.experimental_event_tree()
    except (ImportError, AttributeError) as e:  # pragma: no cover - other torch versions
        raise InterpError(f"peak_memory needs torch's profiler event tree ({e}); use a torch "
                          "version with torch._C._profiler (2.1 or newer).") from e
    found = []
    stack = list(tree)
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == _EventType.Allocation:
            f = node.extra_fields
            if f.device.type == "cpu":
                found.append((node.start_time_ns, f.alloc_size, f.total_allocated))
    found.sort(key=lambda e: e[0])
    return [(size, total) for _, size, total in found]
