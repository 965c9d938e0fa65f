import math

import pytest
import torch
import torch.nn.functional as F

from interp.distill import (
    KDObjective,
    distill_classifier,
    distill_lm,
    ensemble_logits,
    kd_loss,
    load_teachers,
    teacher_kl,
    teacher_logits,
)
from interp.errors import ConfigError
from interp.models.checkpoints import CheckpointStore
from interp.models.classifier import (
    ClassifierConfig,
    ClassifierTrainConfig,
    accuracy,
    build,
    train_classifier,
)
from interp.models.lm import TrainConfig, build_lm, lm_loss

TEXT = ("When shall we three meet again in thunder, lightning, or in rain? When the "
        "hurlyburly's done, when the battle's lost and won. That will be ere the set of sun. "
        "Fair is foul, and foul is fair. Hover through the fog and filthy air. ") * 40


# --------------------------------------------------------------------------- the loss


def _softmax(xs, T):
    e = [math.exp(x / T) for x in xs]
    return [v / sum(e) for v in e]


def test_kd_loss_matches_a_hand_computation():
    s = [[1.0, 2.0, 0.0], [0.0, 0.0, 3.0]]
    t = [[0.5, 0.0, 2.5], [1.0, -1.0, 0.0]]
    T = 2.0
    kl = 0.0
    for srow, trow in zip(s, t):
        ps, pt = _softmax(srow, T), _softmax(trow, T)
        kl += sum(q * (math.log(q) - math.log(p)) for p, q in zip(ps, pt))
    expected = T * T * kl / 2  # batchmean over the two rows
    got = kd_loss(torch.tensor(s), torch.tensor(t), temperature=T)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    assert expected > 0.1  # the numbers are not trivially equal
    # alpha mixes in the cross-entropy to the labels: -log softmax(s)[label], by hand
    labels = [1, 2]
    ce = -sum(math.log(_softmax(row, 1.0)[y]) for row, y in zip(s, labels)) / 2
    mixed = kd_loss(torch.tensor(s), torch.tensor(t), torch.tensor(labels), temperature=T,
                    alpha=0.25)
    assert mixed.item() == pytest.approx(0.25 * ce + 0.75 * expected, rel=1e-6)


def test_alpha_one_is_cross_entropy_and_leading_dims_are_averaged():
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 7, generator=gen), torch.randn(2, 5, 7, generator=gen)
    y = torch.randint(0, 7, (2, 5), generator=gen)
    ce = F.cross_entropy(s.reshape(-1, 7), y.reshape(-1))
    assert torch.allclose(kd_loss(s, t, y, alpha=1.0), ce)
    flat = kd_loss(s.reshape(10, 7), t.reshape(10, 7), temperature=3.0)
    assert torch.allclose(kd_loss(s, t, temperature=3.0), flat)
    assert kd_loss(s, s, temperature=3.0).abs().item() < 1e-6


@pytest.mark.parametrize("T", [1.0, 4.0, 20.0])
def test_loss_is_t_squared_times_the_softened_kl(T):
    gen = torch.Generator().manual_seed(1)
    s, t = torch.randn(6, 10, generator=gen) * 3, torch.randn(6, 10, generator=gen) * 3
    log_ps, pt = torch.log(torch.softmax(s / T, -1)), torch.softmax(t / T, -1)
    kl = (pt * (torch.log(pt) - log_ps)).sum(-1).mean()
    assert kd_loss(s, t, temperature=T).item() == pytest.approx(T * T * kl.item(), rel=1e-5)


def test_gradient_size_is_about_the_same_at_large_temperatures():
    gen = torch.Generator().manual_seed(2)
    s0, t = torch.randn(8, 10, generator=gen) * 2, torch.randn(8, 10, generator=gen) * 2

    def grad_norm(T):
        s = s0.clone().requires_grad_(True)
        kd_loss(s, t, temperature=T).backward()
        return s.grad.norm().item()

    g10, g40, g160 = grad_norm(10.0), grad_norm(40.0), grad_norm(160.0)
    assert g40 == pytest.approx(g10, rel=0.1) and g160 == pytest.approx(g40, rel=0.02)
    # the limit: (s - t) centred per row, / (n_classes * batch)
    d = s0 - t
    limit = ((d - d.mean(-1, keepdim=True)) / (10 * 8)).norm().item()
    assert g160 == pytest.approx(limit, rel=0.02)


