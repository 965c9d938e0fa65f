"""Small image classifiers as ``HookedRootModule``s, and their training loop.

Two families, built from a :class:`ClassifierConfig`:

- :class:`CNNClassifier` (teachers): blocks of conv3x3 -> ReLU -> maxpool 2x2, then flatten ->
  linear ``hidden`` -> ReLU -> ``hook_features`` -> linear to ``n_classes``.
- :class:`MLPClassifier` (students): flatten -> (linear -> ReLU) per hidden width; the last
  hidden layer's output is ``hook_features`` -> linear to ``n_classes``.

Hook points: ``blocks.{i}.hook_out`` after every block and ``hook_features`` on the
penultimate features (the representation the information-bottleneck analysis reads), so
``run_with_cache``, ``run_with_hooks`` and probes work as on the LMs.

Inputs are ``[N, C, H, W]`` images, ``uint8`` (0-255, scaled to [0, 1] by the model itself, so
datasets can stay in the 4x smaller integer form on the device) or float (used as they
are). :class:`MLPClassifier` also takes flattened ``[N, in_features]`` inputs.

:func:`train_classifier` trains either family with SGD + momentum and a step schedule
(``MultiStepLR``), checkpoints every ``checkpoint_every`` epochs into a
:class:`~interp.models.checkpoints.CheckpointStore` (store step = epoch) and resumes from its
latest checkpoint with the same final weights as an uninterrupted run. Its ``loss_fn`` lets
distillation (:func:`interp.distill.distill_classifier`) reuse the loop.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int, Shaped
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformer_lens import HookedRootModule
from transformer_lens.hook_points import HookPoint

from interp.errors import ConfigError, DataError, check_number, suggest
from interp.models.lm import resolve_device
from interp.numerics import no_denormals
from interp.results import Result, bulky

__all__ = [
    "CNNClassifier",
    "ClassifierConfig",
    "ClassifierTrainConfig",
    "ClassifierTrainResult",
    "MLPClassifier",
    "accuracy",
    "build",
    "predict_logits",
    "train_classifier",
]

log = logging.getLogger(__name__)

Images = Shaped[Tensor, "batch *shape"]
Logits = Float[Tensor, "batch n_classes"]
Labels = Int[Tensor, " batch"]
LossFn = Callable[..., Tensor]


def _as_float(x: Tensor) -> Tensor:
    """uint8 images scaled to [0, 1]; float inputs as they are."""
    if x.dtype == torch.uint8:
        return x.float() / 255.0
    if x.is_floating_point():
        return x
    raise DataError(f"Images must be uint8 (0-255) or float, got dtype {x.dtype}. Convert them "
                    "with images.to(torch.uint8) (pixel values) or images.float() (already "
                    "scaled).")


class _Block(nn.Module):
    """One stage whose output passes through ``hook_out``."""

    def __init__(self, *layers: nn.Module):
        super().__init__()
        self.layers = nn.Sequential(*layers)
        self.hook_out = HookPoint()

    def forward(self, x: Tensor) -> Tensor:
        return self.hook_out(self.layers(x))


class CNNClassifier(HookedRootModule):
    """Conv3x3-ReLU-maxpool blocks, a hidden linear layer (``hook_features``), a linear head.

    Args:
        channels: output channels of each conv block (each halves the image side).
        hidden: width of the penultimate features.
        in_channels, image_size: input images are ``[N, in_channels, image_size, image_size]``.
        n_classes: number of logits.
    """

    def __init__(self, channels: Sequence[int] = (16, 32), hidden: int = 128,
                 in_channels: int = 1, image_size: int = 28, n_classes: int = 10):
        super().__init__()
        channels = tuple(int(c) for c in channels)
        for c in channels:
            check_number("channels", c, low=1, integer=True)
        check_number("hidden", hidden, low=1, integer=True)
        check_number("in_channels", in_channels, low=1, integer=True)
        check_number("image_size", image_size, low=1, integer=True)
        check_number("n_classes", n_classes, low=2, integer=True)
        side = image_size
        for _ in channels:
            side //= 2
        if side < 1:
            raise ConfigError(
                f"{len(channels)} conv blocks halve a {image_size}x{image_size} image to nothing; "
                f"use at most {int(math.log2(image_size))} blocks (fewer channels entries) or "
                "larger images.")
        self.in_channels, self.image_size = in_channels, image_size
        self.n_classes, self.d_features = n_classes, hidden
        blocks, prev = [], in_channels
        for c in channels:
            blocks.append(_Block(nn.Conv2d(prev, c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)))
            prev = c
        self.blocks = nn.ModuleList(blocks)
        self.fc = nn.Linear(prev * side * side, hidden)
        self.hook_features = HookPoint()
        self.head = nn.Linear(hidden, n_classes)
        self.config = ClassifierConfig("cnn", channels, hidden, in_channels, image_size,
                                       n_classes)
        self.setup()

    def forward(self, images: Images) -> Logits:
        x = _as_float(images)
        want = (self.in_channels, self.image_size, self.image_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != want:
            raise DataError(f"CNNClassifier expects images [N, {want[0]}, {want[1]}, {want[2]}], "
                            f"got {tuple(x.shape)}. Reshape them, or build the model for this "
                            "image size (ClassifierConfig in_channels / image_size).")
        for block in self.blocks:
            x = block(x)
        features = self.hook_features(F.relu(self.fc(x.flatten(1))))
        return self.head(features)


class MLPClassifier(HookedRootModule):
    """Flatten, then linear-ReLU layers; the last hidden layer is ``hook_features``.

    ``blocks.{i}.hook_out`` follows every hidden layer but the last. With ``hidden=()`` the
    model is a linear classifier and ``hook_features`` sees the flattened input.

    Args:
        hidden: widths of the hidden layers.
        in_features: inputs flatten to this many values (784 = 1 x 28 x 28).
        n_classes: number of logits.
    """

    def __init__(self, hidden: Sequence[int] = (32,), in_features: int = 784,
                 n_classes: int = 10):
        super().__init__()
        hidden = tuple(int(h) for h in hidden)
        for h in hidden:
            check_number("hidden", h, low=1, integer=True)
        check_number("in_features", in_features, low=1, integer=True)
        check_number("n_classes", n_classes, low=2, integer=True)
        self.in_features, self.n_classes = in_features, n_classes
        self.d_features = hidden[-1] if hidden else in_features
        widths = (in_features, *hidden)
        self.blocks = nn.ModuleList(_Block(nn.Linear(a, b), nn.ReLU())
                                    for a, b in zip(widths[:-2], widths[1:-1]))
        self.fc = nn.Linear(widths[-2], widths[-1]) if hidden else nn.Identity()
        self.hook_features = HookPoint()
        self.head = nn.Linear(self.d_features, n_classes)
        self.config = None  # set by build(); an MLP does not know its image shape
        self.setup()

    def forward(self, images: Images) -> Logits:
        x = _as_float(images).flatten(1)
        if x.shape[1] != self.in_features:
            raise DataError(f"MLPClassifier expects inputs of {self.in_features} values per "
                            f"example, got shape {tuple(images.shape)}. Build it with "
                            f"in_features={x.shape[1]}.")
        for block in self.blocks:
            x = block(x)
        if not isinstance(self.fc, nn.Identity):
            x = F.relu(self.fc(x))
        return self.head(self.hook_features(x))


_FAMILIES = ("cnn", "mlp")


@dataclass(frozen=True)
class ClassifierConfig:
    """Which classifier to build; JSON-able through :meth:`to_dict` (a store identity).

    ``channels`` is used by ``"cnn"`` only. ``hidden`` is the feature width of a CNN (an int)
    or the hidden widths of an MLP (an int means one layer). An MLP takes
    ``in_channels * image_size**2`` inputs.
    """

    family: Literal["cnn", "mlp"] = "cnn"
    channels: Sequence[int] = (16, 32)
    hidden: int | Sequence[int] = 128
    in_channels: int = 1
    image_size: int = 28
    n_classes: int = 10

    def __post_init__(self):
        if self.family not in _FAMILIES:
            raise ConfigError(f"Unknown classifier family {self.family!r}; families are "
                              f"{list(_FAMILIES)}.{suggest(str(self.family), _FAMILIES)}")
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        if not isinstance(self.hidden, int):
            object.__setattr__(self, "hidden", tuple(self.hidden))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["channels"] = list(self.channels)
        if isinstance(self.hidden, tuple):
            d["hidden"] = list(self.hidden)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClassifierConfig:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"Unknown ClassifierConfig entries {unknown}; valid ones are "
                              f"{sorted(names)}.{suggest(unknown[0], names)}")
        d = dict(data)
        if isinstance(d.get("hidden"), list):
            d["hidden"] = tuple(d["hidden"])
        return cls(**d)


def build(cfg: ClassifierConfig, *, seed: int | None = None,
          device: str | torch.device = "cpu") -> CNNClassifier | MLPClassifier:
    """A freshly initialised classifier of ``cfg`` (seeded when ``seed`` is given)."""
    if seed is not None:
        torch.manual_seed(seed)
    if cfg.family == "cnn":
        if not isinstance(cfg.hidden, int):
            if len(cfg.hidden) != 1:
                raise ConfigError(f"A CNN has one hidden (feature) width, got hidden="
                                  f"{cfg.hidden}. Pass an int.")
        hidden = cfg.hidden if isinstance(cfg.hidden, int) else cfg.hidden[0]
        model = CNNClassifier(cfg.channels, hidden, cfg.in_channels, cfg.image_size,
                              cfg.n_classes)
    else:
        hidden = (cfg.hidden,) if isinstance(cfg.hidden, int) else cfg.hidden
        model = MLPClassifier(hidden, cfg.in_channels * cfg.image_size ** 2, cfg.n_classes)
    model.config = cfg
    return model.to(device)


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def predict_logits(model: nn.Module, images: Images, *, batch_size: int = 1000,
                   device: str | torch.device | None = None) -> Logits:
    """Logits of ``model`` on ``images`` in eval mode, in batches, on the device they were
    computed on (the model's, unless ``device`` is given). The training flag is restored."""
    check_number("batch_size", batch_size, low=1, integer=True)
    device = resolve_device(model, device)
    was_training = model.training
    model.eval()
    try:
        out = [model(chunk.to(device)).float() for chunk in images.split(batch_size)]
    finally:
        model.train(was_training)
    if not out:
        raise DataError("No images to classify: pass a non-empty [N, ...] tensor.")
    return torch.cat(out)


def accuracy(model: nn.Module, images: Images, labels: Labels, *, batch_size: int = 1000,
             device: str | torch.device | None = None) -> float:
    """Fraction of ``images`` whose top logit is the label."""
    _check_pair(images, labels, "images")
    logits = predict_logits(model, images, batch_size=batch_size, device=device)
    return float((logits.argmax(-1).cpu() == labels.cpu()).float().mean())


def _check_pair(images: Tensor, labels: Tensor, what: str) -> None:
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"The {what} have {images.shape[0]} examples but {labels.shape[0]} "
                        "labels; pass one label per example.")


