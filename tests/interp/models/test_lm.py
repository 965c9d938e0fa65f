import pytest
import torch

from interp.errors import InterpError, ModelLoadError
from interp.models.lm import build_lm, load_hf_lm, unigram_entropy


def test_tiny_lm_learns_below_unigram_entropy(shakespeare, trained_tiny):
    _, tok, tokens = shakespeare
    model, result = trained_tiny
    h1 = unigram_entropy(tokens.validation, len(tok))
    # A bigram-capable model should beat the unigram entropy by a wide margin.
    assert result.val_loss < h1 - 0.8, (result.val_loss, h1)
    assert result.history[0]["train_loss"] > result.history[-1]["train_loss"] + 1.0


def test_unigram_entropy_from_counts():
    tokens = torch.tensor([0, 0, 1, 1])
    assert unigram_entropy(tokens, 4) == pytest.approx(torch.log(torch.tensor(2.0)).item())


@pytest.mark.parametrize("family", ["gpt2", "neox"])
def test_hf_models_load_through_bridge_with_matching_logits(family, hf_gpt2_dir, hf_neox_dir):
    from transformers import AutoModelForCausalLM

    path = hf_gpt2_dir if family == "gpt2" else hf_neox_dir
    hf = AutoModelForCausalLM.from_pretrained(path).eval()
    bridge = load_hf_lm(path)
    tokens = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(bridge(tokens), hf(tokens).logits, atol=1e-4, rtol=0)


def test_native_build_is_seeded(tiny_tokenizer):
    a, b = build_lm("test", tiny_tokenizer, seed=1), build_lm("test", tiny_tokenizer, seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    with pytest.raises(InterpError, match="tiny"):
        build_lm("tiyn", tiny_tokenizer)


def test_hub_id_without_network_is_explained(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="local directory"):
        load_hf_lm("EleutherAI/pythia-14m-not-cached")
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_hf_lm(str(tmp_path / "no-such-model"))


def test_small_corpus_schedule_says_epochs_and_warns_on_rising_validation_loss(
        tiny_tokenizer, caplog):
    """A user's tiny corpus: the schedule's passes over it are reported and warned about,
    and the first evaluation whose validation loss rises is named (overfitting)."""
    from interp.models.lm import TrainConfig, _overfit_step, train_lm

    gen = torch.Generator().manual_seed(0)
    train = torch.randint(0, len(tiny_tokenizer), (600,), generator=gen)  # noise: nothing to learn
    val = torch.randint(0, len(tiny_tokenizer), (600,), generator=gen)
    model = build_lm("test", tiny_tokenizer, seed=0)
    cfg = TrainConfig(steps=40, batch_size=4, seq_len=32, lr=1e-2, warmup_steps=2,
                      eval_every=10, eval_batches=2, checkpoint_every=40)
    assert cfg.epochs(600) == pytest.approx(40 * 4 * 32 / 600)
    with caplog.at_level("WARNING", logger="interp.models.lm"):
        res = train_lm(model, train, val, cfg, progress=False)
    assert res.epochs == pytest.approx(cfg.epochs(600))
    assert f"{res.epochs:.1f} passes over the 600 training tokens" in caplog.text
    vals = [(r["step"], r["val_loss"]) for r in res.history if "val_loss" in r]
    # memorising noise: held-out loss rises after the first evaluation (seeded, so exactly)
    assert res.overfit_step == _overfit_step(res.history) == 20
    assert vals[1][1] > vals[0][1]
    assert "Validation loss rose at step 20" in caplog.text
    # the rule itself, on a hand-made history
    hist = [{"step": 10, "val_loss": 5.0}, {"step": 20, "val_loss": 4.0}, {"step": 25},
            {"step": 30, "val_loss": 4.5}, {"step": 40, "val_loss": 3.0}]
    assert _overfit_step(hist) == 30 and _overfit_step(hist[:2]) is None


@pytest.mark.parametrize("field,value", [("steps", 0), ("batch_size", -1), ("lr", 0.0),
                                         ("seq_len", 1), ("min_lr_ratio", 2.0)])
def test_train_config_rejects_values_that_make_no_sense(field, value):
    from interp.errors import ConfigError
    from interp.models.lm import TrainConfig

    with pytest.raises(ConfigError, match=field):
        TrainConfig(**{field: value}).validate()


def test_sequences_longer_than_the_context_are_refused_before_training(tiny_tokenizer):
    from interp.errors import ConfigError
    from interp.models.lm import TrainConfig, train_lm

    model = build_lm("test", tiny_tokenizer, seed=0)  # n_ctx 64
    tokens = torch.zeros(1000, dtype=torch.long)
    with pytest.raises(ConfigError, match="seq_len 128 is longer than the model's context"):
        train_lm(model, tokens, tokens, TrainConfig(steps=1, seq_len=128), progress=False)
