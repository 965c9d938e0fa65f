"""Shared fixtures: a tiny offline tokenizer, native bridge and tiny random HF models on disk."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import sys

# Shape and type annotations are checked at run time in the tests: jaxtyping's import hook
# wraps every function and dataclass of interp and analyses in beartype, so a wrong shape,
# dtype or type fails the test that produced it. It must be installed before any project
# module is imported (this file is the first thing pytest loads). The PEP 484 numeric tower
# lets an int pass where a float is annotated, as static checkers do. (jaxtyping's own
# --jaxtyping-packages option cannot take this typechecker: it mis-splits the comma-separated
# value when the typechecker has arguments.) INTERP_TYPECHECK=0 turns it off to compare timings.
if os.environ.get("INTERP_TYPECHECK", "1") != "0":
    _imported = sorted(m for m in sys.modules if m.split(".")[0] in ("interp", "analyses"))
    if _imported:
        raise RuntimeError(f"{_imported[0]} was imported before tests/conftest.py installed the "
                           "jaxtyping import hook; its annotations would not be checked.")
    from jaxtyping import install_import_hook

    install_import_hook(
        ["interp", "analyses"],
        "beartype.beartype(conf=beartype.BeartypeConf(is_pep484_tower=True))",
    )

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


@pytest.fixture()
def unchecked():
    """A context manager that switches the run-time type checks off, for a test that passes
    an ill-typed value on purpose to see the library's own error message (which a user
    without the checker gets)."""
    import contextlib

    from jaxtyping import config

    @contextlib.contextmanager
    def off():
        old = config.jaxtyping_disable
        config.update("jaxtyping_disable", True)
        try:
            yield
        finally:
            config.update("jaxtyping_disable", old)

    return off


@pytest.fixture()
def token_batches():
    """``token_batches(vocab, n, batch, pos, seed)``: a list of seeded random token tensors."""

    def make(vocab: int, n: int = 2, batch: int = 3, pos: int = 16, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        return [torch.randint(0, vocab, (batch, pos), generator=gen) for _ in range(n)]

    return make


class FlushProbe:
    """Sets flush-to-zero (``interp.numerics.set_flush_denormal``) and checks it on every
    torch thread: ``n_flushed()`` counts how many of ``N`` float32 subnormals times one come
    out as zero (an elementwise op this large is split over all of torch's threads)."""

    N = 1 << 20
    BITS = 0x000116C2  # the float32 subnormal nearest 1e-40 (smallest normal: 1.18e-38)

    def __init__(self):
        from interp.numerics import set_flush_denormal

        self.set = set_flush_denormal
        # made from bits: torch.full((N,), 1e-40) stores zeros when the calling thread flushes
        self.subnormals = torch.full((self.N,), self.BITS, dtype=torch.int32).view(torch.float32)

    def n_flushed(self) -> int:
        return int(((self.subnormals * 1.0) == 0).sum())

    def everywhere(self) -> bool:
        """Whether every thread flushes."""
        return self.n_flushed() == self.N

    def nowhere(self) -> bool:
        return self.n_flushed() == 0


@pytest.fixture()
def flush():
    """A :class:`FlushProbe`, for tests that change the flush-to-zero setting.

    Skips where the CPU cannot flush subnormals; afterwards restores the setting (on every
    torch thread) and torch's thread count as they were before the test.
    """
    probe = FlushProbe()
    threads = torch.get_num_threads()
    before = probe.everywhere()
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush subnormal floats to zero")
    probe.set(before)
    yield probe
    probe.set(before)
    torch.set_num_threads(threads)
    probe.set(before)  # the pool may have changed size: set it again


@pytest.fixture(scope="session")
def small_corpus_file(tmp_path_factory):
    """About 150 kB of the built-in Shakespeare as one UTF-8 text file (a user's corpus)."""
    from interp.data.text import builtin_corpus

    text = "\n".join(builtin_corpus().train)[:150_000]
    path = tmp_path_factory.mktemp("corpus") / "plays.txt"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture()
def small_study(small_corpus_file):
    """``small_study(out, **overrides)``: a bigram-study config on the small corpus, small
    enough to run end to end in well under a minute."""
    from analyses.studies.bigram import BigramStudyConfig

    def make(out, **overrides):
        base = dict(out=str(out), corpus=str(small_corpus_file), model="test", vocab_size=300,
                    seq_len=64, lm_steps=60, lm_checkpoint_every=30, lm_batch=8, mask_steps=30,
                    mask_batch=8, lambdas=(0.0, 1.0), eval_sequences=8, residual_sequences=8,
                    checkpoint_steps=(30,), random_init_control=False)
        return BigramStudyConfig.from_recipe("mini", **{**base, **overrides})

    return make


@pytest.fixture(scope="module")
def one_thread():
    """Tiny ops run many times faster on one torch thread when the cores are shared."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