# --------------------------------------------------------------------------- training


@dataclass
class ClassifierTrainConfig:
    """Hyperparameters of :func:`train_classifier` (checked by :meth:`validate`).

    The learning rate is multiplied by ``gamma`` after each epoch count in ``milestones``.
    """

    epochs: int = 30
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    milestones: Sequence[int] = (15, 25)
    gamma: float = 0.1
    checkpoint_every: int = 1
    seed: int = 0
    nesterov: bool = False

    def validate(self) -> ClassifierTrainConfig:
        """Raise ConfigError for values that make no sense (before minutes of training)."""
        for name in ("epochs", "batch_size", "checkpoint_every"):
            check_number(name, getattr(self, name), low=1, integer=True)
        check_number("seed", self.seed, low=0, integer=True)
        check_number("lr", self.lr, low=0, low_open=True)
        check_number("momentum", self.momentum, low=0, high=1, high_open=True)
        check_number("weight_decay", self.weight_decay, low=0)
        check_number("gamma", self.gamma, low=0, high=1, low_open=True)
        self.milestones = tuple(self.milestones)
        for m in self.milestones:
            check_number("milestones", m, low=1, integer=True)
        if list(self.milestones) != sorted(set(self.milestones)):
            raise ConfigError(f"milestones must be strictly increasing epoch counts, got "
                              f"{self.milestones}. Sort them and drop repeats.")
        if self.nesterov and self.momentum == 0:
            raise ConfigError("nesterov=True needs momentum > 0; set momentum (e.g. 0.9) or "
                              "nesterov=False.")
        return self

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["milestones"] = list(self.milestones)
        return d