@pytest.mark.parametrize("kwargs,match", [
    ({"temperature": 0.0}, "temperature"), ({"temperature": -1.0}, "temperature"),
    ({"alpha": -0.1}, "alpha"), ({"alpha": 1.5}, "alpha"), ({"alpha": 0.5}, "pass labels"),
])
def test_invalid_temperature_and_alpha_are_refused(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        kd_loss(torch.zeros(2, 3), torch.zeros(2, 3), **kwargs)
    if "labels" not in match:
        with pytest.raises(ConfigError, match=match):
            KDObjective(torch.nn.Identity(), **kwargs)


def test_mismatched_teacher_is_explained(unchecked):
    with unchecked(), pytest.raises(ConfigError, match="same classes"):
        kd_loss(torch.zeros(2, 3), torch.zeros(2, 4))


def test_ensemble_averages_logits_before_softening():
    gen = torch.Generator().manual_seed(3)
    xs = [torch.randn(4, 5, generator=gen) for _ in range(3)]
    manual = (xs[0] + xs[1] + xs[2]) / 3
    assert torch.allclose(ensemble_logits(xs), manual)
    with pytest.raises(ConfigError, match="at least one"):
        ensemble_logits([])

    models = [torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Dropout(0.5))
              for _ in range(2)]
    x = torch.randn(6, 3, generator=gen)
    got = teacher_logits(models, x, batch_size=4)  # eval mode: dropout off, deterministic
    with torch.no_grad():
        want = (models[0][0](x) + models[1][0](x)) / 2
    assert torch.allclose(got, want, atol=1e-6) and not got.requires_grad
    assert all(m.training for m in models)  # training flags restored
    assert torch.allclose(teacher_logits(models[0], x), want * 2 - models[1][0](x).detach(),
                          atol=1e-6)


# --------------------------------------------------------------------------- classifiers

TEACHER = ClassifierConfig("cnn", channels=(8, 16), hidden=32, image_size=8)
STUDENT = ClassifierConfig("mlp", hidden=(32,), image_size=8)


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.tensor(d.images * 255 / 16).round().to(torch.uint8).unsqueeze(1)
    labels = torch.tensor(d.target, dtype=torch.long)
    return (images[:600], labels[:600]), (images[600:900], labels[600:900])


@pytest.fixture(scope="module")
def teacher_run(digits, tmp_path_factory):
    """A CNN teacher trained 4 epochs, a checkpoint per epoch."""
    train, val = digits
    store = CheckpointStore(tmp_path_factory.mktemp("teacher"), {"model": TEACHER.to_dict()})
    model = build(TEACHER, seed=0)
    cfg = ClassifierTrainConfig(epochs=4, batch_size=16, lr=0.1, milestones=(3,), seed=3)
    res = train_classifier(model, train, val, cfg, store=store, progress=False)
    assert res.val_accuracy > 0.6
    return model, store


def test_student_learns_from_the_teacher_alone(digits, teacher_run):
    """With alpha=0 the labels are never read: a student trained on scrambled labels still
    classifies well, because all it learns comes from the teacher's logits."""
    (images, labels), val = digits
    teacher, _ = teacher_run
    scrambled = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))]
    student = build(STUDENT, seed=0)
    cfg = ClassifierTrainConfig(epochs=3, batch_size=16, lr=0.05, milestones=(), seed=0)
    res = distill_classifier(student, teacher, (images, scrambled), val, cfg, temperature=4.0,
                             alpha=0.0, progress=False)
    assert res.student_val_accuracy > 0.5, res  # chance is 0.1
    assert res.student_val_accuracy == pytest.approx(accuracy(student, *val))
    assert res.teacher_val_accuracy == pytest.approx(accuracy(teacher, *val))
    assert res.teacher_train_accuracy < 0.3  # measured against the scrambled labels
    assert res.n_teachers == 1 and res.train.epochs == 3
    # with alpha=1 it is plain training on the (scrambled) labels: near chance on val
    alone = build(STUDENT, seed=0)
    res1 = distill_classifier(alone, teacher, (images, scrambled), val, cfg, alpha=1.0,
                              progress=False)
    assert res1.student_val_accuracy < 0.3


