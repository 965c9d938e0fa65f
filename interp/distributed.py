"""Data-parallel mask training on ``torch.distributed`` (one process per device, torchrun).

Every process holds the whole model and the same mask set, trains on its own shard of each
global batch, and averages the mask-logit gradients over processes before every optimizer
step; so every rank takes the same AdamW step and keeps identical masks. With equal shards
and an objective that is a mean over batch rows, this is the single-process fit on the
global batch, up to floating-point rounding (tests/interp/masks/test_distributed.py). What
:func:`~interp.masks.fit_masks` does with ``distributed=True``:

- start: the mask logits and the seed are broadcast from rank 0, so every rank starts
  alike and draws the same hard-concrete noise (the noise belongs to the mask, not a row);
- every step: one all-reduce per mask tensor averages the gradients. Each rank's loss holds
  the whole sparsity penalty, and averaging (not summing) counts it once. A flag rides
  along: if any rank's batches ran out, every rank ends the fit at that step;
- every check: the logged losses are averaged (the history is the global batch's on every
  rank) and the mask statistics of rank 0 decide the stopping rule for all;
- end: a fingerprint of the logits is compared across ranks (an error if they differ);
- only rank 0 shows a progress bar or logs warnings; writing files is the caller's job,
  on rank 0 (:attr:`DistInfo.is_main`).

Use in a script started by ``torchrun --nproc_per_node=N script.py``::

    from interp import distributed
    dist = distributed.init()                      # from torchrun's environment
    model = build_lm("tiny", tok, device=dist.device)
    ms = MaskSet.for_model(model, seed=0)
    fit_masks(model, ms, objective, distributed.shard_batches(global_batches),
              distributed=True)
    if dist.is_main:
        ms.save("masks/run")
    distributed.shutdown()

``examples/torchrun_fit_masks.py`` is a complete script; docs/scale.md has the commands.
Run without torchrun, :func:`init` returns a one-process :class:`DistInfo` and the same
script trains alone.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from interp.errors import ConfigError, InterpError

__all__ = ["DistInfo", "GradSync", "init", "info", "main_first", "shard", "shard_batches",
           "shutdown"]

#: The torchrun environment variables :func:`init` reads.
ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: its rank among ``world_size`` processes, its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"
    backend: str | None = None  # None: no process group (a single process)

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that prints and writes files."""
        return self.rank == 0

    @property
    def initialized(self) -> bool:
        return self.backend is not None


def _env_int(name: str, default: int | None = None) -> int:
    text = os.environ.get(name)
    if text is None:
        if default is None:
            raise ConfigError(f"Environment variable {name} is not set: start the script with "
                              "torchrun, which sets " + ", ".join(ENV_VARS) + ".")
        return default
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"Environment variable {name}={text!r} is not a whole number; "
                          "start the script with torchrun.") from None