@dataclass(repr=False)
class ClassifierTrainResult(Result):
    """What :func:`train_classifier` measured (accuracies are fractions; NaN without ``val``).

    Attributes:
        train_accuracy: accuracy on the training batches of the last epoch (while training).
        resumed_from: the epoch of the checkpoint the run resumed from, or None.
    """

    epochs: int
    final_train_loss: float
    train_accuracy: float
    val_accuracy: float
    history: list[dict] = bulky(list)
    seconds: float = 0.0
    epochs_per_second: float = 0.0
    resumed_from: int | None = None


def _epoch_order(n: int, seed: int, epoch: int) -> Tensor:
    """The shuffle of epoch ``epoch`` (0-based): a function of (seed, epoch) only."""
    state = np.random.SeedSequence([seed, epoch]).generate_state(2, dtype=np.uint32)
    gen = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
    return torch.randperm(n, generator=gen)


def _cross_entropy(model: nn.Module, images: Tensor, labels: Tensor, *extras: Tensor) -> Tensor:
    return F.cross_entropy(model(images).float(), labels)


def train_classifier(
    model: nn.Module,
    train: tuple[Tensor, ...],
    val: tuple[Tensor, Tensor] | None = None,
    config: ClassifierTrainConfig | None = None,
    *,
    store=None,
    device: str | torch.device | None = None,
    progress: bool = True,
    stop_after_epochs: int | None = None,
    loss_fn: LossFn | None = None,
) -> ClassifierTrainResult:
    """Train ``model`` in place with SGD + momentum and a ``MultiStepLR`` schedule.

    Args:
        train: ``(images, labels)``, optionally followed by more per-example tensors (such as
            precomputed teacher logits) that are shuffled and batched with them.
        val: ``(images, labels)`` scored after every epoch, or None.
        store: a :class:`~interp.models.checkpoints.CheckpointStore`; the model, optimizer
            and schedule position are saved every ``checkpoint_every`` epochs and at the end
            (step = epoch, metadata: epoch, val_accuracy, history, train_config), and a run
            resumes from the store's latest checkpoint, ending with the same weights as an
            uninterrupted run.
        device: where to train (default: where the model is); the data moves there once.
        stop_after_epochs: end after that many epochs of this call (simulates an interruption).
        loss_fn: ``loss_fn(model, images, labels, *extras) -> scalar`` on one batch; default
            cross-entropy. :func:`interp.distill.distill_classifier` passes a KD loss.

    Batches are a deterministic function of (seed, epoch). The loop runs inside
    :func:`~interp.numerics.no_denormals`: weight decay drives the weights of always-zero
    border pixels into subnormal floats, which are 20-30x slower on CPUs.
    """
    cfg = (config or ClassifierTrainConfig()).validate()
    if stop_after_epochs is not None:
        check_number("stop_after_epochs", stop_after_epochs, low=1, integer=True)
    if len(train) < 2:
        raise DataError("train must be (images, labels[, extra per-example tensors...]).")
    n = train[0].shape[0]
    for t in train[1:]:
        _check_pair(train[0], t, "training images")
    if n == 0:
        raise DataError("The training set is empty; pass at least one example.")
    if val is not None:
        _check_pair(val[0], val[1], "validation images")
    loss_fn = loss_fn or _cross_entropy
    device = resolve_device(model, device)
    model.to(device)
    data = [t.to(device) for t in train]
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay, nesterov=cfg.nesterov)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, list(cfg.milestones), gamma=cfg.gamma)
    start, history, resumed = 0, [], None
    if store is not None and store.latest_step() is not None:
        ckpt = store.load(store.latest_step(), model=model, optimizer=opt, device=device)
        start = resumed = ckpt.step
        history = list(ckpt.metadata.get("history", []))
        sched.last_epoch = start  # the optimizer's lr was restored with its state
        sched._last_lr = [g["lr"] for g in opt.param_groups]
        log.info("resuming classifier training from epoch %d", start)
    end = cfg.epochs if stop_after_epochs is None else min(cfg.epochs, start + stop_after_epochs)
    end = max(start, end)  # a store already past cfg.epochs: nothing to do
    t0 = time.perf_counter()
    bar = tqdm(range(start, end), desc="train classifier", disable=not progress, initial=start,
               total=cfg.epochs)
    model.train()
    with no_denormals():
        for epoch in bar:
            record = _train_epoch(model, opt, data, epoch, cfg, loss_fn)
            sched.step()
            done = epoch + 1
            if val is not None:
                record["val_accuracy"] = accuracy(model, val[0], val[1], device=device)
                model.train()
            history.append(record)
            bar.set_postfix(loss=f"{record['train_loss']:.3f}",
                            **({"val": f"{record['val_accuracy']:.3f}"} if val is not None
                               else {}))
            if store is not None and (done % cfg.checkpoint_every == 0 or done == cfg.epochs):
                store.save(model, done, optimizer=opt,
                           metadata={"epoch": done, "val_accuracy": record.get("val_accuracy"),
                                     "history": history, "train_config": cfg.to_dict()})
    seconds = time.perf_counter() - t0
    model.eval()
    last = history[-1] if history else {}
    return ClassifierTrainResult(
        epochs=end,
        final_train_loss=last.get("train_loss", math.nan),
        train_accuracy=last.get("train_accuracy", math.nan),
        val_accuracy=_nan(last.get("val_accuracy")),
        history=history, seconds=seconds,
        epochs_per_second=(end - start) / seconds if seconds > 0 else 0.0,
        resumed_from=resumed)


