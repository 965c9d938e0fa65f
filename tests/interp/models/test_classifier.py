import json

import pytest
import torch

from interp.errors import ConfigError, DataError
from interp.models.checkpoints import CheckpointStore
from interp.models.classifier import (
    ClassifierConfig,
    ClassifierTrainConfig,
    ClassifierTrainResult,
    CNNClassifier,
    MLPClassifier,
    _epoch_order,
    accuracy,
    build,
    predict_logits,
    train_classifier,
)

CNN = ClassifierConfig("cnn", channels=(8, 16), hidden=32, image_size=8)
CFG = ClassifierTrainConfig(epochs=4, batch_size=16, lr=0.1, milestones=(3,), seed=3)


@pytest.fixture(scope="module")
def digits():
    """sklearn's 8x8 digits as uint8 images [N, 1, 8, 8] (0-255): 600 train, 300 val."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.tensor(d.images * 255 / 16).round().to(torch.uint8).unsqueeze(1)
    labels = torch.tensor(d.target, dtype=torch.long)
    return (images[:600], labels[:600]), (images[600:900], labels[600:900])


def test_cnn_learns_digits_and_checkpoints_every_epoch(digits, tmp_path):
    train, val = digits
    model = build(CNN, seed=0)
    store = CheckpointStore(tmp_path, {"model": CNN.to_dict(), "train": CFG.to_dict()})
    res = train_classifier(model, train, val, CFG, store=store, progress=False)
    assert res.epochs == 4 and res.resumed_from is None
    assert res.val_accuracy > 0.6, res.history  # chance is 0.1
    assert res.val_accuracy == pytest.approx(accuracy(model, *val))
    assert res.history[-1]["train_loss"] < res.history[0]["train_loss"]
    assert store.steps() == [1, 2, 3, 4]
    meta = store.metadata(2)
    assert meta["epoch"] == 2 and len(meta["history"]) == 2
    assert meta["val_accuracy"] == pytest.approx(res.history[1]["val_accuracy"])
    # the schedule: lr drops by gamma after the milestone epoch
    assert [h["lr"] for h in res.history] == pytest.approx([0.1, 0.1, 0.1, 0.01])
    # a checkpoint reloads into a fresh model of the stored config
    fresh = build(ClassifierConfig.from_dict(CheckpointStore(tmp_path).identity["model"]))
    store.load(4, model=fresh)
    assert torch.equal(predict_logits(fresh, val[0]), predict_logits(model, val[0]))
    again = ClassifierTrainResult.from_json(res.to_json())
    assert again.val_accuracy == res.val_accuracy and again.history == res.history


def test_resumed_run_ends_with_identical_weights(digits, tmp_path):
    train, val = digits
    straight = build(CNN, seed=0)
    train_classifier(straight, train, None, CFG, progress=False)

    store = CheckpointStore(tmp_path, {"model": CNN.to_dict()})
    first = build(CNN, seed=0)
    part = train_classifier(first, train, None, CFG, store=store, progress=False,
                            stop_after_epochs=1)
    assert part.epochs == 1 and store.steps() == [1]
    resumed = build(CNN, seed=123)  # the weights come from the store
    res = train_classifier(resumed, train, None, CFG, store=store, progress=False)
    assert res.resumed_from == 1 and res.epochs == 4 and len(res.history) == 4
    assert [h["lr"] for h in res.history] == pytest.approx([0.1, 0.1, 0.1, 0.01])
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    # a finished run returns at once and changes nothing
    done = train_classifier(resumed, train, None, CFG, store=store, progress=False)
    assert done.epochs == 4 and done.resumed_from == 4
    assert all(torch.equal(a, b) for a, b in zip(straight.state_dict().values(),
                                                 resumed.state_dict().values()))


def test_shuffle_depends_on_seed_and_epoch_only():
    a = _epoch_order(100, 0, 1)
    assert torch.equal(a, _epoch_order(100, 0, 1))
    assert sorted(a.tolist()) == list(range(100))
    assert not torch.equal(a, _epoch_order(100, 0, 2))
    assert not torch.equal(_epoch_order(100, 1, 0), _epoch_order(100, 0, 1))


def test_hook_points_and_input_scaling(digits):
    images = digits[0][0][:5]
    cnn = build(CNN, seed=0)
    logits, cache = cnn.run_with_cache(images)
    assert logits.shape == (5, 10)
    assert cache["blocks.0.hook_out"].shape == (5, 8, 4, 4)
    assert cache["blocks.1.hook_out"].shape == (5, 16, 2, 2)
    assert cache["hook_features"].shape == (5, 32)
    # uint8 is scaled to [0, 1] by the model; floats are used as they are
    torch.testing.assert_close(cnn(images), cnn(images.float() / 255))
    assert not torch.allclose(cnn(images), cnn(images.float()))

    mlp = build(ClassifierConfig("mlp", hidden=(24, 16), image_size=8), seed=0)
    assert isinstance(mlp, MLPClassifier) and mlp.d_features == 16
    _, cache = mlp.run_with_cache(images)
    assert cache["blocks.0.hook_out"].shape == (5, 24)
    assert cache["hook_features"].shape == (5, 16)
    torch.testing.assert_close(mlp(images), mlp(images.flatten(1).float() / 255))
    linear = MLPClassifier(hidden=(), in_features=64)
    assert linear.run_with_cache(images)[1]["hook_features"].shape == (5, 64)


def test_bad_inputs_are_explained(digits, unchecked):
    cnn = build(CNN, seed=0)
    with pytest.raises(DataError, match="uint8"):
        cnn(torch.zeros(2, 1, 8, 8, dtype=torch.long))
    with pytest.raises(DataError, match=r"\[N, 1, 8, 8\]"):
        cnn(torch.zeros(2, 1, 28, 28))
    with pytest.raises(DataError, match="in_features=64"):
        MLPClassifier(in_features=784)(torch.zeros(2, 1, 8, 8))
    with pytest.raises(DataError, match="one label per example"):
        train_classifier(cnn, (digits[0][0], digits[0][1][:10]), None, CFG, progress=False)
    with pytest.raises(ConfigError, match="at most 3 blocks"):
        CNNClassifier(channels=(4, 4, 4, 4), image_size=8)
    with unchecked(), pytest.raises(ConfigError, match="Did you mean: cnn"):
        ClassifierConfig("cnnn")


@pytest.mark.parametrize("field,value", [("epochs", 0), ("lr", 0.0), ("momentum", 1.0),
                                         ("gamma", 0.0), ("milestones", (5, 3)),
                                         ("checkpoint_every", 0), ("weight_decay", -1.0)])
def test_train_config_rejects_values_that_make_no_sense(field, value):
    with pytest.raises(ConfigError, match=field):
        ClassifierTrainConfig(**{field: value}).validate()
    with pytest.raises(ConfigError, match="nesterov"):
        ClassifierTrainConfig(momentum=0.0, nesterov=True).validate()


def test_configs_are_json_able_store_identities():
    d = ClassifierConfig("mlp", hidden=(32, 16), image_size=8).to_dict()
    assert json.loads(json.dumps(d)) == d
    assert ClassifierConfig.from_dict(d) == ClassifierConfig("mlp", hidden=(32, 16), image_size=8)
    assert ClassifierConfig.from_dict(CNN.to_dict()) == CNN
    assert json.loads(json.dumps(CFG.to_dict()))["milestones"] == [3]
    with pytest.raises(ConfigError, match="channels"):
        ClassifierConfig.from_dict({**CNN.to_dict(), "chanels": [1]})


def test_loop_flushes_denormals_and_takes_a_custom_loss(digits, flush):
    from interp.numerics import flush_denormal_enabled

    seen = []

    def loss_fn(model, images, labels, weights):
        if not seen:
            seen.append(flush_denormal_enabled())
        return (torch.nn.functional.cross_entropy(model(images), labels, reduction="none")
                * weights).mean()

    train, _ = digits
    weights = torch.ones(len(train[1]))
    model = build(ClassifierConfig("mlp", hidden=(16,), image_size=8), seed=0)
    cfg = ClassifierTrainConfig(epochs=1, batch_size=64)
    flush.set(False)
    res = train_classifier(model, (*train, weights), None, cfg, progress=False, loss_fn=loss_fn)
    assert seen == [True] and flush.nowhere()  # flushing inside the loop only
    assert res.train_accuracy > 0.1 and res.history[0]["train_loss"] > 0
