"""Training and evaluation of pixel models (bits/dim), with checkpoints and resume."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from typing import Literal

import torch
from jaxtyping import Float, UInt8
from torch import Tensor
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from interp.errors import ConfigError, DataError, check_number
from interp.numerics import no_denormals
from interp.results import Result, bulky

log = logging.getLogger(__name__)


@dataclass
class PixelTrainConfig:
    """Adam with a one-cycle schedule (or a constant rate), random horizontal flips.

    Batches are a deterministic function of ``(seed, step)``, so a run resumed from its
    checkpoint store ends with the same weights as an uninterrupted one. ``ema_decay`` > 0
    keeps an exponential moving average of the weights (Polyak averaging, with which
    PixelCNN++ is evaluated) and ends training with the averaged weights: it damps the
    last steps' gradient noise, which otherwise decides how a model extrapolates.
    """

    steps: int = 1000
    batch_size: int = 32
    lr: float = 1e-2
    schedule: Literal["onecycle", "constant"] = "onecycle"
    warmup_fraction: float = 0.25
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.0
    flip: bool = True
    seed: int = 0
    eval_every: int = 250
    checkpoint_every: int = 250

    def validate(self) -> PixelTrainConfig:
        for name in ("steps", "batch_size", "eval_every", "checkpoint_every"):
            check_number(name, getattr(self, name), low=1, integer=True)
        check_number("seed", self.seed, low=0, integer=True)
        check_number("lr", self.lr, low=0, low_open=True)
        check_number("warmup_fraction", self.warmup_fraction, low=0, high=1, high_open=True)
        check_number("weight_decay", self.weight_decay, low=0)
        check_number("grad_clip", self.grad_clip, low=0, low_open=True)
        check_number("ema_decay", self.ema_decay, low=0, high=1, high_open=True)
        if self.schedule not in ("onecycle", "constant"):
            raise ConfigError(f"schedule={self.schedule!r}: use 'onecycle' or 'constant'.")
        return self

    def lr_at(self, step: int) -> float:
        if self.schedule == "constant":
            return self.lr
        warm = max(1, int(self.warmup_fraction * self.steps))
        if step < warm:
            return self.lr * (0.04 + 0.96 * step / warm)
        progress = (step - warm) / max(1, self.steps - warm)
        return self.lr * (1e-3 + (1 - 1e-3) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


@dataclass(repr=False)
class PixelTrainResult(Result):
    """What :func:`train_pixel_model` measured (bits per subpixel)."""

    steps: int
    final_train_bpd: float
    val_bpd: float
    history: list[dict] = bulky(list)
    seconds: float = 0.0
    steps_per_second: float = 0.0
    resumed_from: int | None = None
    epochs: float = 0.0


def check_images(images: Tensor, what: str = "images") -> Tensor:
    """Images must be a uint8 ``[N, C, H, W]`` tensor with at least one image."""
    if not torch.is_tensor(images) or images.dtype != torch.uint8 or images.ndim != 4:
        shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
        dtype = images.dtype if torch.is_tensor(images) else ""
        raise DataError(f"{what} must be a uint8 tensor [N, C, H, W], got {shape} {dtype}. "
                        "Convert with torch.as_tensor(array, dtype=torch.uint8) and add the "
                        "channel axis (images[:, None] for grayscale).")
    if images.shape[0] == 0:
        raise DataError(f"{what} is empty: pass at least one image.")
    return images


def batch_at(images: UInt8[Tensor, "n c h w"], step: int, cfg: PixelTrainConfig
             ) -> UInt8[Tensor, "batch c h w"]:
    """The training batch of ``step``: random images, each flipped with probability 1/2."""
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    idx = torch.randint(images.shape[0], (cfg.batch_size,), generator=gen)
    batch = images[idx]
    if cfg.flip:
        flip = torch.rand(cfg.batch_size, generator=gen) < 0.5
        batch = torch.where(flip[:, None, None, None], batch.flip(-1), batch)
    return batch


@torch.no_grad()
def _copy_weights(src, dst) -> None:
    for a, b in zip(src.parameters(), dst.parameters(), strict=True):
        b.copy_(a)


@torch.no_grad()
def evaluate_bpd(model, images: UInt8[Tensor, "n c h w"], *, batch_size: int = 256,
                 device: str | torch.device | None = None) -> Float[Tensor, " n"]:
    """Per-image bits per subpixel (on the CPU), in batches, in eval mode."""
    check_images(images)
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    was = model.training
    model.eval()
    out = [model.bits_per_dim(images[i:i + batch_size].to(dev)).float().cpu()
           for i in range(0, images.shape[0], batch_size)]
    model.train(was)
    return torch.cat(out)


def train_pixel_model(
    model,
    train: UInt8[Tensor, "n c h w"],
    val: UInt8[Tensor, "m c h w"] | None = None,
    config: PixelTrainConfig | None = None,
    *,
    store=None,
    device: str | torch.device | None = None,
    progress: bool = True,
    stop_after: int | None = None,
    desc: str = "train pixel model",
) -> PixelTrainResult:
    """Train a pixel model in place to minimise bits/dim; with a ``store``, checkpoint every
    ``checkpoint_every`` steps and resume from the latest one. ``stop_after`` ends the run
    early after that many steps (to simulate an interruption)."""
    cfg = (config or PixelTrainConfig()).validate()
    check_images(train, "training images")
    if val is not None:
        check_images(val, "validation images")
    if train.shape[1] != model.config.channels:
        raise DataError(f"The images have {train.shape[1]} channels but the model expects "
                        f"{model.config.channels}. Build the model with channels="
                        f"{train.shape[1]}.")
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    average = (AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay))
               if cfg.ema_decay else None)
    start, history, resumed = 0, [], None
    if store is not None and store.latest_step() is not None:
        ckpt = store.load(store.latest_step(), model=model, optimizer=opt, average=average,
                          device=dev)
        start = resumed = ckpt.step
        history = list(ckpt.metadata.get("history", []))
        log.info("resuming pixel training from step %d", start)
    end = cfg.steps if stop_after is None else min(cfg.steps, start + stop_after)
    epochs = cfg.steps * cfg.batch_size / train.shape[0]
    loss_val, val_bpd = (history[-1]["train_bpd"] if history else math.nan), math.nan
    t0 = time.perf_counter()
    model.train()
    bar = tqdm(range(start, end), desc=desc, disable=not progress, initial=start,
               total=cfg.steps)
    with no_denormals():
        for step in bar:
            for g in opt.param_groups:
                g["lr"] = cfg.lr_at(step)
            loss = model.loss(batch_at(train, step, cfg).to(dev))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            done = step + 1
            if average is not None:
                average.update_parameters(model)
                if done == cfg.steps:  # the run ends with the averaged weights
                    _copy_weights(average.module, model)
            loss_val = loss.item()
            if not math.isfinite(loss_val):
                raise DataError(f"Training diverged at step {step + 1} (loss {loss_val}). "
                                "Lower the learning rate (lr) or the gradient clip.")
            record = {"step": done, "train_bpd": loss_val, "lr": cfg.lr_at(step)}
            if val is not None and (done % cfg.eval_every == 0 or done == cfg.steps):
                val_bpd = float(evaluate_bpd(model, val, device=dev).mean())
                record["val_bpd"] = val_bpd
                model.train()
                bar.set_postfix(bpd=f"{loss_val:.3f}", val=f"{val_bpd:.3f}")
            history.append(record)
            if store is not None and (done % cfg.checkpoint_every == 0 or done == cfg.steps):
                store.save(model, done, optimizer=opt, average=average,
                           metadata={"val_bpd": record.get("val_bpd"),
                                     "train_config": asdict(cfg), "history": history})
    seconds = time.perf_counter() - t0
    model.eval()
    if val is not None and math.isnan(val_bpd):
        val_bpd = float(evaluate_bpd(model, val, device=dev).mean())
    n = end - start
    return PixelTrainResult(end, loss_val, val_bpd, history, seconds,
                            n / seconds if seconds > 0 else 0.0, resumed, epochs)
