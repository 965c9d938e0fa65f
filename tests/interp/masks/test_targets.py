"""Targets: which weights are maskable, that they are the ones the forward pass reads, and
where they sit in HF checkpoints."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from interp.errors import MaskError
from interp.masks import find_targets

BLOCKS = ["q", "k", "v", "o", "mlp_in", "mlp_out"]


def _tokens(vocab=97):
    return torch.randint(0, vocab, (2, 6), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family", ["native", "gpt2", "neox"])
def test_default_targets_are_attention_and_mlp_matrices(family, request):
    model = request.getfixturevalue({"native": "native_model"}.get(family, family))
    ts = find_targets(model)
    assert [t.name for t in ts[:6]] == [
        "blocks.0.attn.q", "blocks.0.attn.k", "blocks.0.attn.v", "blocks.0.attn.o",
        "blocks.0.mlp.in", "blocks.0.mlp.out",
    ]
    assert [t.block for t in ts] == BLOCKS * 2
    assert [t.layer for t in ts] == [0] * 6 + [1] * 6
    for t in ts:
        assert len(t.shape) == 2 and t.shape == tuple(t.weight.shape)
        assert t.param_name == "weight"
    # never embeddings, unembedding, norms or biases: exactly the 2-D attn/MLP weights
    n_heads, d_head = model.cfg.n_heads, model.cfg.d_head
    d_model, d_mlp = model.cfg.d_model, model.cfg.d_mlp
    expected = 2 * (4 * d_model * n_heads * d_head + 2 * d_model * d_mlp)
    assert sum(t.original.numel() for t in ts) == expected


@pytest.mark.parametrize("family", ["native", "gpt2", "neox"])
def test_targets_are_the_weights_the_forward_pass_reads(family, request):
    """Swapping a target's parameter for zeros changes the logits; for fused-QKV families,
    swapping the fused weight for zeros does not (it is not read)."""
    model = request.getfixturevalue({"native": "native_model"}.get(family, family))
    toks = _tokens(model.cfg.d_vocab)
    base = model(toks)
    for t in find_targets(model, ["blocks.0.attn.q", "blocks.1.mlp.out"]):
        orig = getattr(t.module, t.param_name)
        setattr(t.module, t.param_name, nn.Parameter(torch.zeros_like(orig)))
        try:
            assert not torch.allclose(model(toks), base, atol=1e-6), t.name
        finally:
            setattr(t.module, t.param_name, orig)
    qkv = getattr(model.blocks[0].attn, "qkv", None)
    if family != "native":
        fused = qkv.original_component
        orig = fused.weight
        fused.weight = nn.Parameter(torch.zeros_like(orig))
        try:
            torch.testing.assert_close(model(toks), base, rtol=0, atol=0)
        finally:
            fused.weight = orig


def test_hf_slices_match_the_hf_checkpoint(hf_gpt2_dir, hf_neox_dir, gpt2, neox):
    from transformers import GPT2LMHeadModel, GPTNeoXForCausalLM

    for model, cls, d in [(gpt2, GPT2LMHeadModel, hf_gpt2_dir),
                          (neox, GPTNeoXForCausalLM, hf_neox_dir)]:
        sd = cls.from_pretrained(d).state_dict()
        for t in find_targets(model):
            assert t.hf_name in sd, t.hf_name
            assert tuple(sd[t.hf_name].shape) == t.hf.shape
            torch.testing.assert_close(t.hf.take(sd[t.hf_name]), t.original.detach(),
                                       rtol=0, atol=0)


def test_fused_layouts(gpt2, neox):
    q = find_targets(gpt2, "blocks.1.attn.q")[0]
    assert q.hf_name == "transformer.h.1.attn.c_attn.weight"
    assert (q.hf.axis, q.hf.transposed, q.hf.index[:2]) == (1, True, (0, 1))
    v = find_targets(neox, "blocks.0.attn.v")[0]
    assert v.hf_name == "gpt_neox.layers.0.attention.query_key_value.weight"
    d_head = neox.cfg.d_head
    # per head h: rows [h*3*d_head + 2*d_head, h*3*d_head + 3*d_head) of query_key_value
    assert v.hf.index[:d_head] == tuple(range(2 * d_head, 3 * d_head))
    assert v.hf.index[d_head] == 3 * d_head + 2 * d_head
    # HF Conv1D weights are stored [in, out]
    assert [t.out_axis for t in find_targets(gpt2)[:6]] == [0, 0, 0, 1, 1, 1]
    assert all(t.out_axis == 0 for t in find_targets(neox))


def test_native_targets_have_no_hf_names(native_model):
    assert all(t.hf_name is None for t in find_targets(native_model))


def test_selection_by_name_and_pattern(native_model):
    names = [t.name for t in find_targets(native_model, ["blocks.*.mlp.*", "blocks.0.attn.o"])]
    assert names == ["blocks.0.attn.o", "blocks.0.mlp.in", "blocks.0.mlp.out",
                     "blocks.1.mlp.in", "blocks.1.mlp.out"]


def test_unknown_target_name_suggests(native_model):
    with pytest.raises(MaskError, match=r"blocks\.0\.mlp\.inn.*Did you mean: blocks\.0\.mlp\.in"):
        find_targets(native_model, ["blocks.0.mlp.inn"])
    with pytest.raises(MaskError, match="Unknown mask target"):
        find_targets(native_model, ["nothing.*"])


def test_custom_models_need_a_selection(conv_net):
    net = conv_net
    with pytest.raises(MaskError, match="include="):
        find_targets(net)
    by_dict = find_targets(net, {"conv": (net.conv, "weight")})
    assert by_dict[0].shape == (4, 1, 3, 3) and by_dict[0].module is net.conv
    assert by_dict[0].module_path == "conv"
    by_pred = find_targets(net, lambda name, p: name.endswith("weight"))
    assert [t.name for t in by_pred] == ["conv.weight", "head.weight"]
    assert [t.block for t in by_pred] == ["conv", "head"]
    with pytest.raises(MaskError, match="no tensor attribute"):
        find_targets(net, {"x": (net.conv, "nope")})
    with pytest.raises(MaskError, match="matched no weights"):
        find_targets(net, lambda name, p: False)
