"""fit_masks: frozen weights, a recoverable toy subnetwork, stopping and spike rules, seeds."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from interp.masks import ContinuousSparsification, HardConcrete, MaskSet, fit_masks
from interp.masks.train import FitResult, find_loss_spike

VOCAB = 299  # len(tiny_tokenizer)



def _batches(n: int = 8, batch: int = 8, pos: int = 24, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (batch, pos), generator=g) for _ in range(n)]


def _kl_to(target_logits: dict[int, torch.Tensor]):
    """Objective: KL(target || masked model) per position; batches are looked up by id."""

    def objective(model, batch):
        logp = F.log_softmax(model(batch), dim=-1)
        t = target_logits[id(batch)]
        return F.kl_div(logp.flatten(0, 1), t.flatten(0, 1), log_target=True,
                        reduction="batchmean")

    return objective


def _lm_ce(model, batch: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(batch)[:, :-1].flatten(0, 1), batch[:, 1:].flatten())


def _params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# --------------------------------------------------------------------------- rules


def test_find_loss_spike_rules():
    flat = [2.0] * 300
    assert find_loss_spike(flat) is None
    recovered = flat[:50] + [3.0] * 20 + [2.0] * 230  # recovers long before the end
    assert find_loss_spike(recovered) is None
    late = flat[:250] + [2.5] + [2.0] * 49  # a spike in the last 100 steps always counts
    assert find_loss_spike(late) == 250
    stuck = flat[:100] + [2.4] * 200  # +0.4 and never back
    assert find_loss_spike(stuck) == 100
    small = [0.1] * 100 + [0.13] * 200  # x1.3 on a small loss is a spike too
    assert find_loss_spike(small) == 100
    assert find_loss_spike([0.1] * 100 + [0.12] * 200) is None  # x1.2 and +0.02: not
    assert find_loss_spike([-1.0] * 100 + [-0.9] * 200) is None  # no ratio test below zero


# --------------------------------------------------------------------------- behaviour


def test_gradients_reach_only_mask_logits(native_model):
    model = native_model
    before = _params(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    ms = MaskSet.for_model(model, kind=ContinuousSparsification(), seed=0)
    logits0 = [p.detach().clone() for p in ms.parameters()]
    mask_ids = {id(p) for p in ms.parameters()}
    seen: list[set[int]] = []

    def objective(m, batch):
        seen.append({id(p) for p in m.parameters() if p.requires_grad})
        return F.cross_entropy(m(batch)[:, :-1].flatten(0, 1), batch[:, 1:].flatten())

    res = fit_masks(model, ms, objective, _batches(2), lam=1.0, max_steps=3, progress=False)
    assert res.steps == 3 and len(seen) == 3
    # inside the fit only mask logits are trainable, and they moved
    assert all(s <= mask_ids for s in seen)
    assert all(not torch.equal(a, b.detach()) for a, b in zip(logits0, ms.parameters()))
    # afterwards: detached, weights bitwise unchanged, flags restored, no stray grads
    after = _params(model)
    assert after.keys() == before.keys()
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert not getattr(ms, "attached", False)


def test_fit_keeps_no_graph_alive(gpt2):
    """After a fit, nothing in the model holds an autograd graph, so a mask set dropped by
    the user is freed (TransformerLens attention keeps its last pattern on the module)."""
    import gc
    import weakref

    model = gpt2
    batches = [torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(1))]
    model(batches[0])  # a pattern from before the fit, without a graph
    ms = MaskSet.for_model(model, seed=0)
    fit_masks(model, ms, _lm_ce, batches, lam=1.0, max_steps=2, progress=False)
    kept = [(type(m).__name__, k) for m in model.modules() for k, v in vars(m).items()
            if isinstance(v, torch.Tensor) and v.grad_fn is not None]
    assert not kept
    ref = weakref.ref(ms)
    del ms
    gc.collect()
    assert ref() is None


def test_attached_maskset_keeps_its_mode(native_model):
    ms = MaskSet.for_model(native_model, kind=ContinuousSparsification(), seed=0)
    ms.attach(native_model)
    ms.mode = "off"
    obj = lambda m, b: m(b).float().pow(2).mean()
    fit_masks(native_model, ms, obj, _batches(1), max_steps=2, progress=False)
    assert ms.mode == "off" and getattr(ms, "attached", True)
    ms.detach()


def test_fit_recovers_a_removed_mlp(native_model):
    """Target = the model with layer 0's MLP zeroed: the fit masks that MLP off, keeps the rest."""
    model = native_model
    ms = MaskSet.for_model(model, kind=ContinuousSparsification(temperature_factor=1.01), seed=0)
    batches = _batches(8)
    with torch.no_grad():
        w = _mlp_out_weight(model, 0)
        w.mul_(8.0)  # make the MLP matter so its removal is clearly visible in the logits
        saved = w.clone()
        w.zero_()
        targets = {id(b): F.log_softmax(model(b), -1) for b in batches}
        w.copy_(saved)
        full_kl = _kl_to(targets)(model, batches[0]).item()
    fit_masks(model, ms, _kl_to(targets), batches, lam=0.0, lr=0.05, max_steps=300,
              stop_rule=False, progress=False)
    kept = {n: m.float().mean().item() for n, m in ms.hard_masks().items()}
    # the MLP's in and out weights are mostly masked off; every other block mostly kept
    assert kept["blocks.0.mlp.in"] < 0.35 and kept["blocks.0.mlp.out"] < 0.4, kept
    assert min(v for n, v in kept.items() if not n.startswith("blocks.0.mlp")) > 0.55, kept
    with ms.applied(model, mode="keep"), torch.no_grad():
        hard_kl = _kl_to(targets)(model, batches[0]).item()
    assert hard_kl < 0.15 * full_kl


