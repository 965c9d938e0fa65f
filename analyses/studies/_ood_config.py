"""The image-likelihood study's configuration (a leaf: imports no study code)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from interp.data.images import BUILTIN_IMAGE_SETS as BUILTIN_IMAGES
from interp.errors import ConfigError, check_number, suggest
from interp.models.pixel import HEADS, PixelConfig
from interp.models.pixel_train import PixelTrainConfig

#: Colour channels of the built-in image sets (the others are grayscale).
SET_CHANNELS = {"patches_rgb": 3}

#: Fields that do not change results: a rerun may differ in them.
VOLATILE = frozenset({"out", "device", "workers"})


@dataclass
class OODStudyConfig:
    """Everything that defines a run of ``interp ood``; the run directory is tied to it.

    The default pair reproduces the known likelihood failure: models trained on natural-photo
    patches (``patches``) give MNIST digits (``mnist``) a higher likelihood. The full model is
    warm-started from the local one (a zero-initialised non-local correction), so
    ``log p_full - log p_local`` is what the non-local past adds.
    """

    out: str = "runs/ood"
    in_data: str = "patches"
    out_data: str = "mnist"
    n_train: int = 20_000
    n_test: int = 1000
    seeds: tuple[int, ...] = (0, 1, 2)
    device: str = "cpu"
    #: processes training the seeds' models and the compression model side by side
    #: (0: one per CPU core; always 1 on an accelerator)
    workers: int = 0
    # local model (NeLLoC-style)
    horizon: int = 3
    hidden: int = 32
    blocks: int = 1
    head: str = "logistic"
    mixtures: int = 5
    local_steps: int = 1000
    local_batch: int = 32
    local_lr: float = 1e-2
    # full model (gated stacks over the whole causal past, warm-started from the local one)
    stack_channels: int = 16
    dilations: tuple[int, ...] = (1, 2, 4, 8, 16)
    full_steps: int = 500
    full_batch: int = 16
    full_lr: float = 3e-3
    #: the full model ends with its weights' moving average (0: off). Without it the
    #: non-local AUROC ranged 0.06-1.0 by seed and thread count; see docs/ood-study.md
    full_ema: float = 0.995
    # scores
    typicality_batch: int = 10
    # compression: a local model trained on the compression set's training split
    compress_data: str = "mnist"
    compress_head: str = "categorical"
    compress_train: int = 4000
    compress_test: int = 1000
    compress_steps: int = 1000
    # the local subnetwork inside the full model
    subnetwork: bool = True
    mask_steps: int = 150
    mask_batch: int = 8
    mask_lr: float = 0.05
    mask_lambda: float = 1.0
    temperature_factor: float = 1.02
    quick: bool = False

    @classmethod
    def quick_defaults(cls, **overrides) -> OODStudyConfig:
        """The ``--quick`` run: the same pipeline, smaller (CI-sized)."""
        base = dict(n_train=2000, n_test=200, seeds=(0,), local_steps=150, full_steps=60,
                    full_ema=0.95,  # an averaging window of ~20 of the 60 steps
                    compress_train=500, compress_test=40, compress_steps=150, mask_steps=30,
                    hidden=16, stack_channels=8, quick=True)
        return cls(**{**base, **overrides}).validate()

    def validate(self) -> OODStudyConfig:
        """Raise ConfigError for a value that makes no sense, before any work."""
        for name in ("in_data", "out_data", "compress_data"):
            value = getattr(self, name)
            if value not in BUILTIN_IMAGES:
                raise ConfigError(f"Unknown image set {value!r} for {name}; built-in sets are "
                                  f"{sorted(BUILTIN_IMAGES)}.{suggest(value, BUILTIN_IMAGES)}")
        channels = {n: SET_CHANNELS.get(getattr(self, n), 1) for n in ("in_data", "out_data")}
        if channels["in_data"] != channels["out_data"]:
            raise ConfigError(
                f"in_data {self.in_data!r} has {channels['in_data']} channel(s) but out_data "
                f"{self.out_data!r} has {channels['out_data']}: pick sets with the same channels.")
        if self.hidden % channels["in_data"]:
            raise ConfigError(
                f"{self.in_data!r} has {channels['in_data']} colour channels, so hidden "
                f"({self.hidden}) must be a multiple of {channels['in_data']}; pass e.g. --hidden "
                f"{self.hidden + channels['in_data'] - self.hidden % channels['in_data']}.")
        if self.in_data == self.out_data:
            raise ConfigError(f"in_data and out_data are both {self.in_data!r}: pick two "
                              "different image sets.")
        if self.compress_head not in HEADS:
            raise ConfigError(f"compress_head {self.compress_head!r} is unknown; use one of "
                              f"{', '.join(HEADS)}.{suggest(self.compress_head, HEADS)}")
        for name in ("n_train", "n_test", "local_steps", "local_batch", "full_steps",
                     "full_batch", "compress_train", "compress_test", "compress_steps",
                     "mask_steps", "mask_batch"):
            check_number(name, getattr(self, name), low=1, integer=True)
        check_number("typicality_batch", self.typicality_batch, low=2, integer=True)
        check_number("workers", self.workers, low=0, integer=True)
        check_number("typicality_batch", self.typicality_batch, high=self.n_test)
        for lr in ("local_lr", "full_lr", "mask_lr"):
            check_number(lr, getattr(self, lr), low=0, low_open=True)
        check_number("full_ema", self.full_ema, low=0, high=1, high_open=True)
        check_number("mask_lambda", self.mask_lambda, low=0)
        check_number("temperature_factor", self.temperature_factor, low=1)
        if not self.seeds:
            raise ConfigError("seeds is empty: give at least one seed, e.g. 0,1,2.")
        for s in self.seeds:
            check_number("every seed", s, low=0, integer=True)
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds has duplicates: {list(self.seeds)}; give each once.")
        self.seeds = tuple(int(s) for s in self.seeds)
        self.dilations = tuple(int(d) for d in self.dilations)
        self.pixel_config("local")  # architecture checks (horizon, hidden, head, ...)
        return self

    def pixel_config(self, kind: str, head: str | None = None) -> PixelConfig:
        return PixelConfig(kind=kind, channels=SET_CHANNELS.get(self.in_data, 1),
                           horizon=self.horizon, hidden=self.hidden, blocks=self.blocks,
                           head=head or self.head, mixtures=self.mixtures,
                           stack_channels=self.stack_channels,
                           dilations=self.dilations).validate()

    def local_training(self, seed: int) -> PixelTrainConfig:
        return PixelTrainConfig(steps=self.local_steps, batch_size=self.local_batch,
                                lr=self.local_lr, seed=seed, eval_every=self.local_steps,
                                checkpoint_every=max(1, self.local_steps // 4)).validate()

    def full_training(self, seed: int) -> PixelTrainConfig:
        return PixelTrainConfig(steps=self.full_steps, batch_size=self.full_batch,
                                lr=self.full_lr, ema_decay=self.full_ema, seed=seed,
                                eval_every=self.full_steps,
                                checkpoint_every=max(1, self.full_steps // 4)).validate()

    def compress_training(self) -> PixelTrainConfig:
        return PixelTrainConfig(steps=self.compress_steps, batch_size=self.local_batch,
                                lr=self.local_lr, seed=0, flip=False,
                                eval_every=self.compress_steps,
                                checkpoint_every=max(1, self.compress_steps // 4)).validate()

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items()}

    def diff(self, stored: dict) -> list[str]:
        """Fields (besides volatile ones) in which ``stored`` (a config.json) differs."""
        new = self.to_dict()
        return sorted(k for k in set(stored) | set(new)
                      if k not in VOLATILE and stored.get(k) != new.get(k))
