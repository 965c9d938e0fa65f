"""The hook-free HF path (interp.masks.fast): masks act identically on both paths.

Every HF bridge here has its split q/k/v weights and biases perturbed first, as training
through the bridge would leave them: GPT-NeoX's fused ``query_key_value`` is then stale, so a
path that read it (or GPT-2's ``c_attn``) would give other logits, which the tests check.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from interp.errors import ConfigError, MaskError
from interp.masks import ContinuousSparsification, HardConcrete, MaskSet, fit_masks
from interp.masks.fast import (
    PATHS,
    FusedQKV,
    UnwrappedLM,
    check_paths,
    execution_path,
    max_logit_gap,
    unwrap,
)
from interp.models.lm import build_lm, lm_loss, load_hf_lm

FAMILIES = ("neox", "gpt2", "native")
RTOL = 2e-5  # float32: both paths agree to about 1e-7 on these models



def _perturb_qkv(model, seed: int = 1) -> None:
    """Move the split q/k/v weights and biases away from the fused copy (a trained bridge)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for blk in model.blocks:
            for c in "qkv":
                lin = getattr(blk.attn, c).original_component
                lin.weight.add_(0.3 * torch.randn(lin.weight.shape, generator=gen))
                if lin.bias is not None:
                    lin.bias.add_(0.3 * torch.randn(lin.bias.shape, generator=gen))


@pytest.fixture()
def make_bridge(request, tiny_tokenizer):
    """``make_bridge(family)``: a fresh tiny bridge; HF families with stale fused QKV."""

    def make(family: str):
        if family == "native":
            return build_lm("test", tokenizer=tiny_tokenizer, seed=0)
        path = request.getfixturevalue({"neox": "hf_neox_dir", "gpt2": "hf_gpt2_dir"}[family])
        model = load_hf_lm(path)
        _perturb_qkv(model)
        return model

    return make


def _tokens(model, batch: int = 3, pos: int = 12, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.cfg.d_vocab, (batch, pos), generator=gen)


