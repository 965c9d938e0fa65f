"""Knowledge distillation (Hinton et al.) from one teacher or an ensemble of checkpoints.

One API for image classifiers and TransformerLens LMs:

- :func:`kd_loss`: ``alpha * CE(student, labels) + (1 - alpha) * T^2 *
  KL(softmax(teacher / T) || softmax(student / T))``, the KL summed over classes and averaged
  over examples (every leading dimension, so over tokens for LMs). The ``T^2`` factor keeps
  the gradient's size about the same across temperatures.
- A *teacher* is one model or a list of models (an ensemble, e.g. checkpoints of one run
  loaded with :func:`load_teachers`); an ensemble's logits are averaged with equal weights
  before softening (:func:`ensemble_logits`). :func:`teacher_logits` runs it without a graph.
- :func:`distill_classifier` trains a classifier student with
  :func:`~interp.models.classifier.train_classifier`; :class:`KDObjective` is an objective
  ``objective(model, batch)`` on token batches, and :func:`distill_lm` trains an LM student
  with it through :func:`~interp.models.lm.train_lm`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int, Shaped
from torch import Tensor, nn

from interp.errors import ConfigError, check_number
from interp.models.classifier import (
    ClassifierConfig,
    ClassifierTrainConfig,
    ClassifierTrainResult,
    accuracy,
    build,
    train_classifier,
)
from interp.models.lm import TrainConfig, TrainResult, resolve_device, train_lm
from interp.objectives import _unpack
from interp.results import Result

__all__ = [
    "ClassifierSelfDistillation",
    "DistillResult",
    "KDObjective",
    "LMDistillResult",
    "Teacher",
    "distill_classifier",
    "distill_lm",
    "ensemble_logits",
    "kd_loss",
    "load_teachers",
    "teacher_kl",
    "teacher_logits",
]

#: One model, or several whose logits are averaged (an ensemble).
Teacher = nn.Module | Sequence[nn.Module]


def _check_kd(temperature: float, alpha: float) -> None:
    check_number("temperature", temperature, low=0, low_open=True)
    check_number("alpha", alpha, low=0, high=1)


def kd_loss(
    student_logits: Float[Tensor, "*batch n_classes"],
    teacher_logits: Float[Tensor, "*batch n_classes"],
    labels: Int[Tensor, "*batch"] | None = None,
    *,
    temperature: float = 4.0,
    alpha: float = 0.0,
) -> Float[Tensor, ""]:
    """Hinton's distillation loss, averaged over all leading positions (float32 math).

    ``alpha * CE(student, labels) + (1 - alpha) * T^2 * KL(p_teacher^T || p_student^T)`` with
    ``p^T = softmax(logits / T)``; the KL is summed over classes and averaged over examples
    ("batchmean"). ``alpha = 0`` is pure distillation and needs no labels.

    Raises:
        ConfigError: ``temperature <= 0``, ``alpha`` outside [0, 1], ``alpha > 0`` without
            labels, or student and teacher logits of different shapes.
    """
    _check_kd(temperature, alpha)
    if student_logits.shape != teacher_logits.shape:
        raise ConfigError(
            f"Student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ in shape: the teacher must predict the same "
            "classes (or vocabulary) on the same inputs.")
    if alpha > 0 and labels is None:
        raise ConfigError(f"kd_loss with alpha={alpha} weighs a cross-entropy to the labels; "
                          "pass labels, or alpha=0 for pure distillation.")
    n_classes = student_logits.shape[-1]
    s = student_logits.float().reshape(-1, n_classes)
    t = teacher_logits.detach().float().reshape(-1, n_classes)
    loss = s.new_zeros(())
    if alpha < 1:
        log_ps = torch.log_softmax(s / temperature, dim=-1)
        log_pt = torch.log_softmax(t / temperature, dim=-1)
        kl = F.kl_div(log_ps, log_pt, log_target=True, reduction="sum") / s.shape[0]
        loss = loss + (1 - alpha) * temperature ** 2 * kl
    if alpha > 0:
        loss = loss + alpha * F.cross_entropy(s, labels.reshape(-1))
    return loss


def ensemble_logits(
    logits: Sequence[Float[Tensor, "*batch n_classes"]],
) -> Float[Tensor, "*batch n_classes"]:
    """The equal-weight mean of several models' logits (averaged before softening)."""
    logits = list(logits)
    if not logits:
        raise ConfigError("ensemble_logits needs at least one logits tensor.")
    shapes = {tuple(x.shape) for x in logits}
    if len(shapes) > 1:
        raise ConfigError(f"Ensemble members' logits differ in shape ({sorted(shapes)}); every "
                          "member must score the same inputs over the same classes.")
    return torch.stack([x.float() for x in logits]).mean(0)


