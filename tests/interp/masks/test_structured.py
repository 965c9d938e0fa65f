"""Structured masks (one logit per attention head / MLP neuron): they act exactly as the
elementwise mask set holding their expanded logits, on native, GPT-2 (split views of c_attn),
GPT-NeoX (de-interleaved query_key_value) and a grouped-query Llama; they train with
fit_masks, cost n_heads / d_mlp logits per layer, and round-trip through files and algebra."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from interp.errors import MaskError
from interp.masks import ContinuousSparsification, HardConcrete, MaskSet, fit_masks
from interp.masks.files import read_mask_files
from interp.models.lm import load_hf_lm

GRANULARITIES = ["head", "neuron", "structured"]



@pytest.fixture(scope="module")
def llama(tmp_path_factory, tiny_tokenizer):
    """A tiny random Llama with grouped key/value heads (4 query heads, 2 kv) and a gated
    MLP, through TransformerBridge."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
                      max_position_embeddings=64)
    path = tmp_path_factory.mktemp("llama")
    LlamaForCausalLM(cfg).eval().save_pretrained(path)
    return load_hf_lm(path, tokenizer=tiny_tokenizer)


def _model(family, request):
    return request.getfixturevalue("native_model" if family == "native" else family)


def _tokens(model, batch=2, pos=7, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.cfg.d_vocab, (batch, pos), generator=gen)


def _randomize(ms: MaskSet, seed: int, scale: float = 2.0) -> MaskSet:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ms.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=gen))
    return ms


def _elementwise(ms: MaskSet) -> MaskSet:
    """The elementwise mask set holding ``ms``'s expanded logits."""
    return MaskSet(ms.targets, ms.kind, {n: lg.detach().clone() for n, lg in ms.logits.items()},
                   ms.allowed, heads=ms.heads)


def _run(model, ms, mode, toks):
    with ms.applied(model, mode):
        return model(toks)


# --------------------------------------------------------------------------- equivalence


@pytest.mark.parametrize("family", ["native", "gpt2", "neox", "llama"])
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_structured_acts_as_its_elementwise_expansion(family, granularity, request):
    """Logits in every mode, the penalty, and the gradient (a group's gradient is the sum of
    its weights' elementwise gradients) equal those of the expanded elementwise set."""
    model = _model(family, request)
    toks = _tokens(model)
    ms = _randomize(MaskSet.for_model(model, granularity=granularity), seed=3)
    el = _elementwise(ms)
    assert el.granularity == "element" and ms.granularity == granularity
    assert all(torch.equal(ms.hard_masks()[n], el.hard_masks()[n]) for n in ms.names)
    for mode in ("soft", "keep", "ablate"):
        torch.testing.assert_close(_run(model, ms, mode, toks), _run(model, el, mode, toks),
                                   rtol=0, atol=1e-6, msg=f"mode {mode}")
    torch.testing.assert_close(ms.penalty(), el.penalty(), rtol=1e-6, atol=0)

    for s in (ms, el):
        with s.applied(model, "soft"):
            loss = model(toks).logsumexp(-1).mean() + 1e-4 * s.penalty()
            loss.backward()
    for gname, lg in ms.group_logits.items():
        expected = sum(ms.groups[n].per_group(el.logits[n].grad)
                       for n in ms.group_members(gname))
        torch.testing.assert_close(lg.grad, expected, rtol=1e-4, atol=1e-7, msg=gname)
    for n in ms.names:  # targets the granularity does not cover stay elementwise
        if n not in ms.groups:
            torch.testing.assert_close(ms.logits[n].grad, el.logits[n].grad, rtol=1e-5,
                                       atol=1e-8)