def _nan(v: float | None) -> float:
    return math.nan if v is None else float(v)


def _train_epoch(model: nn.Module, opt: torch.optim.Optimizer, data: list[Tensor], epoch: int,
                 cfg: ClassifierTrainConfig, loss_fn: LossFn) -> dict:
    """One pass over the shuffled data; the loss and accuracy sums stay on the device and
    are read once at the end (no sync per batch on a GPU)."""
    n = data[0].shape[0]
    order = _epoch_order(n, cfg.seed, epoch).to(data[0].device)
    lr = opt.param_groups[0]["lr"]
    loss_sum = torch.zeros((), device=data[0].device)
    correct = torch.zeros((), device=data[0].device, dtype=torch.long)
    last_logits: list[Tensor] = []  # the model's latest output, for the running accuracy

    def keep(_module, _inputs, out):
        last_logits[:] = [out]

    handle = model.register_forward_hook(keep)
    try:
        for idx in order.split(cfg.batch_size):
            batch = [t[idx] for t in data]
            last_logits.clear()
            loss = loss_fn(model, *batch)
            if loss.ndim != 0:
                raise ConfigError(f"loss_fn must return a scalar, got shape "
                                  f"{tuple(loss.shape)}; reduce it (e.g. .mean()).")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach() * len(idx)
            if last_logits:
                correct += (last_logits[0].detach().argmax(-1) == batch[1]).sum()
    finally:
        handle.remove()
    return {"epoch": epoch + 1, "train_loss": float(loss_sum) / n,
            "train_accuracy": float(correct) / n, "lr": lr}