def _mlp_out_weight(model, layer: int) -> torch.Tensor:
    for n, p in model.named_parameters():
        name = n.replace("._original_component", "")
        if name in (f"blocks.{layer}.mlp.fc_out.weight", f"layers.{layer}.mlp.fc_out.weight"):
            return p
    raise KeyError(f"no MLP-out weight for layer {layer}")


def test_stop_rule_triggers_on_constructed_case(native_model):
    ms = MaskSet.for_model(native_model, kind=ContinuousSparsification(), seed=0)
    n = ms.n_weights
    # an objective that rewards keeping every weight drives all masks above 0.9 quickly
    keep_all = lambda m, b: -ms.penalty() / n
    res = fit_masks(native_model, ms, keep_all, _batches(1), lam=0.0, lr=0.05, max_steps=500,
                    check_every=1, progress=False)
    assert res.stopped_reason == "stop_rule"
    assert 10 < res.steps < 500
    assert res.history[-1]["undecided"] < 0.01 * 1.0
    assert res.history[-2]["undecided"] > 0.0
    assert res.history[-1]["active_fraction"] == pytest.approx(1.0)
    # min_steps postpones the rule; stop_rule=False disables it
    res2 = fit_masks(native_model, MaskSet.for_model(native_model, seed=0), keep_all,
                     _batches(1), lam=0.0, max_steps=60, stop_rule=False, progress=False)
    assert res2.stopped_reason == "max_steps" and res2.steps == 60


def test_history_fields_finite_and_json(native_model):
    ms = MaskSet.for_model(native_model, kind=ContinuousSparsification(), seed=0)
    obj = _lm_ce
    res = fit_masks(native_model, ms, obj, _batches(3), lam=2.0, max_steps=5, accumulate=2,
                    progress=False)
    assert len(res.history) == 5
    keys = {"step", "loss", "task_loss", "penalty", "active_fraction", "undecided", "temperature"}
    for i, h in enumerate(res.history):
        assert keys <= h.keys() and h["step"] == i + 1
        assert all(math.isfinite(h[k]) for k in keys)
        assert h["loss"] == pytest.approx(h["task_loss"] + 2.0 * h["penalty"] / ms.n_weights)
    assert res.history[-1]["temperature"] == pytest.approx(1.001**5)
    back = FitResult.from_dict(json.loads(res.to_json()))
    assert back.history == res.history and back.stopped_reason == res.stopped_reason


def test_same_seed_same_result(tiny_tokenizer):
    from interp.models.lm import build_lm

    def run(seed):
        model = build_lm("test", tokenizer=tiny_tokenizer, seed=0)
        ms = MaskSet.for_model(model, kind=HardConcrete(), seed=0)
        obj = _lm_ce
        res = fit_masks(model, ms, obj, _batches(2), lam=1.0, max_steps=4, seed=seed,
                        progress=False)
        return res, [p.detach().clone() for p in ms.parameters()]

    (a, la), (b, lb), (_, lc) = run(0), run(0), run(1)
    assert [h["loss"] for h in a.history] == [h["loss"] for h in b.history]
    assert all(torch.equal(x, y) for x, y in zip(la, lb))
    assert not all(torch.equal(x, y) for x, y in zip(la, lc))  # sampling differs by seed