def test_hard_concrete_structured_matches_deterministic_elementwise(native_model):
    toks = _tokens(native_model)
    ms = _randomize(MaskSet.for_model(native_model, kind=HardConcrete(),
                                      granularity="structured"), seed=4)
    el = _elementwise(ms)
    ms.kind.eval()
    for mode in ("soft", "keep"):
        torch.testing.assert_close(_run(native_model, ms, mode, toks),
                                   _run(native_model, el, mode, toks), rtol=0, atol=1e-6)
    torch.testing.assert_close(ms.penalty(), el.penalty(), rtol=1e-6, atol=0)
    # sampling: one gate per head shared by q, k, v, o within kind.reuse() (as in fit_masks)
    ms.kind.train()
    with ms.applied(native_model, "soft"), ms.kind.reuse():
        w = {c: getattr(native_model.blocks[0].attn, c).original_component.weight
             for c in "qo"}
        orig = {c: ms.target(f"blocks.0.attn.{c}").original for c in "qo"}
        dh = native_model.cfg.d_head
        q_gate = (w["q"] / orig["q"])[::dh, 0]  # per head: first row's ratio
        o_gate = (w["o"] / orig["o"])[0, ::dh]  # per head: first input column's ratio
        torch.testing.assert_close(q_gate, o_gate)


# --------------------------------------------------------------------------- the layout


@pytest.mark.parametrize("family", ["native", "gpt2", "neox", "llama"])
def test_groups_are_heads_and_neurons(family, request):
    """Dropping a head / neurons through the shared logits removes exactly the weights that
    the elementwise edits (set_head, set_neuron) remove."""
    model = _model(family, request)
    n_heads = model.cfg.n_heads
    ms = MaskSet.full(model, granularity="structured").set_head(1, 2, False)
    ms.set_neuron(0, [1, 5], False)
    el = MaskSet.full(model).set_head(1, 2, False).set_neuron(0, [1, 5], False)
    for n in ms.names:
        assert torch.equal(ms.hard_masks()[n], el.hard_masks()[n]), n
    kept = ms.group_logits
    assert (kept["blocks.1.attn.heads"] > 0).tolist() == [h != 2 for h in range(n_heads)]
    assert (kept["blocks.0.mlp.neurons"] < 0).nonzero().flatten().tolist() == [1, 5]


def test_neox_head_drop_equals_zeroed_interleaved_rows(neox, hf_neox_dir):
    """Head 1 of layer 0 and neurons 3, 5 of layer 1 dropped through structured logits ==
    zeroing head 1's q, k, v rows of HF's interleaved query_key_value, its dense columns, and
    the neurons' dense_h_to_4h rows / dense_4h_to_h columns."""
    from transformers import GPTNeoXForCausalLM

    toks = _tokens(neox)
    dh = neox.cfg.d_head
    ms = MaskSet.full(neox, granularity="structured").set_head(0, 1, False)
    ms.set_neuron(1, [3, 5], False)
    hf = GPTNeoXForCausalLM.from_pretrained(hf_neox_dir).eval()
    with torch.no_grad():
        layer0, layer1 = hf.gpt_neox.layers[0], hf.gpt_neox.layers[1]
        layer0.attention.query_key_value.weight[1 * 3 * dh: 2 * 3 * dh] = 0  # [head][q,k,v]
        layer0.attention.dense.weight[:, dh: 2 * dh] = 0
        layer1.mlp.dense_h_to_4h.weight[[3, 5]] = 0
        layer1.mlp.dense_4h_to_h.weight[:, [3, 5]] = 0
        expected = hf(toks).logits
    torch.testing.assert_close(_run(neox, ms, "keep", toks), expected, rtol=0, atol=1e-5)