def _members(teacher: Teacher) -> list[nn.Module]:
    members = [teacher] if isinstance(teacher, nn.Module) else list(teacher)
    if not members:
        raise ConfigError("An ensemble teacher needs at least one model; pass a model or a "
                          "non-empty list of models.")
    return members


@torch.no_grad()
def teacher_logits(
    teacher: Teacher,
    inputs: Shaped[Tensor, "batch *shape"],
    *,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
) -> Float[Tensor, "batch *out"]:
    """The teacher's logits on ``inputs`` (ensembles: averaged), in eval mode, without a graph.

    Each member runs on its own device; the result lands on ``device`` (default: the
    inputs'). ``batch_size`` splits the inputs (default: one pass). Training flags are
    restored afterwards.
    """
    out_device = torch.device(device) if device is not None else inputs.device
    chunks = inputs.split(batch_size) if batch_size else (inputs,)
    per_member = []
    for model in _members(teacher):
        was_training = model.training
        model.eval()
        try:
            where = resolve_device(model)
            per_member.append(torch.cat([model(c.to(where)).float().to(out_device)
                                         for c in chunks]))
        finally:
            model.train(was_training)
    return per_member[0] if len(per_member) == 1 else ensemble_logits(per_member)


def teacher_kl(
    student: nn.Module,
    teacher: Teacher,
    inputs: Shaped[Tensor, "batch *shape"],
    *,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
) -> float:
    """Mean ``KL(p_teacher || p_student)`` at temperature 1 per example (per token for LMs):
    how far the student's predictions are from the teacher's."""
    device = resolve_device(student, device)
    t = teacher_logits(teacher, inputs, batch_size=batch_size, device=device)
    s = teacher_logits(student, inputs.to(device), batch_size=batch_size, device=device)
    return float(kd_loss(s, t, temperature=1.0))


def load_teachers(
    store,
    epochs: int | Sequence[int] | None = None,
    build_fn: Callable[[], nn.Module] | None = None,
    *,
    device: str | torch.device = "cpu",
) -> list[nn.Module]:
    """Models of a :class:`~interp.models.checkpoints.CheckpointStore`, in eval mode.

    Args:
        epochs: which checkpoints (store steps; an int for one); None for all of them.
        build_fn: makes a fresh model of the store's architecture to load weights into.
            Default: the classifier of the store identity's ``"model"`` entry (a
            :meth:`ClassifierConfig.to_dict`).

    Pass the list as the teacher: one entry is a single teacher, several an ensemble.
    """
    if build_fn is None:
        spec = store.identity.get("model") if isinstance(store.identity, dict) else None
        if not isinstance(spec, dict) or "family" not in spec:
            raise ConfigError(
                f"The store in {str(store.root)!r} does not record a classifier config (its "
                "identity has no 'model' entry from ClassifierConfig.to_dict()); pass build_fn, "
                "a function returning a fresh model of the stored architecture.")
        cfg = ClassifierConfig.from_dict(spec)

        def build_fn() -> nn.Module:
            return build(cfg)

    steps = store.steps() if epochs is None else [epochs] if isinstance(epochs, int) else epochs
    if not steps:
        raise ConfigError(f"No checkpoints to load from {str(store.root)!r}: it has "
                          f"{store.steps()}. Train the teacher first, or pass existing epochs.")
    models, rng = [], torch.get_rng_state()
    try:
        for step in steps:
            model = build_fn()
            store.load(int(step), model=model, device=device)
            models.append(model.to(device).eval())
    finally:  # loading a checkpoint restores its training RNG; keep the caller's instead
        torch.set_rng_state(rng)
    return models


# --------------------------------------------------------------------------- classifiers


class _ClassifierKD:
    """``loss_fn(model, images, labels, teacher_logits)`` for :func:`train_classifier`."""

    def __init__(self, temperature: float, alpha: float):
        self.temperature, self.alpha = temperature, alpha

    def __call__(self, model: nn.Module, images: Tensor, labels: Tensor,
                 teacher: Tensor) -> Tensor:
        return kd_loss(model(images), teacher, labels, temperature=self.temperature,
                       alpha=self.alpha)


