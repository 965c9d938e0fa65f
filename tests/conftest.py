"""Shared fixtures: a tiny offline tokenizer, native bridge and tiny random HF models on disk."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

TEXT = (
    "When shall we three meet again in thunder, lightning, or in rain? "
    "When the hurlyburly's done, when the battle's lost and won. "
    "That will be ere the set of sun. Fair is foul, and foul is fair. "
) * 20


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    """A byte-level BPE with a 300-token vocabulary, saved and reloaded as TL requires."""
    from interp.data.text import train_tokenizer

    return train_tokenizer([TEXT], vocab_size=300, out_dir=tmp_path_factory.mktemp("tok"))


@pytest.fixture()
def native_model(tiny_tokenizer):
    """A 2-layer d_model=32 native TransformerBridge (fresh per test)."""
    from interp.models.lm import build_lm

    return build_lm("test", tokenizer=tiny_tokenizer, seed=0)


def _save_hf(model, path):
    model.eval()
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def hf_gpt2_dir(tmp_path_factory):
    """A tiny random GPT-2 saved with save_pretrained (no network)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=97, n_positions=64, n_embd=32, n_layer=2, n_head=4)
    return _save_hf(GPT2LMHeadModel(cfg), tmp_path_factory.mktemp("gpt2"))


@pytest.fixture(scope="session")
def hf_neox_dir(tmp_path_factory):
    """A tiny random GPT-NeoX (Pythia family) saved with save_pretrained (no network)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    cfg = GPTNeoXConfig(
        vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64,
    )
    return _save_hf(GPTNeoXForCausalLM(cfg), tmp_path_factory.mktemp("neox"))


@pytest.fixture(scope="session")
def shakespeare(tmp_path_factory):
    """The built-in corpus with a 512-token BPE, tokenized (shared across the session)."""
    from interp.data.text import builtin_corpus, tokenize_corpus, train_tokenizer

    corpus = builtin_corpus()
    root = tmp_path_factory.mktemp("shakespeare")
    tok = train_tokenizer(corpus, vocab_size=512, out_dir=root / "tokenizer")
    return corpus, tok, tokenize_corpus(corpus, tok, cache_dir=root / "cache")


@pytest.fixture(scope="session")
def trained_tiny(shakespeare):
    """The tiny preset trained for 300 steps on the built-in corpus (about 30 s on 2 cores)."""
    from interp.models.lm import TrainConfig, build_lm, train_lm

    _, tok, tokens = shakespeare
    model = build_lm("tiny", tok, seed=0)
    cfg = TrainConfig(steps=300, batch_size=16, seq_len=64, warmup_steps=30, eval_every=300,
                      eval_batches=10, seed=0)
    result = train_lm(model, tokens.train, tokens.validation, cfg, progress=False)
    model.eval()
    return model, result


@pytest.fixture()
def conv_net():
    """A HookedRootModule with a conv kernel: the kind of model image studies use."""
    from torch import nn
    from transformer_lens import HookedRootModule
    from transformer_lens.hook_points import HookPoint

    class TinyConvNet(HookedRootModule):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)
            self.hook_conv = HookPoint()
            self.head = nn.Linear(4, 2)
            self.setup()

        def forward(self, x):
            return self.head(self.hook_conv(self.conv(x)).mean((-1, -2)))

    return TinyConvNet()


@pytest.fixture(scope="module")
def gpt2(hf_gpt2_dir):
    """The tiny GPT-2 through TransformerBridge (one per test module)."""
    from interp.models.lm import load_hf_lm

    return load_hf_lm(hf_gpt2_dir)


@pytest.fixture(scope="module")
def neox(hf_neox_dir):
    """The tiny GPT-NeoX through TransformerBridge (one per test module)."""
    from interp.models.lm import load_hf_lm

    return load_hf_lm(hf_neox_dir)