def test_gpt2_head_drop_equals_zeroed_c_attn_columns(gpt2, hf_gpt2_dir):
    from transformers import GPT2LMHeadModel

    toks = _tokens(gpt2)
    d, dh = gpt2.cfg.d_model, gpt2.cfg.d_head
    ms = MaskSet.full(gpt2, granularity="structured").set_head(0, 3, False)
    ms.set_neuron(1, [0, 7], False)
    hf = GPT2LMHeadModel.from_pretrained(hf_gpt2_dir).eval()
    cols = torch.cat([torch.arange(j * d + 3 * dh, j * d + 4 * dh) for j in range(3)])
    with torch.no_grad():
        hf.transformer.h[0].attn.c_attn.weight[:, cols] = 0  # Conv1D [in, out]: [Q|K|V]
        hf.transformer.h[0].attn.c_proj.weight[3 * dh: 4 * dh, :] = 0
        hf.transformer.h[1].mlp.c_fc.weight[:, [0, 7]] = 0
        hf.transformer.h[1].mlp.c_proj.weight[[0, 7], :] = 0
        expected = hf(toks).logits
    torch.testing.assert_close(_run(gpt2, ms, "keep", toks), expected, rtol=0, atol=1e-5)


def test_grouped_kv_heads_have_their_own_logits(llama):
    ms = MaskSet.full(llama, granularity="head", targets=["blocks.*.attn.*"])
    assert {n: tuple(p.shape) for n, p in ms.group_logits.items()} == {
        "blocks.0.attn.heads": (4,), "blocks.0.attn.kv_heads": (2,),
        "blocks.1.attn.heads": (4,), "blocks.1.attn.kv_heads": (2,)}
    assert ms.group_members("blocks.0.attn.kv_heads") == ["blocks.0.attn.k", "blocks.0.attn.v"]
    ms.set_head(0, 3, False, which="qo").set_head(0, 3, False, which="kv")  # kv head 1
    el = MaskSet.full(llama, targets=["blocks.*.attn.*"])
    el.set_head(0, 3, False, which="qo").set_head(0, 3, False, which="kv")
    assert all(torch.equal(ms.hard_masks()[n], el.hard_masks()[n]) for n in ms.names)
    with pytest.raises(MaskError, match="shares its 'blocks.0.attn.kv_heads'"):
        ms.set_head(0, 0, False, which="k")


# --------------------------------------------------------------------------- cost, training


def test_logit_count_is_heads_and_neurons(native_model):
    cfg = native_model.cfg
    el = MaskSet.for_model(native_model)
    st = MaskSet.for_model(native_model, granularity="structured")
    heads = MaskSet.for_model(native_model, granularity="head", targets=["blocks.*.attn.*"])
    neurons = MaskSet.for_model(native_model, granularity="neuron", targets=["blocks.*.mlp.*"])
    mixed = MaskSet.for_model(native_model, granularity="head")  # MLP stays elementwise

    def count(ms):
        return sum(p.numel() for p in ms.parameters())

    assert count(el) == el.n_logits == el.n_weights
    assert count(st) == st.n_logits == cfg.n_layers * (cfg.n_heads + cfg.d_mlp)
    assert count(heads) == cfg.n_layers * cfg.n_heads
    assert count(neurons) == cfg.n_layers * cfg.d_mlp
    assert count(mixed) == cfg.n_layers * (cfg.n_heads + 2 * cfg.d_model * cfg.d_mlp)
    assert st.n_weights == el.n_weights  # the penalty and lam keep their weight units
    assert "granularity=structured (136 logits)" in st.summary()