class ClassifierSelfDistillation:
    """A masked classifier reproducing its own softened outputs: an objective
    ``objective(model, batch) -> scalar`` for :func:`~interp.masks.fit_masks`.

    The loss is :func:`kd_loss` (``alpha = 0``: ``T^2 * KL(p_full^T || p_masked^T)``) between
    the masked model's logits and the unmasked model's. A batch is an image tensor, an
    ``(images, teacher_logits)`` pair or a dict with ``"images"`` (and optionally
    ``"teacher_logits"``); precomputed teacher logits save the unmasked forward pass. Without
    them the unmasked logits are computed under ``torch.no_grad()`` with the mask set switched
    ``"off"`` for that pass.

    Args:
        maskset: the attached :class:`~interp.masks.MaskSet` being trained (needed unless
            every batch carries ``teacher_logits``).
        temperature: the softening temperature ``T`` (> 0).
    """

    name = "classifier_self_distillation"

    def __init__(self, maskset=None, temperature: float = 4.0):
        _check_kd(temperature, 0.0)
        self.maskset, self.temperature = maskset, float(temperature)

    @torch.no_grad()
    def teacher_logits(self, model: nn.Module, images: Tensor) -> Tensor:
        """The unmasked model's logits on ``images`` (no graph)."""
        if self.maskset is None:
            raise ConfigError("ClassifierSelfDistillation has no mask set to switch off: pass "
                              "ClassifierSelfDistillation(maskset) or batches with "
                              "'teacher_logits'.")
        with self.maskset.using("off"):
            return model(images)

    def __call__(self, model: nn.Module, batch: Any) -> Tensor:
        if isinstance(batch, dict):
            if "images" not in batch:
                raise ConfigError(f"A dict batch needs an 'images' entry; it has "
                                  f"{sorted(batch)}.")
            images, teacher = batch["images"], batch.get("teacher_logits")
        elif isinstance(batch, (tuple, list)) and len(batch) == 2:
            images, teacher = batch
        elif isinstance(batch, Tensor):
            images, teacher = batch, None
        else:
            raise ConfigError(f"Unsupported batch of type {type(batch).__name__}: pass images, "
                              "an (images, teacher_logits) pair or a dict with 'images'.")
        if teacher is None:
            teacher = self.teacher_logits(model, images)
        logits = model(images)
        return kd_loss(logits, teacher.to(logits.device), temperature=self.temperature)

    def config(self) -> dict:
        return {"objective": self.name, "temperature": self.temperature}

    def __repr__(self) -> str:
        return f"ClassifierSelfDistillation(temperature={self.temperature})"


@dataclass(repr=False)
class DistillResult(Result):
    """What :func:`distill_classifier` measured (accuracies are fractions).

    Attributes:
        train: the student's training run (history, final validation accuracy).
        teacher_train_accuracy, teacher_val_accuracy: the (ensemble) teacher's accuracy
            (NaN without ``val``).
    """

    train: ClassifierTrainResult
    temperature: float
    alpha: float
    n_teachers: int
    student_val_accuracy: float
    teacher_train_accuracy: float
    teacher_val_accuracy: float


def distill_classifier(
    student: nn.Module,
    teacher: Teacher,
    train: tuple[Tensor, Tensor],
    val: tuple[Tensor, Tensor] | None = None,
    config: ClassifierTrainConfig | None = None,
    *,
    temperature: float = 4.0,
    alpha: float = 0.0,
    store=None,
    device: str | torch.device | None = None,
    progress: bool = True,
    seed: int | None = None,
    stop_after_epochs: int | None = None,
) -> DistillResult:
    """Train ``student`` in place on :func:`kd_loss` to ``teacher`` (a model or an ensemble).

    The teacher's logits on the training images are computed once, before training, and ride
    along with the shuffled batches: the teacher is deterministic (eval mode) and the images
    are not augmented, so this gives the same loss as a teacher pass per batch, at the cost
    of one pass instead of one per epoch. ``seed`` (if given) replaces ``config.seed``;
    ``store``, ``device``, ``progress`` and ``stop_after_epochs`` are as in
    :func:`~interp.models.classifier.train_classifier`.
    """
    _check_kd(temperature, alpha)
    cfg = config or ClassifierTrainConfig()
    if seed is not None:
        cfg = dataclasses.replace(cfg, seed=seed)
    cfg.validate()
    images, labels = train
    device = resolve_device(student, device)
    student.to(device)
    targets = teacher_logits(teacher, images, batch_size=1000, device=device)
    if targets.ndim != 2 or targets.shape[0] != images.shape[0]:
        raise ConfigError(f"The teacher returned logits of shape {tuple(targets.shape)} for "
                          f"{images.shape[0]} images; a classifier teacher must return "
                          "[N, n_classes].")
    teacher_train_acc = float((targets.argmax(-1).cpu() == labels.cpu()).float().mean())
    result = train_classifier(student, (images, labels, targets), val, cfg, store=store,
                              device=device, progress=progress,
                              stop_after_epochs=stop_after_epochs,
                              loss_fn=_ClassifierKD(temperature, alpha))
    teacher_val_acc = math.nan
    if val is not None:
        t_val = teacher_logits(teacher, val[0], batch_size=1000)
        teacher_val_acc = float((t_val.argmax(-1).cpu() == val[1].cpu()).float().mean())
    student_val = (accuracy(student, val[0], val[1], device=device) if val is not None
                   else math.nan)
    return DistillResult(result, temperature, alpha, len(_members(teacher)), student_val,
                         teacher_train_acc, teacher_val_acc)