def test_snapshot_ensemble_teacher_from_the_store(digits, teacher_run):
    train, val = digits
    teacher, store = teacher_run
    torch.manual_seed(5)
    members = load_teachers(store, [2, 4])  # the classifier is rebuilt from store.json
    draw = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(draw, torch.rand(3))  # loading left the caller's RNG alone
    assert len(members) == 2 and not members[1].training
    assert torch.equal(teacher_logits(members[1], val[0]), teacher_logits(teacher, val[0]))
    assert not torch.equal(teacher_logits(members[0], val[0]), teacher_logits(teacher, val[0]))
    student = build(STUDENT, seed=0)
    cfg = ClassifierTrainConfig(epochs=2, batch_size=16, lr=0.05, milestones=(), seed=0)
    res = distill_classifier(student, members, train, val, cfg, temperature=4.0, alpha=0.5,
                             progress=False, seed=1)
    assert res.n_teachers == 2 and res.student_val_accuracy > 0.5
    assert res.teacher_val_accuracy == pytest.approx(float(
        (ensemble_logits([teacher_logits(m, val[0]) for m in members]).argmax(-1) == val[1])
        .float().mean()))
    again = type(res).from_json(res.to_json())
    assert again.train.history == res.train.history and again.n_teachers == 2
    with pytest.raises(ConfigError, match="build_fn"):
        load_teachers(CheckpointStore(store.root.parent / "other", {"x": 1}), [1])


# --------------------------------------------------------------------------- language models


@pytest.fixture(scope="module")
def lm_setup(tiny_tokenizer):
    """A "test" LM teacher trained briefly on the text (sharper than a random one)."""
    from interp.models.lm import train_lm

    tokens = torch.tensor(tiny_tokenizer(TEXT)["input_ids"])
    teacher = build_lm("test", tiny_tokenizer, seed=1)
    cfg = TrainConfig(steps=40, batch_size=8, seq_len=32, lr=1e-2, warmup_steps=4,
                      eval_every=40, eval_batches=2, checkpoint_every=40, seed=0)
    train_lm(teacher, tokens, tokens, cfg, progress=False)
    teacher.zero_grad(set_to_none=True)
    return teacher.eval(), tokens


def test_kd_objective_on_token_batches(tiny_tokenizer, lm_setup):
    teacher, tokens = lm_setup
    student = build_lm("test", tiny_tokenizer, seed=0)
    batch = tokens[:64].view(2, 32)
    obj = KDObjective(teacher, temperature=2.0)
    loss = obj(student, batch)
    with torch.no_grad():
        t, s = teacher(batch), student(batch)
    # per token over positions with a next token, T^2 * KL(teacher || student)
    log_ps, pt = torch.log_softmax(s[:, :-1] / 2, -1), torch.softmax(t[:, :-1] / 2, -1)
    manual = 4 * (pt * (pt.log() - log_ps)).sum(-1).mean()
    assert loss.item() == pytest.approx(manual.item(), rel=1e-5) and loss.requires_grad
    assert obj(student, {"tokens": batch, "teacher_logits": t}).item() == pytest.approx(
        loss.item(), rel=1e-6)
    assert KDObjective(teacher, alpha=1.0)(student, batch).item() == pytest.approx(
        lm_loss(s, batch).item(), rel=1e-5)
    # an ensemble of LMs: KD to the mean logits
    other = build_lm("test", tiny_tokenizer, seed=2).eval()
    with torch.no_grad():
        mean = (t + other(batch)) / 2
    pair = KDObjective([teacher, other], temperature=2.0)
    assert pair(student, batch).item() == pytest.approx(
        obj(student, (batch, mean)).item(), rel=1e-5)
    assert pair.config() == {"objective": "kd", "temperature": 2.0, "alpha": 0.0,
                             "n_teachers": 2}


def test_distill_lm_brings_the_student_closer_to_the_teacher(tiny_tokenizer, lm_setup,
                                                             tmp_path):
    teacher, tokens = lm_setup
    student = build_lm("test", tiny_tokenizer, seed=0)
    seqs = tokens[: 8 * 32].view(8, 32)
    before = teacher_kl(student, teacher, seqs)
    cfg = TrainConfig(steps=30, batch_size=8, seq_len=32, lr=1e-2, warmup_steps=3,
                      eval_every=30, eval_batches=1, checkpoint_every=15, seed=0)
    store = CheckpointStore(tmp_path, {"student": "test"})
    res = distill_lm(student, teacher, tokens, tokens, cfg, temperature=2.0, store=store,
                     progress=False)
    losses = [h["train_loss"] for h in res.train.history]
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses
    assert res.val_kl < 0.5 * before, (res.val_kl, before)
    assert res.val_kl == pytest.approx(teacher_kl(student, teacher, seqs), rel=1e-4)
    assert store.steps() == [15, 30] and res.n_teachers == 1
    # the teacher is left as it was: eval mode, no gradients accumulated
    assert not teacher.training and all(p.grad is None for p in teacher.parameters())