def test_fit_masks_finds_a_removed_head_and_neurons(native_model):
    """Target = the model without head 2 of layer 1 and 16 neurons of layer 0: a structured
    fit drops exactly those (and keeps everything else) with 4 + 64 logits per layer."""
    model = native_model
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, model.cfg.d_vocab, (8, 24), generator=gen) for _ in range(8)]
    gone = list(range(16))
    with torch.no_grad():  # make the removed parts matter so the target clearly differs
        for t in ("blocks.1.attn.o", "blocks.0.mlp.out"):
            MaskSet.full(model).target(t).original.mul_(4.0)
    target_ms = MaskSet.full(model).set_head(1, 2, False).set_neuron(0, gone, False)
    with target_ms.applied(model, "keep"), torch.no_grad():
        targets = {id(b): F.log_softmax(model(b), -1) for b in batches}

    def kl(m, b):
        return F.kl_div(F.log_softmax(m(b), -1).flatten(0, 1), targets[id(b)].flatten(0, 1),
                        log_target=True, reduction="batchmean")

    ms = MaskSet.for_model(model, kind=ContinuousSparsification(temperature_factor=1.01),
                           granularity="structured")
    before = [p.detach().clone() for p in ms.parameters()]
    res = fit_masks(model, ms, kl, batches, lam=0.0, lr=0.1, max_steps=120, stop_rule=False,
                    progress=False)
    assert res.steps == 120 and not ms.attached
    assert any(not torch.equal(a, b) for a, b in zip(before, ms.parameters()))
    heads = ms.group_logits["blocks.1.attn.heads"] > 0
    assert heads.tolist() == [True, True, False, True]
    assert bool((ms.group_logits["blocks.0.attn.heads"] > 0).all())
    neurons = ms.group_logits["blocks.0.mlp.neurons"] > 0
    assert neurons.logical_not().nonzero().flatten().tolist() == gone
    assert bool((ms.group_logits["blocks.1.mlp.neurons"] > 0).all())
    assert all(torch.equal(ms.hard_masks()[n], target_ms.hard_masks()[n]) for n in ms.names)
    assert res.final["active_fraction"] == pytest.approx(target_ms.active_fraction())