# --------------------------------------------------------------------------- language models


class KDObjective:
    """Distillation from an LM teacher as an objective ``objective(model, batch) -> scalar``.

    On a ``[batch, pos]`` token batch (or a dict / pair carrying ``teacher_logits``, as for
    the other objectives) the student's next-token distributions at positions ``0..pos-2``
    (those with a next token) are matched to the teacher's by :func:`kd_loss`, averaged over
    tokens; ``alpha > 0`` adds the next-token cross-entropy. Works with
    :func:`~interp.models.lm.train_lm` (``loss_fn=``) and :func:`~interp.masks.fit_masks`.

    Args:
        teacher: a ``TransformerBridge`` or a list of them (ensemble) sharing the student's
            tokenizer; it runs in eval mode without a graph, on its own device.
    """

    name = "kd"

    def __init__(self, teacher: Teacher, temperature: float = 2.0, alpha: float = 0.0):
        _check_kd(temperature, alpha)
        self.teacher = _members(teacher)
        self.temperature, self.alpha = temperature, alpha

    def __call__(self, model: Any, batch: Any) -> Tensor:
        tokens, teacher = _unpack(batch)
        if teacher is None:
            teacher = teacher_logits(self.teacher, tokens)
        student = model(tokens)
        if teacher.shape != student.shape:
            raise ConfigError(
                f"Teacher logits {tuple(teacher.shape)} do not match the student's "
                f"{tuple(student.shape)}: teacher and student must share the tokenizer "
                "(d_vocab) and see the same tokens.")
        labels = tokens[:, 1:] if self.alpha > 0 else None
        return kd_loss(student[:, :-1], teacher[:, :-1].to(student.device), labels,
                       temperature=self.temperature, alpha=self.alpha)

    def config(self) -> dict:
        return {"objective": self.name, "temperature": self.temperature, "alpha": self.alpha,
                "n_teachers": len(self.teacher)}

    def __repr__(self) -> str:
        return (f"KDObjective(n_teachers={len(self.teacher)}, temperature={self.temperature}, "
                f"alpha={self.alpha})")


@dataclass(repr=False)
class LMDistillResult(Result):
    """What :func:`distill_lm` measured.

    Attributes:
        train: the student's training run (``train_loss`` in its history is the KD loss,
            ``val_loss`` the next-token loss).
        val_kl: mean per-token ``KL(teacher || student)`` at temperature 1 on validation
            sequences after training (nats).
    """

    train: TrainResult
    temperature: float
    alpha: float
    n_teachers: int
    val_kl: float


def distill_lm(
    student: Any,
    teacher: Teacher,
    train_tokens: Int[Tensor, " n_train"],
    val_tokens: Int[Tensor, " n_val"],
    config: TrainConfig | None = None,
    *,
    temperature: float = 2.0,
    alpha: float = 0.0,
    store=None,
    device: str | torch.device | None = None,
    progress: bool = True,
    stop_after: int | None = None,
) -> LMDistillResult:
    """Train an LM ``student`` in place on :class:`KDObjective` with
    :func:`~interp.models.lm.train_lm` (same schedule, checkpoints and resumption).

    The teacher runs on every batch (LM batches are drawn afresh, so there is nothing to
    precompute once). ``val_kl`` is measured on up to ``eval_batches x batch_size``
    validation sequences.
    """
    from interp.data.text import to_sequences

    cfg = (config or TrainConfig()).validate()
    objective = KDObjective(teacher, temperature, alpha)
    vocab = {getattr(getattr(m, "cfg", None), "d_vocab", None) for m in objective.teacher}
    s_vocab = getattr(getattr(student, "cfg", None), "d_vocab", None)
    if s_vocab is not None and vocab - {None, s_vocab}:
        raise ConfigError(f"Student vocabulary ({s_vocab}) and teacher vocabularies "
                          f"({sorted(v for v in vocab if v is not None)}) differ: build the "
                          "student with the teacher's tokenizer.")
    result = train_lm(student, train_tokens, val_tokens, cfg, store=store, device=device,
                      progress=progress, stop_after=stop_after, loss_fn=objective)
    seqs = to_sequences(val_tokens, cfg.seq_len)[: cfg.eval_batches * cfg.batch_size]
    kl = teacher_kl(student, objective.teacher, seqs, batch_size=cfg.batch_size)
    return LMDistillResult(result, temperature, alpha, len(objective.teacher), kl)