def info() -> DistInfo:
    """The current process's :class:`DistInfo` (rank 0 of 1 without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistInfo()
    local = _env_int("LOCAL_RANK", dist.get_rank())
    backend = dist.get_backend()
    device = (f"cuda:{torch.cuda.current_device()}"
              if backend == "nccl" and torch.cuda.is_available() else "cpu")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local, device, backend)


def init(
    backend: str | None = None,
    device: str | torch.device | None = None,
    *,
    timeout_s: float = 1800.0,
) -> DistInfo:
    """Join the process group torchrun describes (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
    ``MASTER_ADDR``, ``MASTER_PORT``) and pick this process's device.

    Without those variables (a plain ``python script.py``) nothing is initialised and a
    one-process :class:`DistInfo` comes back, so one script serves both. Calling it again
    returns the current group's info.

    Args:
        backend: ``"nccl"`` (GPUs) or ``"gloo"`` (CPUs; also works with GPUs); default
            nccl when the device is a GPU, else gloo.
        device: default ``cuda:LOCAL_RANK`` when CUDA is available, else ``cpu``. A CUDA
            device becomes the process's current device.
        timeout_s: how long a collective may wait for the other ranks.

    Raises:
        ConfigError: malformed environment, an unknown or unavailable backend, nccl without
            a GPU, a device index beyond the GPUs present, or a group that cannot form.
    """
    if not dist.is_available():
        raise ConfigError("This torch build has no torch.distributed; install a standard "
                          "torch build to train on several processes.")
    if dist.is_initialized():
        return info()
    if "WORLD_SIZE" not in os.environ:
        dev = torch.device(device) if device is not None else (
            torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu"))
        return DistInfo(device=str(dev))
    rank, world = _env_int("RANK"), _env_int("WORLD_SIZE")
    local = _env_int("LOCAL_RANK", rank)
    if not 0 <= rank < world:
        raise ConfigError(f"RANK={rank} does not lie in [0, WORLD_SIZE={world}); start the "
                          "script with torchrun.")
    if device is None:
        dev = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    else:
        dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {str(dev)!r}: no CUDA GPU here. Use device='cpu' "
                              "with backend='gloo'.")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(
                f"device {str(dev)!r}: only {torch.cuda.device_count()} GPUs on this node; "
                "start at most that many processes per node (--nproc_per_node).")
        torch.cuda.set_device(dev)
    backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
    available = {"gloo": dist.is_gloo_available(), "nccl": dist.is_nccl_available(),
                 "mpi": dist.is_mpi_available()}
    if backend not in available:
        raise ConfigError(f"Unknown backend {backend!r}; use 'nccl' (GPUs) or 'gloo' (CPUs).")
    if backend == "nccl" and dev.type != "cuda":
        raise ConfigError("Backend 'nccl' needs GPUs; use backend='gloo' on CPUs.")
    if not available[backend]:
        raise ConfigError(f"Backend {backend!r} is not available in this torch build; use "
                          f"{'gloo' if backend != 'gloo' else 'nccl'}.")
    try:
        dist.init_process_group(backend, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
    except (ValueError, RuntimeError) as e:
        raise ConfigError(
            f"Could not form the process group (rank {rank} of {world}, backend {backend}): "
            f"{e}. Start every process with torchrun (it sets {', '.join(ENV_VARS)}).") from e
    return DistInfo(rank, world, local, str(dev), backend)


def shutdown() -> None:
    """Leave the process group (a no-op without one)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def main_first() -> Iterator[DistInfo]:
    """Rank 0 runs the block first, then the others: e.g. rank 0 trains and caches a
    tokenizer, the others read the cache. A no-op without a process group."""
    current = info()
    if not current.initialized:
        yield current
        return
    if not current.is_main:
        dist.barrier()
    yield current
    if current.is_main:
        dist.barrier()


# --------------------------------------------------------------------------- batches


def _rows(batch: Any) -> int | None:
    if isinstance(batch, Tensor):
        return batch.shape[0] if batch.ndim else None
    if isinstance(batch, dict):
        found = [_rows(v) for v in batch.values()]
    elif isinstance(batch, (list, tuple)):
        found = [_rows(v) for v in batch]
    else:
        return None
    found = [n for n in found if n is not None]
    return found[0] if found else None


def _take(batch: Any, lo: int, hi: int, n: int) -> Any:
    if isinstance(batch, Tensor):
        return batch[lo:hi] if batch.ndim and batch.shape[0] == n else batch
    if isinstance(batch, dict):
        return {k: _take(v, lo, hi, n) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_take(v, lo, hi, n) for v in batch)
    return batch


def shard(batch: Any, rank: int | None = None, world_size: int | None = None) -> Any:
    """This rank's contiguous slice of a global batch along its first axis.

    ``batch`` is a tensor, a dict or a tuple/list of them (e.g. tokens with teacher logits);
    every tensor whose first axis has the batch's row count is sliced, others pass through.
    Rank ``r`` of ``W`` gets rows ``[r * n / W, (r + 1) * n / W)``.

    Raises:
        ConfigError: the row count does not divide by the world size (unequal shards would
            weight rows unequally in the averaged gradient), or the batch has no tensor.
    """
    here = info()
    rank = here.rank if rank is None else rank
    world = here.world_size if world_size is None else world_size
    if world == 1:
        return batch
    n = _rows(batch)
    if n is None:
        raise ConfigError(f"Cannot shard a batch of type {type(batch).__name__}: pass a tensor, "
                          "a dict or a tuple of tensors whose first axis is the batch.")
    if n % world:
        raise ConfigError(f"A global batch of {n} rows does not split evenly over {world} "
                          f"processes; use a batch size divisible by {world}.")
    per = n // world
    return _take(batch, rank * per, (rank + 1) * per, n)