def _random_logits(ms: MaskSet, seed: int = 0, scale: float = 2.0) -> MaskSet:
    """Logits far from the init, so soft, keep and ablate masks all differ."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ms.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=gen))
    return ms


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = RTOL) -> None:
    a, b = a.detach(), b.detach()
    gap = float((a - b).abs().max())
    assert gap <= rtol * (1 + float(a.abs().max())), gap


# --------------------------------------------------------------------------- logits


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family", FAMILIES)
def test_masked_logits_match_in_every_mode(family, attn, make_bridge):
    model = make_bridge(family)
    runner = unwrap(model, attn_implementation=attn)
    tokens = _tokens(model)
    ms = _random_logits(MaskSet.for_model(model, seed=0))
    seen = []
    for mode in ("soft", "keep", "ablate", "off"):
        with ms.applied(model, mode=mode), torch.no_grad():
            ref, fast = model(tokens), runner(tokens)
        _close(ref, fast)
        seen.append(ref)
    # the modes really differ, so equal logits per mode are a real test
    for a, b in zip(seen, seen[1:]):
        assert (a - b).abs().max() > 1e-3
    # and nothing stayed attached to the shared weights
    assert not ms.attached
    _close(model(tokens), runner(tokens))


def test_hard_concrete_deterministic_gates_match(make_bridge):
    model = make_bridge("neox")
    runner = unwrap(model)
    ms = _random_logits(MaskSet.for_model(model, kind=HardConcrete(), seed=0))
    ms.kind.eval()
    with ms.applied(model, mode="soft"), torch.no_grad():
        _close(model(_tokens(model)), runner(_tokens(model)))


@pytest.mark.parametrize("family", ["neox", "gpt2"])
def test_the_stale_fused_weight_is_not_read(family, make_bridge, request):
    """A plain HF model from the checkpoint (the fused weight) differs from the bridge, the
    HF path does not."""
    from transformers import AutoModelForCausalLM

    model = make_bridge(family)
    path = request.getfixturevalue({"neox": "hf_neox_dir", "gpt2": "hf_gpt2_dir"}[family])
    stale = AutoModelForCausalLM.from_pretrained(path).eval()
    tokens = _tokens(model)
    with torch.no_grad():
        ref = model(tokens)
        assert (stale(tokens).logits - ref).abs().max() > 1e-2
        _close(ref, unwrap(model)(tokens))


@pytest.mark.parametrize("family", ["neox", "gpt2"])
def test_fused_weight_is_hf_layout(family, make_bridge):
    """FusedQKV rebuilds exactly what the HF slices (the paper-mask mapping) say."""
    from interp.masks.targets import find_targets

    model = make_bridge(family)
    runner = unwrap(model)
    fused = [m for m in runner.modules() if isinstance(m, FusedQKV)]
    assert len(fused) == model.cfg.n_layers
    assert fused[0].layout == {"neox": "heads", "gpt2": "blocks"}[family]
    by_name = {t.name: t for t in find_targets(model)}
    for layer, f in enumerate(fused):
        hf = {c: by_name[f"blocks.{layer}.attn.{c}"].hf for c in "qkv"}
        full = torch.zeros(hf["q"].shape)
        for c in "qkv":
            hf[c].put(full, getattr(f, c).weight.detach())
        expect = full.T if hf["q"].transposed else full  # Linear layout [out, in]
        assert torch.equal(f.fused_weight().detach(), expect)


# --------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("family", FAMILIES)
def test_mask_logit_gradients_match(family, make_bridge):
    model = make_bridge(family)
    runner = unwrap(model)
    tokens = _tokens(model, batch=4, pos=16)
    ms = _random_logits(MaskSet.for_model(model, kind=ContinuousSparsification(), seed=0),
                        scale=0.5)
    grads = []
    with ms.applied(model, mode="soft"):
        for m in (model, runner):
            ms.zero_grad(set_to_none=True)
            lm_loss(m(tokens), tokens).backward()
            grads.append({n: p.grad.clone() for n, p in ms.logits.items()})
    ref, fast = grads
    assert set(ref) == set(fast)
    scale = max(float(g.abs().max()) for g in ref.values())
    assert scale > 0
    for name in ref:
        gap = float((ref[name] - fast[name]).abs().max())
        assert gap <= 1e-4 * scale, (name, gap, scale)
    # only mask logits received gradients, the model's weights stayed frozen
    assert all(p.grad is None for p in model.parameters())


# --------------------------------------------------------------------------- fit_masks


def test_fit_on_hf_path_equals_bridge_path_and_keeps_hooks(make_bridge):
    model = make_bridge("neox")
    hf_cfg = model.original_model.config
    modules_before = [id(m) for m in model.modules()]
    batches = [_tokens(model, batch=4, pos=16, seed=s) for s in range(3)]

    def objective(m, b):
        return lm_loss(m(b), b)

    results, sets = {}, {}
    for path in PATHS:
        ms = MaskSet.for_model(model, seed=0)
        results[path] = fit_masks(model, ms, objective, batches, lam=0.5, lr=0.1,
                                  max_steps=6, check_every=3, stop_rule=False,
                                  progress=False, path=path)
        sets[path] = ms
    for a, b in zip(results["bridge"].history, results["hf"].history):
        assert a["task_loss"] == pytest.approx(b["task_loss"], rel=1e-5)
        assert a["penalty"] == pytest.approx(b["penalty"], rel=1e-5)
    for name, lg in sets["bridge"].logits.items():
        _close(lg.detach(), sets["hf"].logits[name].detach(), rtol=1e-4)
    assert (sets["hf"].logits["blocks.0.attn.q"] != 0).any()  # it trained

    # the bridge is unchanged: same modules, config, trainable weights, no masks left
    assert [id(m) for m in model.modules()] == modules_before
    assert model.original_model.config is hf_cfg
    assert hf_cfg._attn_implementation == "eager"
    assert all(p.requires_grad for p in model.parameters())
    # hooks and caches work with the masks trained on the HF path
    tokens = _tokens(model, seed=9)
    with sets["hf"].applied(model, mode="keep"), torch.no_grad():
        logits, cache = model.run_with_cache(tokens)
        _close(logits, model(tokens))
        _close(logits, unwrap(model)(tokens))
        # the cached residual stream is the HF path's hidden state after layer 0
        hidden = unwrap(model).inner(input_ids=tokens, output_hidden_states=True).hidden_states
        _close(cache["blocks.0.hook_resid_post"], hidden[1])
        masked = logits
    with torch.no_grad():
        assert (model(tokens) - masked).abs().max() > 1e-3  # the masks had an effect


def test_hf_path_fires_no_hooks(make_bridge):
    model = make_bridge("gpt2")
    calls = []
    name = "blocks.0.hook_resid_post"
    model.add_hook(name, lambda act, hook: calls.append(hook.name))
    try:
        tokens = _tokens(model)
        runner = unwrap(model)
        with torch.no_grad():
            runner(tokens)
            assert calls == []
            model(tokens)
        assert len(calls) == 1
    finally:
        model.reset_hooks()


def test_self_distillation_on_hf_path(make_bridge):
    """The teacher pass switches the mask set off; it must act on the HF path too."""
    from interp.objectives import SelfDistillationObjective

    model = make_bridge("gpt2")
    ms = MaskSet.for_model(model, seed=0)
    res = fit_masks(model, ms, SelfDistillationObjective(ms), [_tokens(model)], lam=1.0,
                    max_steps=2, check_every=1, stop_rule=False, progress=False, path="hf")
    # at init (soft masks 0.5) the student differs from the unmasked teacher: loss > entropy
    with torch.no_grad():
        p = F.softmax(model(_tokens(model)), -1)
        entropy = float(-(p * p.log()).sum(-1).mean())
    assert res.history[0]["task_loss"] > entropy + 1e-3


# --------------------------------------------------------------------------- errors


def test_check_paths_fails_when_the_hf_module_reads_the_stale_weight(make_bridge):
    model = make_bridge("neox")
    runner = unwrap(model)
    check_paths(model, runner)
    attn = runner.inner.gpt_neox.layers[0].attention
    attn.query_key_value = model.blocks[0].attn.qkv.original_component  # the stale fused
    gap, _ = max_logit_gap(model, runner)
    assert gap > 1e-3
    with pytest.raises(MaskError, match="path='bridge'"):
        check_paths(model, runner)


def test_unknown_path_and_non_bridge_models(native_model, conv_net):
    with pytest.raises(ConfigError, match="Did you mean: hf"):
        execution_path(native_model, "hff")
    assert execution_path(native_model, "bridge") is native_model
    with pytest.raises(ConfigError, match="not a bridge"):
        unwrap(conv_net)
    ms = MaskSet.for_model(conv_net, targets={"conv": (conv_net.conv, "weight")})
    x = torch.randn(2, 1, 6, 6)
    with pytest.raises(ConfigError, match="not a bridge"):
        fit_masks(conv_net, ms, lambda m, b: m(b).sum(), [x], max_steps=1, progress=False,
                  path="hf")
    assert not ms.attached


def test_unknown_attention_kernel(make_bridge):
    with pytest.raises(ConfigError, match="Did you mean: sdpa"):
        unwrap(make_bridge("neox"), attn_implementation="sdpaa")


def test_processed_weights_are_refused(make_bridge):
    model = make_bridge("native")
    model._weights_processed = True  # what enable_compatibility_mode leaves behind
    with pytest.raises(ConfigError, match="unprocessed weights"):
        unwrap(model)


def test_native_runs_its_own_eager_attention(make_bridge):
    runner = unwrap(make_bridge("native"), attn_implementation="sdpa")
    assert isinstance(runner, UnwrappedLM) and runner.attn_implementation is None


# --------------------------------------------------------------------------- benchmark


def test_bench_scale_quick_mode(tmp_path):
    """benchmarks/bench_scale.py --quick runs every case and writes consistent results."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[3] / "benchmarks" / "bench_scale.py"
    spec = importlib.util.spec_from_file_location("bench_scale", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(["--quick", "--precision", "fp32", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "bench_scale_cpu.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(result["rows"]))
    rows = {r["case"]: r for r in saved["rows"]}
    assert set(rows) == set(bench.TRAIN_CASES) | set(bench.FORWARD_CASES)
    ns_missing = bench.neurosurgeon_available()
    for case, row in rows.items():
        if case == "neurosurgeon" and ns_missing:
            assert row["error"] == ns_missing
            continue
        assert row["error"] is None, (case, row["error"])
        assert row["ms_per_step"] > 0
        assert row["tokens_per_s"] == pytest.approx(2 * 32 / row["ms_per_step"] * 1e3)
    assert rows["fit_hf"]["masked_weights"] == 2 * 4 * 64 * 64 + 2 * 2 * 64 * 256
    assert saved["checks"]["quick"]["max_logit_gap"] < 1e-5
    table = (tmp_path / "bench_scale_cpu.md").read_text()
    assert "`fit_masks` (HF path)" in table and "bench_scale_cpu:end" in table