# --------------------------------------------------------------------------- self-distillation


def test_classifier_self_distillation_is_kd_to_the_unmasked_logits(digits, teacher_run):
    """By hand: with teacher logits in the batch it is T^2 KL(p_t^T || p_s^T); without them
    the unmasked logits are computed with the mask switched off; a full mask costs 0."""
    from interp.distill import ClassifierSelfDistillation
    from interp.masks import MaskSet

    x = torch.tensor([[0.0, 1.0], [2.0, -1.0]])
    model = torch.nn.Linear(2, 3)
    t = torch.tensor([[0.5, 0.0, 2.5], [1.0, -1.0, 0.0]])
    obj = ClassifierSelfDistillation(temperature=2.0)
    with torch.no_grad():
        s = model(x).tolist()
    kl = sum(sum(q * (math.log(q) - math.log(p))
                 for p, q in zip(_softmax(srow, 2.0), _softmax(trow, 2.0)))
             for srow, trow in zip(s, t.tolist()))
    assert obj(model, (x, t)).item() == pytest.approx(4.0 * kl / 2, rel=1e-5)
    assert obj(model, {"images": x, "teacher_logits": t}).item() == pytest.approx(
        4.0 * kl / 2, rel=1e-5)
    assert obj.config() == {"objective": "classifier_self_distillation", "temperature": 2.0}

    (images, _), _ = digits
    teacher, _ = teacher_run
    images = images[:64]
    targets = {"fc": (teacher.fc, "weight"), "head": (teacher.head, "weight")}
    empty = MaskSet.empty(teacher, targets=targets)
    with torch.no_grad():
        full_logits = teacher(images)
    sd = ClassifierSelfDistillation(empty, temperature=4.0)
    with empty.applied(teacher, mode="keep"):
        with torch.no_grad():
            masked_logits = teacher(images)
        loss = sd(teacher, images).item()
    assert loss == pytest.approx(kd_loss(masked_logits, full_logits, temperature=4.0).item(),
                                 rel=1e-5)
    assert loss > 0.1  # dropping the whole fc and head changes the outputs
    full = MaskSet.full(teacher, targets=targets)
    with full.applied(teacher, mode="keep"):
        assert ClassifierSelfDistillation(full)(teacher, images).item() < 1e-6
    with pytest.raises(ConfigError, match="no mask set"):
        ClassifierSelfDistillation()(teacher, images)
    with pytest.raises(ConfigError, match="'images'"):
        ClassifierSelfDistillation(full)(teacher, {"x": images})
    with pytest.raises(ConfigError, match="temperature"):
        ClassifierSelfDistillation(temperature=0.0)


def test_fit_masks_with_self_distillation_keeps_the_teachers_outputs(digits, teacher_run):
    """A sparse subnetwork trained with the objective reproduces the teacher's predictions far
    better than a random subnetwork with the same number of weights in every matrix."""
    from interp.distill import ClassifierSelfDistillation
    from interp.masks import ContinuousSparsification, MaskSet, fit_masks
    from interp.models.classifier import predict_logits

    (images, labels), (val_images, _) = digits
    teacher, _ = teacher_run
    targets = {"blocks.0.conv": (teacher.blocks[0].layers[0], "weight"),
               "blocks.1.conv": (teacher.blocks[1].layers[0], "weight"),
               "fc": (teacher.fc, "weight"), "head": (teacher.head, "weight")}
    ms = MaskSet.for_model(teacher, ContinuousSparsification(temperature_factor=1.03),
                           targets=targets)
    logits = predict_logits(teacher, images)

    def batches(seed):
        gen = torch.Generator().manual_seed(seed)
        while True:
            for idx in torch.randperm(len(images), generator=gen).split(100):
                yield images[idx], logits[idx]

    res = fit_masks(teacher, ms, ClassifierSelfDistillation(ms, 4.0), batches, lam=5.0,
                    lr=0.1, max_steps=120, progress=False)
    assert res.steps > 10 and 0.01 < ms.active_fraction() < 0.6, ms.active_fraction()
    full = predict_logits(teacher, val_images).argmax(-1)

    def agreement(mask):
        with mask.applied(teacher, mode="keep"):
            return float((predict_logits(teacher, val_images).argmax(-1) == full)
                         .float().mean())

    fitted, chance = agreement(ms), agreement(ms.random_like(seed=0))
    assert fitted > 0.85 and fitted > chance + 0.3, (fitted, chance)
    assert all(p.requires_grad for p in teacher.parameters())  # unfrozen again