class _Sharded:
    """A re-iterable over the shards of a re-iterable of global batches."""

    def __init__(self, batches: Iterable, rank: int | None, world_size: int | None):
        self.batches, self.rank, self.world_size = batches, rank, world_size

    def __iter__(self) -> Iterator:
        return (shard(b, self.rank, self.world_size) for b in self.batches)


def shard_batches(
    batches: Iterable | Callable[[int], Iterable],
    rank: int | None = None,
    world_size: int | None = None,
) -> Iterable | Callable[[int], Iterable]:
    """This rank's shards of a stream of global batches, in the form ``fit_masks`` takes.

    A re-iterable stays re-iterable (``fit_masks`` cycles it), a one-shot iterator stays
    one-shot, and ``batches(seed)`` stays a callable of the seed. Every rank must see the same
    global batches in the same order (same data and seed), as :func:`~interp.data.text.
    iterate_batches` gives.
    """
    if callable(batches) and not hasattr(batches, "__iter__"):
        return lambda seed: shard_batches(batches(seed), rank, world_size)
    if iter(batches) is batches:
        return (shard(b, rank, world_size) for b in batches)
    return _Sharded(batches, rank, world_size)


# --------------------------------------------------------------------------- collectives


class GradSync:
    """The collectives :func:`~interp.masks.fit_masks` runs to keep ranks in lock step.

    Built on the default process group (or ``group``); every method is a collective that
    every rank must call in the same order.
    """

    def __init__(self, group: Any = None):
        if not (dist.is_available() and dist.is_initialized()):
            raise ConfigError(
                "distributed=True needs a torch.distributed process group: start the script "
                "with torchrun and call interp.distributed.init() first.")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _src(self) -> int:
        return 0 if self.group is None else dist.get_global_rank(self.group, 0)

    def broadcast_(self, tensors: Sequence[Tensor]) -> None:
        """Overwrite ``tensors`` in place with rank 0's values."""
        with torch.no_grad():
            works = [dist.broadcast(t.data, self._src(), group=self.group, async_op=True)
                     for t in tensors]
            for w in works:
                w.wait()

    def broadcast_int(self, value: int, device: torch.device) -> int:
        """Rank 0's ``value``."""
        t = torch.tensor([value], dtype=torch.int64, device=device)
        self.broadcast_([t])
        return int(t.item())

    def mean_(self, t: Tensor) -> Tensor:
        """Average ``t`` over ranks, in place (sum, then divide: gloo has no average)."""
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t.div_(self.world_size)

    def average_grads(self, params: Sequence[Tensor], ok: bool) -> bool:
        """Average ``params``' gradients over ranks (a missing gradient counts as zeros) and
        agree whether every rank had a batch (``ok``); returns that agreement.

        One asynchronous all-reduce per tensor, waited for together; the flag rides along.
        """
        device = params[0].device if params else torch.device("cpu")
        flag = torch.tensor([1.0 if ok else 0.0], device=device)
        works = [dist.all_reduce(flag, group=self.group, async_op=True)]
        grads = []
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
            works.append(dist.all_reduce(p.grad, group=self.group, async_op=True))
        for w in works:
            w.wait()
        everyone = int(round(flag.item())) == self.world_size
        if everyone:
            torch._foreach_div_(grads, float(self.world_size))
        return everyone

    @torch.no_grad()
    def check_same(self, tensors: Sequence[Tensor], what: str = "mask logits") -> None:
        """Raise :class:`InterpError` unless ``tensors`` are identical on every rank.

        Compares a float64 fingerprint per tensor (sum, sum of squares, min, max), so the
        cost is a pass over the tensors and two small all-reduces.
        """
        if not tensors:
            return
        rows = []
        for t in tensors:
            x = t.detach().flatten().double()
            if not x.numel():
                x = x.new_zeros(1)
            rows.append(torch.stack([x.sum(), (x * x).sum(), x.min(), x.max()]))
        fp = torch.stack(rows)
        lo, hi = fp.clone(), fp.clone()
        dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=self.group)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=self.group)
        bad = (lo != hi).any(1).nonzero().flatten().tolist()
        if bad:
            raise InterpError(
                f"The {what} differ between ranks (tensor {bad[0]} of {len(tensors)}, and "
                f"{len(bad) - 1} more). Every rank must start from the same model and call "
                "the same code in the same order; check that no rank skipped a step.")
