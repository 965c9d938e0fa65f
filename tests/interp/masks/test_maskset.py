"""MaskSet: attach/detach exactness, modes against HF ground truth, head and neuron edits,
gradients, algebra, random masks, save/load and the bigram paper's pickle format."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from interp.errors import MaskError
from interp.masks import (
    ContinuousSparsification,
    HardConcrete,
    MaskSet,
    find_targets,
    load_paper_masks,
)
from interp.models.lm import LMConfig, build_lm, load_hf_lm


def _model(family, request):
    return request.getfixturevalue("native_model" if family == "native" else family)


def _tokens(model):
    return torch.randint(0, model.cfg.d_vocab, (2, 7), generator=torch.Generator().manual_seed(1))


def _randomize(ms: MaskSet, seed: int) -> MaskSet:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lg in ms.parameters():
            lg.copy_(torch.randn(lg.shape, generator=gen))
    return ms


def _hf(family, d):
    from transformers import GPT2LMHeadModel, GPTNeoXForCausalLM

    cls = GPT2LMHeadModel if family == "gpt2" else GPTNeoXForCausalLM
    return cls.from_pretrained(d).eval()


def _no_parametrizations(model) -> bool:
    return not any(parametrize.is_parametrized(m) for m in model.modules())


# --------------------------------------------------------------------------- attach / detach


@pytest.mark.parametrize("family", ["native", "gpt2", "neox"])
@pytest.mark.parametrize("kind", [ContinuousSparsification(), HardConcrete()])
def test_all_ones_mask_is_the_model_and_detach_is_exact(family, kind, request):
    model = _model(family, request)
    toks = _tokens(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = {n: p for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in params.items()}
    base = model(toks)
    ms = MaskSet.full(model, kind=kind)
    with ms.applied(model, "keep"):
        assert ms.attached and not _no_parametrizations(model)
        torch.testing.assert_close(model(toks), base, rtol=0, atol=1e-5)
    assert not ms.attached and _no_parametrizations(model)
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert {n: p for n, p in model.named_parameters()}.keys() == params.keys()
    assert all(p is params[n] for n, p in model.named_parameters())
    assert all(p.requires_grad == flags[n] for n, p in model.named_parameters())
    assert all(type(t.module) in (nn.Linear,) or type(t.module).__name__ == "Conv1D"
               for t in ms.targets)
    torch.testing.assert_close(model(toks), base, rtol=0, atol=0)


def test_detach_on_exception_and_double_attach(native_model):
    ms = MaskSet.full(native_model)
    with pytest.raises(RuntimeError, match="boom"), ms.applied(native_model, "ablate"):
        raise RuntimeError("boom")
    assert not ms.attached and _no_parametrizations(native_model) and ms.mode == "soft"
    ms.attach(native_model)
    try:
        with pytest.raises(MaskError, match="already attached"):
            ms.attach(native_model)
        other = MaskSet.full(native_model)
        with pytest.raises(MaskError, match="already parametrized"):
            other.attach(native_model)
        assert not other.attached
    finally:
        ms.detach()
    assert _no_parametrizations(native_model)


def test_modes_soft_off_and_using(native_model):
    ms = MaskSet.for_model(native_model)  # continuous sparsification: logits 0, soft = 0.5
    t = ms.targets[0]
    w = t.original.detach().clone()
    with ms.applied(native_model, "soft"):
        torch.testing.assert_close(t.weight, 0.5 * w)
        with ms.using("off"):
            assert torch.equal(t.weight, w)
        with ms.using("keep"):  # logits 0 -> hard mask False everywhere
            assert torch.equal(t.weight, torch.zeros_like(w))
        assert ms.mode == "soft"
    with pytest.raises(MaskError, match="Unknown mask mode.*Did you mean: soft"):
        ms.mode = "sfot"
    with pytest.raises(MaskError, match="use 'keep'"):
        ms.mode = "hard"  # the old synonym of keep


def test_attach_to_another_instance_of_the_same_model(tiny_tokenizer):
    a = build_lm("test", tokenizer=tiny_tokenizer, seed=0)
    b = build_lm("test", tokenizer=tiny_tokenizer, seed=0)
    toks = _tokens(a)
    ms = _randomize(MaskSet.for_model(a), 3)
    with ms.applied(a, "keep"):
        out_a = a(toks)
    with ms.applied(b, "keep"):
        out_b = b(toks)
        assert _no_parametrizations(a)
    torch.testing.assert_close(out_a, out_b, rtol=0, atol=0)
    assert _no_parametrizations(b)


# --------------------------------------------------------------------------- ground truth


def test_ablate_native_equals_zeroed_weight(native_model):
    toks = _tokens(native_model)
    ms = MaskSet.empty(native_model).set_target("blocks.0.mlp.in", True)
    with ms.applied(native_model, "ablate"):
        ablated = native_model(toks)
    t = ms.target("blocks.0.mlp.in")
    w = t.module.weight
    with torch.no_grad():
        saved = w.clone()
        w.zero_()
        try:
            expected = native_model(toks)
        finally:
            w.copy_(saved)
    torch.testing.assert_close(ablated, expected, rtol=0, atol=1e-5)


def test_ablate_neox_head_equals_zeroed_hf_rows(neox, hf_neox_dir):
    """Removing head 2's query and layer 1's MLP-in through the mask == zeroing the
    corresponding interleaved rows of query_key_value / dense_h_to_4h in HF."""
    toks = _tokens(neox)
    dh = neox.cfg.d_head
    ms = MaskSet.empty(neox).set_head(0, 2, True, which="q").set_target("blocks.1.mlp.in", True)
    with ms.applied(neox, "ablate"):
        ablated = neox(toks)
    hf = _hf("neox", hf_neox_dir)
    with torch.no_grad():
        hf.gpt_neox.layers[0].attention.query_key_value.weight[2 * 3 * dh: 2 * 3 * dh + dh] = 0
        hf.gpt_neox.layers[1].mlp.dense_h_to_4h.weight.zero_()
    torch.testing.assert_close(ablated, hf(toks).logits, rtol=0, atol=1e-5)


def test_ablate_gpt2_head_and_neurons_equal_zeroed_hf(gpt2, hf_gpt2_dir):
    """Head 1 of layer 0 (q, k, v columns of c_attn; rows of c_proj) and MLP neurons 3 and 5
    of layer 1 (c_fc columns, c_proj rows), removed through the mask and in HF."""
    toks = _tokens(gpt2)
    d, dh = gpt2.cfg.d_model, gpt2.cfg.d_head
    ms = MaskSet.empty(gpt2).set_head(0, 1, True).set_neuron(1, [3, 5], True)
    with ms.applied(gpt2, "ablate"):
        ablated = gpt2(toks)
    hf = _hf("gpt2", hf_gpt2_dir)
    cols = torch.cat([torch.arange(j * d + dh, j * d + 2 * dh) for j in range(3)])
    with torch.no_grad():
        hf.transformer.h[0].attn.c_attn.weight[:, cols] = 0
        hf.transformer.h[0].attn.c_proj.weight[dh: 2 * dh, :] = 0
        hf.transformer.h[1].mlp.c_fc.weight[:, [3, 5]] = 0
        hf.transformer.h[1].mlp.c_proj.weight[[3, 5], :] = 0
    torch.testing.assert_close(ablated, hf(toks).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["native", "gpt2", "neox"])
def test_set_head_changes_exactly_that_head(family, request):
    model = _model(family, request)
    toks = _tokens(model)
    layer, head = 1, 2
    names = [f"blocks.{layer}.attn.hook_{x}" for x in "qkv"]
    _, base = model.run_with_cache(toks, names_filter=lambda n: n in names)
    W_O = model.blocks[layer].attn.W_O.detach().clone()
    ms = MaskSet.full(model).set_head(layer, head, False)
    with ms.applied(model, "keep"):
        _, cache = model.run_with_cache(toks, names_filter=lambda n: n in names)
        masked_W_O = model.blocks[layer].attn.W_O.detach().clone()
    others = [h for h in range(model.cfg.n_heads) if h != head]
    for name in names:
        a, b = base[name], cache[name]
        assert a.shape == (2, 7, model.cfg.n_heads, model.cfg.d_head), name
        assert not torch.allclose(a[:, :, head], b[:, :, head]), name
        torch.testing.assert_close(a[:, :, others], b[:, :, others], rtol=0, atol=1e-6)
    assert torch.all(masked_W_O[head] == 0)
    assert torch.equal(masked_W_O[others], W_O[others])
    kept = ms.counts()[layer]
    n = model.cfg.d_model * model.cfg.d_head
    assert kept["q"] == kept["o"] == model.cfg.d_model * model.cfg.n_heads * model.cfg.d_head - n


def test_set_neuron_and_layer(native_model):
    ms = MaskSet.full(native_model).set_neuron(0, 7, False)
    masks = ms.hard_masks()
    assert not masks["blocks.0.mlp.in"][7].any() and masks["blocks.0.mlp.in"][6].all()
    assert not masks["blocks.0.mlp.out"][:, 7].any() and masks["blocks.0.mlp.out"][:, 6].all()
    with ms.applied(native_model, "keep"):
        assert torch.all(native_model.blocks[0].mlp.W_in[:, 7] == 0)
    ms.set_layer(1, False)
    counts = ms.counts()
    assert all(v == 0 for v in counts[1].values())
    assert counts[0]["mlp_in"] == 63 * 32 and counts[0]["q"] == 32 * 32
    with pytest.raises(MaskError, match="out of range"):
        ms.set_neuron(0, 64, False)
    with pytest.raises(MaskError, match="out of range"):
        ms.set_head(0, 4, False)
    with pytest.raises(MaskError, match="layers are"):
        ms.set_layer(5, True)


# --------------------------------------------------------------------------- training hooks


def test_gradients_reach_only_mask_logits(native_model):
    toks = _tokens(native_model)
    ms = MaskSet.for_model(native_model)
    with ms.applied(native_model, "soft"):
        loss = native_model(toks).logsumexp(-1).mean() + 1e-3 * ms.penalty()
        loss.backward()
        assert all(not p.requires_grad for p in native_model.parameters())
    assert all(p.grad is None for p in native_model.parameters())
    assert all(p.requires_grad for p in native_model.parameters())  # flags restored
    grads = [lg.grad for lg in ms.parameters()]
    assert len(grads) == 12 and all(g is not None and g.abs().sum() > 0 for g in grads)
    assert {id(p) for p in ms.parameters()} == {id(p) for p in ms.logits.values()}


def test_exact_zeros_are_forced_out(native_model):
    t = find_targets(native_model, "blocks.0.mlp.in")[0]
    with torch.no_grad():
        t.module.weight[3, 4] = 0.0
    ms = MaskSet.full(native_model)
    total = sum(t.original.numel() for t in ms.targets)
    assert ms.n_weights == total - 1
    assert not ms.allowed["blocks.0.mlp.in"][3, 4]
    assert not ms.hard_masks()["blocks.0.mlp.in"][3, 4]
    assert ms.active_fraction() == 1.0
    assert not ms.random_like(0).hard_masks()["blocks.0.mlp.in"][3, 4]
    assert (~ms).active_fraction() == 0.0
    with ms.applied(native_model, "ablate"), torch.no_grad():
        assert native_model.blocks[0].mlp.W_in[4, 3] == 0
    assert not any(p.requires_grad for p in ms._allowed.buffers())


# --------------------------------------------------------------------------- algebra, counts


def test_algebra_identities(native_model):
    a = _randomize(MaskSet.for_model(native_model), 0)
    b = _randomize(MaskSet.for_model(native_model), 1)
    A, B = a.hard_masks(), b.hard_masks()

    def eq(x, y):
        return all(torch.equal(x[n], y[n]) for n in x)

    assert eq((a | b).hard_masks(), {n: A[n] | B[n] for n in A})
    assert eq((a & b).hard_masks(), {n: A[n] & B[n] for n in A})
    assert eq((a - b).hard_masks(), (a & ~b).hard_masks())
    assert eq((~~a).hard_masks(), A)
    assert eq((~(a | b)).hard_masks(), (~a & ~b).hard_masks())
    assert (a | ~a).active_fraction() == 1.0 and (a & ~a).active_fraction() == 0.0
    assert eq(a.hardened().hard_masks(), A)
    union = a | b
    assert isinstance(union, MaskSet) and union.names == a.names
    with union.applied(native_model, "keep"):  # results are usable everywhere
        native_model(_tokens(native_model))
        with union.applied(native_model, "ablate"):  # nested: switches the mode only
            assert union.mode == "ablate"
        assert union.mode == "keep" and union.attached
    other = MaskSet.for_model(native_model, targets=["blocks.0.*"])
    with pytest.raises(MaskError, match="different targets"):
        a | other


def test_random_like_keeps_counts_and_is_seeded(native_model):
    a = _randomize(MaskSet.for_model(native_model), 0)
    r1, r2, r3 = a.random_like(5), a.random_like(5), a.random_like(6)
    assert [r["kept"] for r in r1.table()] == [r["kept"] for r in a.table()]
    assert r1.counts() == a.counts()
    assert all(torch.equal(x, y) for x, y in zip(r1.hard_masks().values(),
                                                 r2.hard_masks().values()))
    assert any(not torch.equal(x, y) for x, y in zip(r1.hard_masks().values(),
                                                     r3.hard_masks().values()))
    assert any(not torch.equal(x, y) for x, y in zip(r1.hard_masks().values(),
                                                     a.hard_masks().values()))


def test_counts_table_and_reprs(native_model):
    ms = MaskSet.full(native_model).set_layer(0, False)
    rows = ms.table()
    assert [(r["layer"], r["block"]) for r in rows[:2]] == [(0, "q"), (0, "k")]
    assert rows[-1] == {"name": "blocks.1.mlp.out", "layer": 1, "block": "mlp_out",
                        "kept": 2048, "total": 2048, "fraction": 1.0}
    assert ms.active_fraction() == pytest.approx(0.5)
    text = ms.summary()
    assert "mlp_in" in text and "50.00%" in text and repr(ms) == text
    page = ms._repr_html_()
    assert page.count("<tr>") == 3 and "100.0%" in page and "0 (0.0%)" in page


# --------------------------------------------------------------------------- files


def test_save_load_round_trip(native_model, tmp_path):
    kind = ContinuousSparsification(temperature_factor=1.5)
    ms = _randomize(MaskSet.for_model(native_model, kind=kind), 2)
    kind.step()
    ms.metadata["note"] = "x"
    ms.objective, ms.lam = "bigram", 5.0
    path = ms.save(tmp_path / "masks")
    assert path.name == "masks.safetensors" and (tmp_path / "masks.json").exists()
    assert sorted(os.listdir(tmp_path)) == ["masks.json", "masks.safetensors"]
    side = json.loads((tmp_path / "masks.json").read_text())
    assert side["model"]["d_model"] == 32 and side["targets"][4]["shape"] == [64, 32]
    assert side["objective"] == "bigram" and side["lambda"] == 5.0
    back = MaskSet.load(path, native_model)
    assert back.names == ms.names and back.kind.config() == ms.kind.config()
    assert back.kind.temperature == pytest.approx(1.5)
    assert (back.objective, back.lam) == ("bigram", 5.0)
    assert back.metadata == {"objective": "bigram", "lambda": 5.0, "note": "x"}
    assert all(torch.equal(back.logits[n], ms.logits[n]) for n in ms.names)
    assert all(torch.equal(back.allowed[n], ms.allowed[n]) for n in ms.names)


def test_load_without_model_binds_at_attach(native_model, tmp_path):
    with torch.no_grad():
        find_targets(native_model, "blocks.1.attn.v")[0].module.weight[0, 0] = 0.0
    ms = _randomize(MaskSet.for_model(native_model), 7)
    path = ms.save(tmp_path / "m")
    unbound = MaskSet.load(path)
    assert unbound.counts() == ms.counts() and unbound.heads == ms.heads
    assert unbound.n_weights == ms.n_weights
    assert not unbound.eligible_masks()["blocks.1.attn.v"][0, 0]
    edited = unbound.random_like(1).set_head(0, 1, False)
    assert edited.counts()[0]["q"] < ms.counts()[0]["q"]
    toks = _tokens(native_model)
    with ms.applied(native_model, "keep"):
        expected = native_model(toks)
    with unbound.applied(native_model, "keep"):
        torch.testing.assert_close(native_model(toks), expected, rtol=0, atol=0)
    assert _no_parametrizations(native_model)
    with pytest.raises(MaskError, match="not bound to a model"):
        unbound.export_paper(tmp_path / "x.pkl")
    with pytest.raises(MaskError, match="not bound to a model"):
        _ = unbound.targets[0].original


def test_load_for_another_model_names_the_weight(native_model, tiny_tokenizer, tmp_path):
    path = MaskSet.full(native_model).save(tmp_path / "m.safetensors")
    wider = build_lm(LMConfig(n_layers=2, d_model=32, n_heads=4, d_mlp=48, n_ctx=64),
                     tokenizer=tiny_tokenizer)
    with pytest.raises(MaskError, match=r"'blocks\.0\.mlp\.in'.*\(48, 32\).*\(64, 32\)"):
        MaskSet.load(path, wider)


def test_custom_module_masks_and_files(tmp_path, conv_net):
    torch.manual_seed(0)
    net = conv_net
    x = torch.randn(2, 1, 6, 6)
    base = net(x)
    ms = MaskSet.empty(net, targets={"conv": (net.conv, "weight")})
    assert ms.heads is None and ms.identity == {}
    with ms.applied(net, "ablate"):
        torch.testing.assert_close(net(x), base)
    with ms.applied(net, "keep"):
        assert torch.all(net.conv.weight == 0)
        _, cache = net.run_with_cache(x)
        assert torch.allclose(cache["hook_conv"], net.conv.bias[None, :, None, None].expand(
            2, 4, 4, 4))
    path = _randomize(ms, 0).save(tmp_path / "conv")
    back = MaskSet.load(path, net)
    assert back.names == ["conv"] and torch.equal(back.logits["conv"], ms.logits["conv"])
    with pytest.raises(MaskError, match="head layout"):
        ms.set_head(0, 0, False)


@pytest.mark.parametrize("family", ["gpt2", "neox"])
def test_paper_format_round_trip(family, request, tmp_path):
    model = _model(family, request)
    ms = _randomize(MaskSet.for_model(model), 4).set_head(0, 1, False, which="q")
    path = ms.export_paper(tmp_path / "mask.pkl", orig_model_name="test/model")
    data = load_paper_masks(path)
    assert data["orig_model_name"] == "test/model"
    dh, n = model.cfg.d_head, model.cfg.n_heads
    if family == "neox":
        fused = data["gpt_neox.layers.0.attention.query_key_value.weight"]
        assert fused.shape == (3 * n * dh, n * dh) and fused.dtype == np.bool_
        assert not fused[3 * dh: 4 * dh].any()  # head 1's q rows, interleaved layout
        assert fused[4 * dh: 6 * dh].any()      # head 1's k and v rows
    else:
        fused = data["transformer.h.0.attn.c_attn.weight"]
        assert fused.shape == (n * dh, 3 * n * dh)  # Conv1D [in, out]
        assert not fused[:, dh: 2 * dh].any() and fused[:, n * dh + dh: n * dh + 2 * dh].any()
    assert len(data) == 1 + 4 * model.cfg.n_layers
    back = MaskSet.import_paper(path, model)
    assert back.metadata["orig_model_name"] == "test/model"
    assert all(torch.equal(back.hard_masks()[k], v) for k, v in ms.hard_masks().items())
    back2 = MaskSet.import_paper(data, model)  # an in-memory dict works too
    assert back2.counts() == ms.counts()


@pytest.mark.parametrize("family", ["gpt2", "neox"])
def test_paper_import_of_hf_layout_mask_equals_zeroed_hf(family, request, hf_gpt2_dir,
                                                          hf_neox_dir, tmp_path):
    """A mask written by hand in HF layout (what the paper releases), imported and applied,
    gives the HF model with those weights zeroed."""
    model = _model(family, request)
    hf = _hf(family, hf_gpt2_dir if family == "gpt2" else hf_neox_dir)
    dh, d = model.cfg.d_head, model.cfg.d_model
    names = {t.hf_name for t in find_targets(model)}
    data = {k: np.ones(tuple(v.shape), bool) for k, v in hf.state_dict().items() if k in names}
    assert len(data) == 4 * model.cfg.n_layers
    if family == "neox":
        key = "gpt_neox.layers.1.attention.query_key_value.weight"
        rows = [3 * 3 * dh + j * dh + i for j in (0, 2) for i in range(dh)]  # head 3: q and v
        data[key][rows] = False
        data["gpt_neox.layers.0.mlp.dense_4h_to_h.weight"][:, :5] = False
        with torch.no_grad():
            hf.gpt_neox.layers[1].attention.query_key_value.weight[rows] = 0
            hf.gpt_neox.layers[0].mlp.dense_4h_to_h.weight[:, :5] = 0
    else:
        key = "transformer.h.1.attn.c_attn.weight"
        cols = [j * d + 3 * dh + i for j in (1, 2) for i in range(dh)]  # head 3: k and v
        data[key][:, cols] = False
        data["transformer.h.0.mlp.c_proj.weight"][:5] = False
        with torch.no_grad():
            hf.transformer.h[1].attn.c_attn.weight[:, cols] = 0
            hf.transformer.h[0].mlp.c_proj.weight[:5] = 0
    path = tmp_path / "paper.pkl"
    path.write_bytes(pickle.dumps({**data, "orig_model_name": "x"}))
    ms = MaskSet.import_paper(path, model)
    assert ms.counts()[1]["q" if family == "gpt2" else "k"] == d * d
    assert ms.counts()[1]["v"] == d * d - dh * d
    toks = _tokens(model)
    with ms.applied(model, "keep"):
        torch.testing.assert_close(model(toks), hf(toks).logits, rtol=0, atol=1e-5)


def test_paper_import_for_another_model_names_the_weight(neox, tmp_path):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    cfg = GPTNeoXConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=48, max_position_embeddings=64)
    GPTNeoXForCausalLM(cfg).save_pretrained(tmp_path / "other")
    other = load_hf_lm(tmp_path / "other")
    path = MaskSet.full(other).export_paper(tmp_path / "other.pkl")
    with pytest.raises(MaskError, match=r"gpt_neox\.layers\.0\.mlp\.dense_h_to_4h\.weight.*"
                                        r"\(64, 32\).*\(48, 32\)"):
        MaskSet.import_paper(path, neox)
    data = load_paper_masks(MaskSet.full(neox).export_paper(tmp_path / "n.pkl"))
    data["gpt_neox.layers.2.attention.dense.weight"] = np.ones((32, 32), bool)
    with pytest.raises(MaskError, match="layers.2.*matches no maskable weight"):
        MaskSet.import_paper(data, neox)
    del data["gpt_neox.layers.2.attention.dense.weight"]
    del data["gpt_neox.layers.1.attention.dense.weight"]
    with pytest.raises(MaskError, match="no entry for 'gpt_neox.layers.1.attention.dense"):
        MaskSet.import_paper(data, neox)


def test_paper_export_needs_hf_names(native_model, tmp_path):
    with pytest.raises(MaskError, match="no HF parameter name"):
        MaskSet.full(native_model).export_paper(tmp_path / "x.pkl")


def _write_marker(path):  # a "function that writes a file", referenced by a pickle
    with open(path, "w") as f:
        f.write("pwned")


class _SystemCall:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _FileWriter:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return _write_marker, (self.marker,)


class _Exec:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('x')",)


@pytest.mark.parametrize("payload", [_SystemCall, _FileWriter, _Exec])
def test_malicious_pickles_are_refused_without_running(payload, neox, tmp_path):
    marker = tmp_path / "marker"
    good = {"gpt_neox.layers.0.attention.dense.weight": np.ones((32, 32), bool),
            "evil": payload(marker), "orig_model_name": "x"}
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(good))
    with pytest.raises(MaskError, match="Refusing to load"):
        load_paper_masks(path)
    with pytest.raises(MaskError, match="Refusing to load"):
        MaskSet.import_paper(path, neox)
    assert not marker.exists()


def test_pickle_checks_dtype_and_old_protocols(tmp_path):
    path = tmp_path / "f.pkl"
    path.write_bytes(pickle.dumps({"w": np.ones((2, 2), np.float32)}))
    with pytest.raises(MaskError, match="not a boolean numpy array"):
        load_paper_masks(path)
    with pytest.raises(MaskError, match=r"'w' is not a boolean numpy array \(Tensor torch.bool"):
        MaskSet.import_paper({"w": torch.ones(2, dtype=torch.bool)}, nn.Linear(2, 2))
    path.write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(MaskError, match="not a dict"):
        load_paper_masks(path)
    path.write_bytes(b"not a pickle")
    with pytest.raises(MaskError, match="not a readable mask pickle"):
        load_paper_masks(path)
    arr = np.random.default_rng(0).random((3, 4)) > 0.5
    for protocol in (2, 4, 5):
        path.write_bytes(pickle.dumps({"w": arr, "orig_model_name": "m"}, protocol=protocol))
        got = load_paper_masks(path)
        assert np.array_equal(got["w"], arr) and got["orig_model_name"] == "m"
