"""Training a mask set for an objective: ``fit_masks``.

The recipe follows the bigram-subnetwork paper (Chang & Bergen 2025): AdamW on the mask
logits only (torch defaults, so weight decay 0.01), base weights frozen,

    loss = objective(model, batch) + lam * maskset.penalty() / maskset.n_weights,

the mask kind's schedule advanced after every optimizer step, and two safeguards:

- stopping rule: stop once undecided masks (0.1 <= soft mask <= 0.9) number fewer than 1% of
  the masks above 0.9 (a smaller subnetwork tolerates fewer undecided weights);
- spike rule: a task loss that jumps by +0.25 nats or x1.25 over the mean of the previous 10
  steps and does not get back to that mean at least 100 steps before the end marks the run as
  unstable; ``spike_retries`` reruns it from the initial logits with a new seed.

``dtype`` runs the model under ``torch.autocast`` (bfloat16 / float16) while the logits, their
gradients and AdamW's state stay float32; ``distributed=True`` trains data-parallel over a
``torch.distributed`` process group (:mod:`interp.distributed`). docs/scale.md has both.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

from interp.errors import InterpError, check_number
from interp.masks.fast import execution_path
from interp.models.lm import autocast, dtype_name, grad_scaler, resolve_device, resolve_dtype
from interp.numerics import no_denormals
from interp.results import Result, bulky

__all__ = ["FitResult", "find_loss_spike", "fit_masks", "undecided_fraction"]

log = logging.getLogger(__name__)

Objective = Callable[[Any, Any], Tensor]


@dataclass(repr=False)
class FitResult(Result):
    """What :func:`fit_masks` did.

    Attributes:
        history: one dict per optimizer step of the final attempt: ``step, loss, task_loss,
            penalty, active_fraction, undecided, temperature, elapsed`` (``elapsed``: seconds
            since the attempt started, measured at the mask-statistics check that closed the
            step's group, so late steps can be timed against early ones).
        steps: optimizer steps taken in the final attempt.
        stopped_reason: ``"stop_rule"``, ``"max_steps"`` or ``"data_exhausted"``.
        spike: True if the final attempt's task loss spiked without recovering (see
            :func:`find_loss_spike`); ``spike_step`` is where.
        attempts: runs made (1 + retries used).
        seconds: wall time of all attempts.
        dtype: the model's compute dtype (``"float32"``, or the autocast dtype).
        world_size: processes that trained the masks together (1 without ``distributed``).
    """

    history: list[dict[str, float]] = bulky(list)
    steps: int = 0
    stopped_reason: str = "max_steps"
    spike: bool = False
    spike_step: int | None = None
    attempts: int = 1
    seed: int = 0
    seconds: float = 0.0
    dtype: str = "float32"
    world_size: int = 1

    @property
    def final(self) -> dict[str, float]:
        """The last history record (empty if no step was taken)."""
        return self.history[-1] if self.history else {}

    def summary_rows(self) -> list[tuple[str, Any]]:
        final = self.final
        return super().summary_rows() + [
            (k, final[k]) for k in ("task_loss", "active_fraction", "temperature") if k in final]


# --------------------------------------------------------------------------- rules


def undecided_fraction(n_undecided: int, n_above: int) -> float:
    """Undecided masks per mask above 0.9 (the stopping rule compares this with 0.01)."""
    return n_undecided / n_above if n_above else math.inf


def find_loss_spike(
    losses: Sequence[float],
    *,
    add: float = 0.25,
    mult: float = 1.25,
    window: int = 10,
    margin: int = 100,
) -> int | None:
    """First step whose loss spiked and did not recover in time, or None if the run is stable.

    A spike is a loss above ``mean(previous window) + add`` or ``mean * mult`` (the latter for
    positive means only; the rule is meant for cross-entropies). It is harmless
    if the loss gets back to that mean at least ``margin`` steps before the end; a spike in
    the last ``margin`` steps can not recover in time and always counts.
    """
    n = len(losses)
    prev: list[float] = []
    for i, loss in enumerate(losses):
        if prev:
            ref = sum(prev) / len(prev)
            spiked = loss > ref + add or (ref > 0 and loss > ref * mult)
            if spiked and (i >= n - margin or min(losses[i : n - margin]) > ref):
                return i
        prev.append(loss)
        if len(prev) > window:
            prev.pop(0)
    return None


# --------------------------------------------------------------------------- helpers


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _batch_stream(batches: Iterable | Callable[[int], Iterable], seed: int) -> Iterator:
    """Endless stream over re-iterable batches (epochs); one pass over a one-shot iterator.

    A callable is called with the attempt's seed, so retries can reshuffle.
    """
    src = batches(seed) if callable(batches) else batches
    if iter(src) is src:  # one-shot iterator: consume it, never restart
        return src
    return itertools.chain.from_iterable(itertools.repeat(src))


@torch.no_grad()
def _mask_stats(maskset, sync=None) -> tuple[int, int, int]:
    """(kept by the hard mask, keep probability > 0.9, in [0.1, 0.9]) over maskable weights.

    For continuous sparsification the keep probability is the soft mask, as in the paper;
    exact-zero weights are not counted.
    Counts stay on the device until one final transfer; with ``sync`` (a
    :class:`~interp.distributed.GradSync`) rank 0's counts decide on every rank.
    """
    kind, allowed = maskset.kind, maskset.allowed
    counts = []
    for name, logits in maskset.logits.items():
        logits, ok = logits.detach(), allowed[name]
        soft = kind.keep_probability(logits)
        counts.append(torch.stack([
            (kind.hard(logits) & ok).sum(),
            ((soft > 0.9) & ok).sum(),
            ((soft >= 0.1) & (soft <= 0.9) & ok).sum(),
        ]))
    total = torch.stack(counts).sum(0)
    if sync is not None:
        sync.broadcast_([total])
    active, above, undecided = total.tolist()
    return active, above, undecided


def _decided(undecided: int, above: int, ratio: float) -> bool:
    """The paper's stopping rule, plus: nothing undecided (e.g. every mask at 0) also stops."""
    return undecided < ratio * above or undecided == 0


