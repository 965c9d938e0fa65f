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