def test_spike_flag_and_retry(native_model):
    ms = MaskSet.for_model(native_model, kind=ContinuousSparsification(), seed=0)
    calls = {"n": 0}

    def spiky(m, b):  # the first attempt's last steps jump by +1 nat
        calls["n"] += 1
        base = m(b).float().pow(2).mean() * 0.0 + 1.0
        return base + (1.0 if 25 <= calls["n"] <= 30 else 0.0)

    res = fit_masks(native_model, ms, spiky, _batches(1), max_steps=30, stop_rule=False,
                    progress=False)
    assert res.spike and res.spike_step == 25 and res.attempts == 1
    calls["n"] = 0
    ms2 = MaskSet.for_model(native_model, kind=ContinuousSparsification(), seed=0)
    res2 = fit_masks(native_model, ms2, spiky, _batches(1), max_steps=30, stop_rule=False,
                     spike_retries=2, progress=False, seed=5)
    assert not res2.spike and res2.attempts == 2 and res2.seed == 6
    # the retry restarted the schedule: 30 steps of 1.001, not 60
    assert ms2.kind.temperature == pytest.approx(1.001**30)


def test_bad_arguments(native_model):
    from interp.errors import InterpError

    ms = MaskSet.for_model(native_model, seed=0)
    with pytest.raises(InterpError):
        fit_masks(native_model, ms, lambda m, b: 0, _batches(1), max_steps=0)


def test_stop_rule_when_everything_is_pruned(native_model):
    """With no mask above 0.9 the paper's ratio never fires; nothing undecided stops too."""
    ms = MaskSet.for_model(native_model, kind=ContinuousSparsification(), seed=0)
    zero = lambda m, b: m(b).sum() * 0.0
    res = fit_masks(native_model, ms, zero, _batches(1), lam=1000.0, lr=0.1, max_steps=400,
                    check_every=5, progress=False)
    assert res.stopped_reason == "stop_rule" and res.steps % 5 == 0
    assert res.final["active_fraction"] == 0.0 and res.final["undecided"] == 0.0


def test_hard_concrete_is_not_decided_at_init(native_model):
    ms = MaskSet.for_model(native_model, kind=HardConcrete(), seed=0)
    obj = _lm_ce
    res = fit_masks(native_model, ms, obj, _batches(2), max_steps=3, progress=False)
    assert res.stopped_reason == "max_steps"
    assert res.history[0]["undecided"] > 0.3
    assert res.history[0]["active_fraction"] > 0.99  # deterministic gates start open


def test_check_every_and_data_exhaustion(native_model):
    ms = MaskSet.for_model(native_model, kind=ContinuousSparsification(), seed=0)
    obj = _lm_ce
    # a one-shot iterator of 7 batches ends the fit between checks
    res = fit_masks(native_model, ms, obj, iter(_batches(7)), max_steps=50, check_every=5,
                    progress=False)
    assert res.stopped_reason == "data_exhausted" and res.steps == 7
    assert [h["step"] for h in res.history] == list(range(1, 8))
    # mask statistics are refreshed at checks and carried between them
    assert res.history[0]["active_fraction"] == res.history[4]["active_fraction"]
    # callables get the attempt's seed
    seeds = []
    fit_masks(native_model, ms, obj, lambda s: seeds.append(s) or _batches(1), max_steps=2,
              seed=3, progress=False)
    assert seeds == [3]


@pytest.mark.parametrize("kind", [ContinuousSparsification(temperature=2.0), HardConcrete()])
def test_penalty_fast_path_matches_definition(native_model, kind):
    """The penalty fit_masks adds: expected mask summed over maskable weights only."""
    from interp.masks import find_targets

    t = find_targets(native_model, "blocks.0.mlp.in")[0]
    with torch.no_grad():
        t.module.weight[3, 4] = 0.0
        t.module.weight[5, 1] = 0.0
    ms = MaskSet.for_model(native_model, kind=kind, seed=0)
    with torch.no_grad():
        for lg in ms.parameters():
            lg.normal_()
    ref = sum((kind.expected(lg) * ms.allowed[n]).sum() for n, lg in ms.logits.items())
    pen = ms.penalty()
    assert pen.item() == pytest.approx(ref.item(), rel=1e-6)
    pen.backward()
    lg = ms.logits["blocks.0.mlp.in"]
    assert lg.grad is not None and torch.all(lg.grad > 0)
    # a changed allowed buffer is picked up (the forbidden-index cache is keyed by its state)
    ms.allowed["blocks.0.mlp.in"][0, 0] = False
    ref2 = ref - kind.expected(lg.detach())[0, 0]
    assert ms.penalty().item() == pytest.approx(ref2.item(), rel=1e-6)