@pytest.mark.parametrize("family", ["gpt2", "neox"])
def test_structured_fit_is_the_same_on_the_hf_path(family, request):
    """fit_masks(path="hf") runs the wrapped HF module (GPT-NeoX: fused query_key_value
    rebuilt from the masked split q/k/v): the structured logits it trains equal the
    bridge path's."""
    from interp.models.lm import lm_loss

    model = _model(family, request)
    toks = _tokens(model, batch=4, pos=16)
    trained = {}
    for path in ("bridge", "hf"):
        ms = MaskSet.for_model(model, kind=HardConcrete(), granularity="structured", seed=0)
        fit_masks(model, ms, lambda m, b: lm_loss(m(b), b), [toks], max_steps=5,
                  stop_rule=False, progress=False, path=path)
        trained[path] = torch.cat([p.detach().flatten() for p in ms.parameters()])
    torch.testing.assert_close(trained["hf"], trained["bridge"], rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- files, algebra


def test_save_load_round_trip_keeps_granularity(native_model, tmp_path):
    ms = _randomize(MaskSet.for_model(native_model, granularity="structured"), seed=5)
    ms.mode = "keep"
    path = ms.save(tmp_path / "st")
    side = json.loads((tmp_path / "st.json").read_text())
    assert side["granularity"] == "structured"
    for back in (MaskSet.load(path, native_model), MaskSet.load(path)):
        assert back.granularity == "structured" and back.mode == "keep"
        assert back.n_logits == ms.n_logits
        assert all(torch.equal(back.group_logits[g], lg) for g, lg in ms.group_logits.items())
        assert all(torch.equal(back.hard_masks()[n], ms.hard_masks()[n]) for n in ms.names)
    # the files hold the expanded element logits: a reader unaware of granularity gets the
    # equivalent elementwise set
    saved = read_mask_files(path, native_model)
    assert all(torch.equal(saved.logits[n], ms.logits[n]) for n in ms.names)
    assert MaskSet.for_model(native_model).save(tmp_path / "el").exists()
    assert MaskSet.load(tmp_path / "el").granularity == "element"


def test_load_refuses_logits_not_constant_per_head(native_model, tmp_path):
    from safetensors.torch import load_file, save_file

    path = MaskSet.for_model(native_model, granularity="head").save(tmp_path / "st")
    tensors = load_file(str(path))
    tensors["blocks.0.attn.q"][0, 0] = 3.0
    save_file(tensors, str(path), metadata={"format": "interp.maskset"})
    with pytest.raises(MaskError, match=r"st\.safetensors.*differ within one head"):
        MaskSet.load(path)
    side = json.loads((tmp_path / "st.json").read_text())
    side["granularity"] = "heads"
    (tmp_path / "st.json").write_text(json.dumps(side))
    with pytest.raises(MaskError, match="granularity 'heads'"):
        MaskSet.load(path)


def test_algebra_keeps_granularity_when_it_can(native_model):
    a = _randomize(MaskSet.for_model(native_model, granularity="structured"), seed=6)
    b = _randomize(MaskSet.for_model(native_model, granularity="structured"), seed=7)
    A, B = a.hard_masks(), b.hard_masks()
    for result, expected in (((a | b), {n: A[n] | B[n] for n in A}),
                             ((a & b), {n: A[n] & B[n] for n in A}),
                             ((a - b), {n: A[n] & ~B[n] for n in A}),
                             (~a, {n: ~A[n] & a.allowed[n] for n in A}),
                             (a.hardened(), A)):
        assert result.granularity == "structured" and result.n_logits == a.n_logits
        assert all(torch.equal(result.hard_masks()[n], expected[n]) for n in A)
    el = _randomize(MaskSet.for_model(native_model), seed=8)
    mixed = a & el  # partly kept heads: not representable per head
    assert mixed.granularity == "element"
    assert all(torch.equal(mixed.hard_masks()[n], A[n] & el.hard_masks()[n]) for n in A)


def test_random_like_draws_whole_heads_and_neurons(native_model):
    """The null of a structured subnetwork is random whole units, as many per group."""
    a = _randomize(MaskSet.for_model(native_model, granularity="structured"), seed=3)
    kept = {g: lg > 0 for g, lg in a.group_logits.items()}
    draws = [a.random_like(s) for s in (0, 0, 1)]
    for rnd in draws:
        assert rnd.granularity == "structured" and rnd.counts() == a.counts()
        assert rnd._hard_groups(rnd.hard_masks()) is not None  # no head is split
        for g, lg in rnd.group_logits.items():
            assert int((lg > 0).sum()) == int(kept[g].sum())
    same = all(torch.equal(draws[0].group_logits[g], draws[1].group_logits[g]) for g in kept)
    differ = any(not torch.equal(draws[0].group_logits[g], draws[2].group_logits[g])
                 for g in kept)
    moved = any(not torch.equal(draws[2].group_logits[g] > 0, kept[g]) for g in kept)
    assert same and differ and moved


def test_edits_and_errors(native_model, conv_net):
    ms = MaskSet.full(native_model, granularity="structured")
    with pytest.raises(MaskError, match="shares its 'blocks.0.attn.heads' logits"):
        ms.set_target("blocks.0.attn.q", False)
    with pytest.raises(MaskError, match="shares its 'blocks.0.attn.heads' logits"):
        ms.set_head(0, 1, False, which="qk")
    with pytest.raises(MaskError, match="out of range"):
        ms.set_neuron(0, 64, False)
    ms.set_layer(1, False)
    assert all(v == 0 for v in ms.counts()[1].values())
    assert MaskSet.empty(native_model, granularity="head").active_fraction() == 0.0
    alone = MaskSet.full(native_model, granularity="head", targets=["blocks.0.attn.q"])
    assert alone.set_target("blocks.0.attn.q", False).active_fraction() == 0.0
    with pytest.raises(MaskError, match="Unknown mask granularity 'heads'.*'head'"):
        MaskSet.for_model(native_model, granularity="heads")
    with pytest.raises(MaskError, match="needs MLP targets"):
        MaskSet.for_model(native_model, granularity="neuron", targets=["blocks.0.attn.*"])
    with pytest.raises(MaskError, match="needs attention"):
        MaskSet.for_model(conv_net, granularity="head", targets={"conv": (conv_net.conv,
                                                                          "weight")})