def _freeze(model, keep: set[int]) -> dict[int, bool]:
    """Turn off requires_grad on every model tensor except ``keep``; return the old flags."""
    old = {}
    for p in model.parameters():
        if id(p) not in keep:
            old[id(p)] = p.requires_grad
            p.requires_grad_(False)
    return old


def _unfreeze(model, old: dict[int, bool]) -> None:
    for p in model.parameters():
        if id(p) in old:
            p.requires_grad_(old[id(p)])


def _adamw(params: list[Tensor], lr: float) -> torch.optim.AdamW:
    """torch's AdamW with its defaults (weight decay 0.01), fused where the device allows:
    the same update, several times faster than the per-tensor loop on CPU."""
    try:
        return torch.optim.AdamW(params, lr=lr, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(params, lr=lr)


# --------------------------------------------------------------------------- one attempt


@dataclass
class _Attempt:
    history: list[dict[str, float]]
    steps: int
    stopped_reason: str


@dataclass
class _Exec:
    """How steps run: the autocast dtype, float16's loss scaler, the ranks' collectives."""

    compute: torch.dtype = torch.float32
    scaler: Any = None  # torch.amp.GradScaler for float16
    sync: Any = None  # interp.distributed.GradSync when distributed


def _run(
    model, maskset, objective: Objective, stream: Iterator, device: torch.device, *,
    lam: float, lr: float, max_steps: int, min_steps: int, accumulate: int, seed: int,
    stop_rule: bool, stop_ratio: float, check_every: int, progress: bool, desc: str,
    ex: _Exec | None = None,
) -> _Attempt:
    ex = ex or _Exec()
    ex.scaler = grad_scaler(device, ex.compute)  # fresh per attempt
    sync = ex.sync
    torch.manual_seed(seed)
    opt = _adamw(list(maskset.parameters()), lr=lr)
    n_weights = max(1, int(maskset.n_weights))
    history: list[dict[str, float]] = []
    # per step ([task, penalty] on the device, temperature); read back in one sync per check
    pending: list[tuple[Tensor, float]] = []
    reason = "max_steps"
    t0 = time.perf_counter()
    bar = tqdm(total=max_steps, desc=desc, disable=not progress, leave=False)
    for step in range(max_steps):
        out = _step(model, maskset, objective, stream, device, opt, lam, n_weights, accumulate,
                    ex)
        if out is None:
            reason = "data_exhausted"
            break
        maskset.kind.step()
        pending.append((out, maskset.kind.temperature))
        done = step + 1
        if done % check_every and done != max_steps:
            continue
        active, above, undecided = _mask_stats(maskset, sync)
        _flush(history, pending, lam, n_weights, active / n_weights, undecided / n_weights,
               time.perf_counter() - t0, sync)
        bar.update(len(pending))
        pending = []
        h = history[-1]
        bar.set_postfix(task=f"{h['task_loss']:.3f}", active=f"{h['active_fraction']:.3f}")
        if stop_rule and done >= min_steps and _decided(undecided, above, stop_ratio):
            reason = "stop_rule"
            break
    if pending:  # data ran out between checks (on every rank at once: they agree per step)
        active, _, undecided = _mask_stats(maskset, sync)
        _flush(history, pending, lam, n_weights, active / n_weights, undecided / n_weights,
               time.perf_counter() - t0, sync)
    bar.close()
    return _Attempt(history, len(history), reason)


def _flush(history, pending, lam, n_weights, active: float, undecided: float,
           elapsed: float, sync=None) -> None:
    """Append records for the pending steps; mask statistics are those of the latest check.
    With ``sync`` the losses are averaged over ranks first (the global batch's losses)."""
    values = torch.stack([v for v, _ in pending])
    if sync is not None:
        sync.mean_(values)
    values = values.tolist()
    for (task, pen), (_, temperature) in zip(values, pending):
        step = len(history) + 1
        if not (math.isfinite(task) and math.isfinite(pen)):
            raise InterpError(
                f"Mask training diverged at step {step} (task loss {task}, penalty {pen}). "
                "Lower lr or lam, or check the objective."
            )
        history.append({
            "step": step, "loss": task + lam * pen / n_weights, "task_loss": task,
            "penalty": pen, "active_fraction": active, "undecided": undecided,
            "temperature": temperature, "elapsed": round(elapsed, 4),
        })


def _step(model, maskset, objective, stream, device, opt, lam, n_weights, accumulate,
          ex: _Exec | None = None):
    """One optimizer step over ``accumulate`` micro-batches.

    The objective runs under autocast to ``ex.compute``; the penalty and the loss sum stay
    float32. Distributed, the gradients are averaged over ranks before the step, and every
    rank skips it if any rank ran out of batches.

    Returns the detached (mean task loss, penalty) as one tensor on the device (no sync),
    or None when the batches ran out.
    """
    ex = ex or _Exec()
    opt.zero_grad(set_to_none=True)
    task_sum = pen = None
    ran_out = False
    for _ in range(accumulate):
        try:
            batch = _to_device(next(stream), device)
        except StopIteration:
            ran_out = True
            break
        # each masked weight once per forward, each soft mask once for forward and penalty
        with parametrize.cached(), maskset.kind.reuse():
            with autocast(device, ex.compute):
                task = objective(model, batch)
            pen = maskset.penalty()
            loss = (task.float() + lam * pen / n_weights) / accumulate
            (loss if ex.scaler is None else ex.scaler.scale(loss)).backward()
        task = task.detach().float()
        task_sum = task if task_sum is None else task_sum + task
    if ex.sync is not None:
        if not ex.sync.average_grads(list(maskset.parameters()), ok=not ran_out):
            return None
    elif ran_out:
        return None
    if ex.scaler is None:
        opt.step()
    else:  # float16: unscales, skips the step on inf/nan gradients (alike on every rank)
        ex.scaler.step(opt)
        ex.scaler.update()
    return torch.stack([task_sum / accumulate, pen.detach().float()])


# --------------------------------------------------------------------------- public


def fit_masks(
    model,
    maskset,
    objective: Objective,
    batches: Iterable | Callable[[int], Iterable],
    *,
    lam: float = 1.0,
    lr: float = 0.05,
    max_steps: int = 1000,
    min_steps: int = 0,
    accumulate: int = 1,
    device: str | torch.device | None = None,
    seed: int = 0,
    stop_rule: bool = True,
    stop_ratio: float = 0.01,
    check_every: int = 10,
    spike_retries: int = 0,
    progress: bool = True,
    flush_denormals: bool = True,
    dtype: str | torch.dtype | None = None,
    distributed: bool = False,
    path: str = "bridge",
) -> FitResult:
    """Train ``maskset``'s logits so the masked ``model`` minimises ``objective`` plus sparsity.

    Args:
        model: the model the mask set belongs to; its weights are frozen during the fit and
            their ``requires_grad`` flags restored after.
        maskset: a :class:`~interp.masks.MaskSet`. Attached in ``"soft"`` mode if it is not
            attached yet (and detached again at the end); otherwise its mode is restored.
        objective: ``objective(model, batch) -> scalar`` task loss (no penalty).
        batches: an iterable of batches (re-iterables are cycled, one-shot iterators end the
            fit when exhausted) or ``batches(seed) -> iterable`` so retries reshuffle.
        lam: weight of the mean expected mask (``penalty / n_weights``).
        lr: AdamW learning rate on the logits (weight decay stays at torch's 0.01).
        max_steps, min_steps: bounds on optimizer steps; the stopping rule acts only after
            ``min_steps``.
        accumulate: micro-batches per optimizer step.
        device: where to train; the model and mask set are moved there.
        seed: seeds torch (hard-concrete sampling); attempt ``k`` uses ``seed + k``.
        stop_rule: stop once undecided masks < ``stop_ratio`` x masks above 0.9, checked
            every ``check_every`` steps.
        spike_retries: reruns (from the initial logits and schedule, with a new seed) when the
            task loss spikes without recovering; the result says if the last run spiked.
        progress: show a tqdm bar.
        flush_denormals: flush subnormal floats to zero during the fit (see
            :mod:`interp.numerics`; the caller's setting is restored). Turn off only to
            measure what it saves.
        dtype: the model's compute dtype: ``None``/``"float32"``, ``"bfloat16"`` or
            ``"float16"`` (GPU only; adds loss scaling). The objective runs under
            ``torch.autocast``; mask logits, their gradients, the penalty and AdamW's state
            stay float32, and the model's weights are not cast (restored exactly).
        distributed: train data-parallel over the ``torch.distributed`` process group
            (:func:`interp.distributed.init`): ``batches`` are this rank's shards
            (:func:`interp.distributed.shard_batches`), gradients are averaged over ranks,
            the seed and initial logits come from rank 0, and every rank ends with the same
            masks and history. Only rank 0 shows progress and logs warnings.
        path: ``"bridge"`` runs the objective on ``model`` (hooks fire); ``"hf"`` on the
            hook-free wrapped module of a ``TransformerBridge`` over the same masked
            weights, with SDPA attention (:func:`interp.masks.fast.unwrap`; its logits are
            checked against the bridge's first). Hooks and caches of ``model`` stay intact.
    """
    for name, value in (("max_steps", max_steps), ("accumulate", accumulate),
                        ("check_every", check_every)):
        check_number(name, value, low=1, integer=True)
    check_number("min_steps", min_steps, low=0, integer=True)
    check_number("spike_retries", spike_retries, low=0, integer=True)
    check_number("lr", lr, low=0, low_open=True)
    check_number("lam", lam, low=0)
    check_number("stop_ratio", stop_ratio, low=0, low_open=True)
    dev = resolve_device(model, device)
    ex = _Exec(compute=resolve_dtype(dtype, dev))
    if distributed:
        from interp.distributed import GradSync

        ex.sync = GradSync()
        progress = progress and ex.sync.is_main
    if next(model.parameters()).device != dev:
        model.to(dev)
    maskset.to(dev)
    if ex.sync is not None:  # one start on every rank: rank 0's logits and seed
        ex.sync.broadcast_(list(maskset.parameters()))
        seed = ex.sync.broadcast_int(seed, dev)
    # a copy of the starting logits only when a retry may need it (it costs a mask set)
    init_logits = [p.detach().clone() for p in maskset.parameters()] if spike_retries else []
    init_kind = maskset.kind.config()
    t0 = time.perf_counter()
    with _fitting(model, maskset), no_denormals(flush_denormals):
        runner = execution_path(model, path)  # the model, or its hook-free HF module
        for attempt in range(spike_retries + 1):
            if attempt:
                _reset(maskset, init_logits, init_kind)
            s = seed + attempt
            run = _run(
                runner, maskset, objective, _batch_stream(batches, s), dev,
                lam=lam, lr=lr, max_steps=max_steps, min_steps=min_steps,
                accumulate=accumulate, seed=s, stop_rule=stop_rule, stop_ratio=stop_ratio,
                check_every=check_every, progress=progress,
                desc="fit masks" if not attempt else f"fit masks (retry {attempt})", ex=ex,
            )
            spike = find_loss_spike([h["task_loss"] for h in run.history])
            if spike is None:
                break
            if ex.sync is None or ex.sync.is_main:
                log.warning("task loss spiked at step %d (attempt %d of %d)", spike + 1,
                            attempt + 1, spike_retries + 1)
    if ex.sync is not None:
        ex.sync.check_same(list(maskset.parameters()))
    return FitResult(
        history=run.history, steps=run.steps, stopped_reason=run.stopped_reason,
        spike=spike is not None, spike_step=None if spike is None else spike + 1,
        attempts=attempt + 1, seed=s, seconds=time.perf_counter() - t0,
        dtype=dtype_name(ex.compute), world_size=1 if ex.sync is None else ex.sync.world_size,
    )


def _reset(maskset, init_logits: list[Tensor], init_kind: dict) -> None:
    """Restore the logits and the kind's schedule to where the fit started."""
    with torch.no_grad():
        for p, v in zip(maskset.parameters(), init_logits):
            p.copy_(v)
    maskset.kind.restore(init_kind)


def _drop_graphs(model) -> None:
    """Detach tensors that modules kept from the last forward pass (TransformerLens attention
    keeps its ``_pattern``): their autograd graphs would keep the mask set alive."""
    for module in model.modules():
        for name, value in list(vars(module).items()):
            if isinstance(value, torch.Tensor) and value.grad_fn is not None:
                setattr(module, name, value.detach())


class _fitting:
    """Context: freeze the model, eval mode (no dropout), mask set attached in soft mode."""

    def __init__(self, model, maskset):
        self.model, self.ms = model, maskset

    def __enter__(self):
        ms, model = self.ms, self.model
        self.was_attached = bool(ms.attached)
        self.old_mode = ms.mode
        if not self.was_attached:
            ms.attach(model)
        ms.mode = "soft"
        self.model_training = model.training
        self.kind_training = ms.kind.training
        model.eval()
        ms.kind.train(True)
        keep = {id(p) for p in ms.parameters()}
        self.flags = _freeze(model, keep)
        for p in ms.parameters():
            p.requires_grad_(True)
        return self

    def __exit__(self, *exc):
        ms, model = self.ms, self.model
        _drop_graphs(model)
        _unfreeze(model, self.flags)
        model.train(self.model_training)
        ms.kind.train(self.kind_training)
        ms.mode = self.old_mode
        if not self.was_attached:
            ms.detach()
        return False
