"""load_hf_lm's failures: a directory that is no HF model, an unsupported architecture, and
running out of memory (never reported as "could not load")."""

from __future__ import annotations

import errno
import json

import pytest
import torch

from interp.errors import ModelLoadError
from interp.models.lm import load_hf_lm


def _snapshot(directory):
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _raises_naming(name, directory, fn, match, error=ModelLoadError):
    before = _snapshot(directory)
    with pytest.raises(error, match=match) as info:
        fn()
    assert name in str(info.value)
    assert _snapshot(directory) == before
    return str(info.value)


def test_directory_without_config_is_not_a_model(tmp_path):
    d = tmp_path / "weights-only"
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"x")
    _raises_naming(str(d), tmp_path, lambda: load_hf_lm(d), "no config.json")
    (d / "config.json").write_text('{"model_type": "gpt2", ')
    _raises_naming(str(d / "config.json"), tmp_path, lambda: load_hf_lm(d), "not valid JSON")
    _raises_naming(str(d / "model.safetensors"), tmp_path,
                   lambda: load_hf_lm(d / "model.safetensors"), "is a file")


def test_unsupported_architecture_names_it_and_the_families(tmp_path):
    d = tmp_path / "ctrl"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(
        {"model_type": "ctrl", "architectures": ["CTRLLMHeadModel"], "n_layer": 1}))
    msg = _raises_naming("CTRLLMHeadModel", tmp_path, lambda: load_hf_lm(d), "does not support")
    assert str(d) in msg and "GPT2LMHeadModel" in msg and "GPTNeoXForCausalLM" in msg


def test_unsupported_architecture_reported_by_the_bridge(monkeypatch):
    from transformer_lens.model_bridge import TransformerBridge

    def boot(*args, **kwargs):
        raise ValueError("Could not determine supported architecture from config. Available "
                         "architectures: ['GPT2LMHeadModel'], Config architectures: "
                         "['FooForCausalLM'], Model type: foo")

    monkeypatch.setattr(TransformerBridge, "boot_transformers", boot)
    with pytest.raises(ModelLoadError, match="FooForCausalLM.*'foo'.*does not support") as info:
        load_hf_lm("someone/foo-model")
    assert "GPT-NeoX / Pythia (GPTNeoXForCausalLM)" in str(info.value)


@pytest.mark.parametrize("oom", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    MemoryError(),
])
def test_out_of_memory_is_re_raised_with_advice(hf_gpt2_dir, monkeypatch, oom):
    from transformer_lens.model_bridge import TransformerBridge

    def boot(*args, **kwargs):
        raise oom

    monkeypatch.setattr(TransformerBridge, "boot_transformers", boot)
    with pytest.raises(type(oom)) as info:
        load_hf_lm(hf_gpt2_dir, dtype=torch.float32)
    assert info.value is oom and not isinstance(info.value, ModelLoadError)
    assert any("smaller dtype" in n for n in getattr(info.value, "__notes__", []))


@pytest.mark.parametrize("error", [
    OSError(errno.ENOMEM, "Cannot allocate memory"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate "
                 "memory: you tried to allocate 4000000000 bytes."),
])
def test_errors_caused_by_memory_say_the_model_does_not_fit(hf_gpt2_dir, monkeypatch, error):
    from transformer_lens.model_bridge import TransformerBridge

    def boot(*args, **kwargs):
        try:
            raise MemoryError() if isinstance(error, RuntimeError) else error
        except MemoryError as e:
            raise error from e

    monkeypatch.setattr(TransformerBridge, "boot_transformers", boot)
    with pytest.raises(ModelLoadError, match="does not fit in memory") as info:
        load_hf_lm(hf_gpt2_dir, dtype=torch.float32)
    msg = str(info.value)
    assert str(hf_gpt2_dir) in msg and "smaller dtype" in msg and "Could not load" not in msg


def test_hub_ids_with_dots_are_hub_ids(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as info:
        load_hf_lm("EleutherAI/pythia-1.4b-not-cached")
    assert "does not exist" not in str(info.value)
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_hf_lm("./no/such/dir.v2")
