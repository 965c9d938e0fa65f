import json

import pytest
import torch

from interp.errors import CheckpointError
from interp.models.checkpoints import CheckpointStore
from interp.models.lm import TrainConfig, build_lm, train_lm

CFG = TrainConfig(steps=12, batch_size=4, seq_len=16, warmup_steps=3, eval_every=6,
                  eval_batches=2, checkpoint_every=4, seed=5)


@pytest.fixture()
def stream():
    return torch.randint(1, 300, (4000,), generator=torch.Generator().manual_seed(0))


def test_checkpoint_reloads_to_identical_logits(tiny_tokenizer, stream, tmp_path):
    model = build_lm("test", tiny_tokenizer, seed=0)
    store = CheckpointStore(tmp_path, {"preset": "test"})
    train_lm(model, stream, stream, CFG, store=store, progress=False)
    assert store.steps() == [4, 8, 12]
    fresh = build_lm("test", tiny_tokenizer, seed=99)
    ckpt = CheckpointStore(tmp_path).load(model=fresh)
    assert ckpt.step == 12 and "val_loss" in ckpt.metadata
    x = stream[:64].view(2, 32)
    with torch.no_grad():
        assert torch.equal(model(x), fresh(x))


def test_interrupted_run_resumes_to_identical_weights(tiny_tokenizer, stream, tmp_path):
    straight = build_lm("test", tiny_tokenizer, seed=0)
    train_lm(straight, stream, stream, CFG, progress=False)

    store = CheckpointStore(tmp_path, {"preset": "test"})
    first = build_lm("test", tiny_tokenizer, seed=0)
    train_lm(first, stream, stream, CFG, store=store, progress=False, stop_after=6)
    assert store.latest_step() == 4  # the interruption lost steps 5-6, not the checkpoint
    resumed = build_lm("test", tiny_tokenizer, seed=123)  # weights come from the store
    result = train_lm(resumed, stream, stream, CFG, store=store, progress=False)
    assert result.resumed_from == 4 and result.steps == 12
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_store_of_another_config_is_refused(tiny_tokenizer, tmp_path):
    CheckpointStore(tmp_path, {"preset": "test", "vocab": 300})
    with pytest.raises(CheckpointError, match="another configuration.*vocab"):
        CheckpointStore(tmp_path, {"preset": "test", "vocab": 512})
    with pytest.raises(CheckpointError, match="does not exist"):
        CheckpointStore(tmp_path / "nope")


def test_checkpoint_of_other_shape_is_refused(tiny_tokenizer, shakespeare, tmp_path):
    small = build_lm("test", tiny_tokenizer)
    store = CheckpointStore(tmp_path, {"x": 1})
    store.save(small, 1)
    other = build_lm("tiny", tiny_tokenizer)
    with pytest.raises(CheckpointError, match="shape"):
        store.load(1, model=other)


def test_half_written_checkpoint_is_not_listed(tiny_tokenizer, tmp_path):
    store = CheckpointStore(tmp_path, {"x": 1})
    store.save(build_lm("test", tiny_tokenizer), 3)
    (tmp_path / "step-000007.safetensors").write_bytes(b"partial")  # sidecar never written
    assert store.steps() == [3]
    assert json.loads((tmp_path / "step-000003.json").read_text())["step"] == 3


# --------------------------------------------------------------------------- damaged stores


def _snapshot(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def _linear_store(tmp_path):
    from torch import nn

    torch.manual_seed(0)
    net = nn.Linear(3, 2)
    store = CheckpointStore(tmp_path, {"x": 1})
    store.save(net, 1)
    store.save(net, 2)
    return store, net


def _raises_naming(path, fn, match):
    before = _snapshot(path.parent)
    with pytest.raises(CheckpointError, match=match) as info:
        fn()
    assert str(path) in str(info.value)
    assert _snapshot(path.parent) == before


@pytest.mark.parametrize("content, problem", [
    (b"", "is empty"),
    (b'{"x": ', "not valid JSON"),
    (b"[1]", "not a dict"),
])
def test_damaged_store_manifest(tmp_path, content, problem):
    _linear_store(tmp_path)
    (tmp_path / "store.json").write_bytes(content)
    for identity in (None, {"x": 1}):
        _raises_naming(tmp_path / "store.json", lambda: CheckpointStore(tmp_path, identity),
                       problem)


@pytest.mark.parametrize("content, problem", [
    (b"", "is empty"),
    (b'{"step": 2, "rng_st', "not valid JSON"),
    (b'{"val_loss": 1.0}', "has no 'step' entry"),
    (b'{"step": 2, "rng_state": [1, 2, 3]}', "invalid 'rng_state'"),
])
def test_damaged_step_sidecar(tmp_path, content, problem):
    from torch import nn

    store, _ = _linear_store(tmp_path)
    sidecar = tmp_path / "step-000002.json"
    sidecar.write_bytes(content)
    target = nn.Linear(3, 2)
    weights = {k: v.clone() for k, v in target.state_dict().items()}
    _raises_naming(sidecar, lambda: store.load(model=target), problem)
    assert all(torch.equal(v, target.state_dict()[k]) for k, v in weights.items())
    if "rng_state" not in problem:
        _raises_naming(sidecar, lambda: store.metadata(2), problem)
    assert store.load(1).step == 1  # the earlier checkpoint still loads


@pytest.mark.parametrize("damage, problem", [
    (lambda b: b"", "is empty"),
    (lambda b: b[: len(b) // 2], "truncated"),
    (lambda b: b"\x00" * 40, "truncated or not a safetensors file"),
])
def test_damaged_step_weights(tmp_path, damage, problem):
    store, _ = _linear_store(tmp_path)
    weights = tmp_path / "step-000002.safetensors"
    weights.write_bytes(damage(weights.read_bytes()))
    _raises_naming(weights, lambda: store.load(), problem)
    _raises_naming(weights, lambda: store.load(2), "Delete both step-000002 files")


def test_optimizer_state_of_another_optimizer_is_explained(tmp_path):
    from torch import nn

    net = nn.Linear(3, 2)
    opt = torch.optim.AdamW(net.parameters())
    net(torch.randn(4, 3)).sum().backward()
    opt.step()
    store = CheckpointStore(tmp_path, {"x": 1})
    store.save(net, 1, optimizer=opt)
    two = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2))
    with pytest.raises(CheckpointError, match="does not fit this optimizer"):
        store.load(1, optimizer=torch.optim.AdamW(two.parameters()))
