"""fit_masks(distributed=True) on 2 CPU processes (gloo) = the single-process fit on the same
global batch: equal logits and histories within float32 rounding, identical masks on every
rank, the same stopping decisions; plus the sharding helpers and the errors.

The two ranks are forked from the test process after it ran the single-process fits (so
torch and TransformerLens are imported once, and the test takes seconds); each runs one
thread, joins a gloo group from torchrun's environment variables through
:func:`interp.distributed.init`, and saves what it trained for the test process to compare.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from interp import distributed
from interp.errors import ConfigError, InterpError
from interp.masks import ContinuousSparsification, HardConcrete, MaskSet, fit_masks

WORLD = 2
VOCAB = 299  # len(tiny_tokenizer)


def _global_batches(n: int, batch: int = 8, pos: int = 16, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (batch, pos), generator=g) for _ in range(n)]


def _lm_ce(model, batch):
    """Mean next-token cross-entropy: a mean over rows, so shards average to the whole."""
    return F.cross_entropy(model(batch)[:, :-1].flatten(0, 1), batch[:, 1:].flatten())


#: name -> (kind factory, fit_masks options, number of global batches, one-shot stream)
CASES = {
    # deterministic masks, gradient accumulation, checks that do not divide the step count
    "continuous": (lambda: ContinuousSparsification(temperature_factor=1.05),
                   dict(lam=1.0, lr=0.05, max_steps=7, accumulate=2, check_every=3,
                        stop_rule=False), 4, False),
    # sampled gates: every rank must draw rank 0's noise (the seed is broadcast)
    "hard_concrete": (HardConcrete, dict(lam=1.0, lr=0.05, max_steps=5, stop_rule=False), 3,
                      False),
    # the stopping rule fires: every rank at the same step
    "stop_rule": (lambda: ContinuousSparsification(temperature_factor=1.3),
                  dict(lam=50.0, lr=0.2, max_steps=60, check_every=2), 2, False),
    # one-shot streams: rank 1 has one batch fewer, so every rank ends when it runs out
    "exhausted": (ContinuousSparsification, dict(lam=1.0, lr=0.05, max_steps=50), 3, True),
    # the hook-free HF execution path under DDP: the same all-reduce over the same logits
    "hf_path": (ContinuousSparsification, dict(lam=1.0, lr=0.05, max_steps=4, path="hf",
                                               stop_rule=False), 2, False),
}


def _fit(tokenizer, case: str, *, rank: int | None = None):
    """One case: single-process on the global batches (``rank=None``) or this rank's part."""
    from interp.models.lm import build_lm

    make_kind, opts, n, one_shot = CASES[case]
    model = build_lm("test", tokenizer=tokenizer, seed=0)
    # per-rank seeds on purpose: fit_masks must start every rank from rank 0's logits and seed
    seed = 0 if rank is None else rank
    ms = MaskSet.for_model(model, kind=make_kind(), seed=seed)
    if case == "hard_concrete":
        with torch.no_grad():  # distinct starting logits per rank (and per seed)
            for p in ms.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)))
    batches = _global_batches(n)
    if rank is None:
        stream = iter(batches[:-1]) if one_shot else batches
    else:
        mine = distributed.shard_batches(batches, rank, WORLD)
        stream = list(mine)[: n - rank] if one_shot else mine
        stream = iter(stream) if one_shot else stream
    res = fit_masks(model, ms, _lm_ce, stream, seed=seed, progress=False,
                    distributed=rank is not None, **opts)
    return {"history": res.history, "steps": res.steps, "reason": res.stopped_reason,
            "world_size": res.world_size, "seed": res.seed,
            "logits": {k: v.detach().clone() for k, v in ms.logits.items()},
            "hard": ms.hard_masks()}


def _worker(rank: int, port: int, tokenizer, out_dir: str) -> None:
    torch.set_num_threads(1)  # before any parallel op in the forked child
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    info = distributed.init(timeout_s=60)
    assert (info.rank, info.world_size, info.backend, info.device) == (rank, WORLD, "gloo", "cpu")
    try:
        out = {case: _fit(tokenizer, case, rank=rank) for case in CASES}
        sync = distributed.GradSync()
        sync.check_same([torch.ones(3), torch.arange(4.0)])  # equal everywhere: passes
        try:  # differs between ranks: must raise on every rank
            sync.check_same([torch.ones(3), torch.full((2,), float(rank))])
            out["differ"] = None
        except InterpError as e:
            out["differ"] = str(e)
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        distributed.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tiny_tokenizer, tmp_path_factory):
    """Per case: the single-process fit, then what each of the 2 ranks trained."""
    if "fork" not in mp.get_all_start_methods() or not torch.distributed.is_gloo_available():
        pytest.skip("needs fork and torch.distributed with gloo (Linux CI has both)")
    out = tmp_path_factory.mktemp("ddp")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the children inherit one thread: no OpenMP pool across fork
    try:
        single = {case: _fit(tiny_tokenizer, case) for case in CASES}
        mp.start_processes(_worker, args=(_free_port(), tiny_tokenizer, str(out)),
                           nprocs=WORLD, join=True, start_method="fork")
    finally:
        torch.set_num_threads(threads)
    ranks = [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]
    return single, ranks


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_equal_one_process(runs, case):
    single = runs[0][case]
    r0, r1 = (run[case] for run in runs[1])
    # identical on every rank, bit for bit: masks, logits, history (without wall times)
    assert all(torch.equal(r0["hard"][k], r1["hard"][k]) for k in r0["hard"])
    assert all(torch.equal(r0["logits"][k], r1["logits"][k]) for k in r0["logits"])
    strip = lambda h: [{k: v for k, v in rec.items() if k != "elapsed"} for rec in h]
    assert strip(r0["history"]) == strip(r1["history"])
    assert r0["world_size"] == WORLD and r0["seed"] == 0 == r1["seed"]
    # the same fit as one process on the global batches, up to float32 rounding. Summing the
    # rows in two halves changes gradients in their last bits; AdamW's step g / (|g| + 1e-8)
    # magnifies that where a gradient is near 1e-8 (measured up to 1.4e-4 here), so logits
    # are compared to 1% of one lr step; the losses are compared more tightly below
    assert (r0["steps"], r0["reason"]) == (single["steps"], single["reason"])
    for k, v in single["logits"].items():
        torch.testing.assert_close(r0["logits"][k], v, rtol=1e-4, atol=5e-4)
    for a, b in zip(r0["history"], single["history"]):
        for key in ("task_loss", "penalty", "loss", "temperature"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (key, a, b)
        assert a["active_fraction"] == pytest.approx(b["active_fraction"], abs=1e-4)
    expect = {"continuous": ("max_steps", 7), "hard_concrete": ("max_steps", 5),
              "exhausted": ("data_exhausted", 2), "hf_path": ("max_steps", 4)}
    if case in expect:
        assert (single["reason"], single["steps"]) == expect[case]
    else:  # the rule fired before the step budget ran out
        assert single["reason"] == "stop_rule" and single["steps"] < 60
    # the fit did something: logits moved away from their start
    assert any(v.abs().max() > 0.01 for v in single["logits"].values())


def test_ranks_that_differ_are_caught(runs):
    for run in runs[1]:
        assert run["differ"] is not None
        assert "mask logits differ between ranks (tensor 1 of 2, and 0 more)" in run["differ"]


# --------------------------------------------------------------------------- helpers


def test_shard_splits_every_batch_form():
    x = torch.arange(12).reshape(6, 2)
    t = torch.randn(6, 2, 5)
    assert torch.equal(distributed.shard(x, 1, 3), x[2:4])
    d = distributed.shard({"tokens": x, "teacher_logits": t, "note": "x"}, 2, 3)
    assert torch.equal(d["tokens"], x[4:]) and torch.equal(d["teacher_logits"], t[4:])
    assert d["note"] == "x"
    a, b = distributed.shard((x, t), 0, 2)
    assert torch.equal(a, x[:3]) and torch.equal(b, t[:3])
    # the shards of all ranks rebuild the global batch, in order
    assert torch.equal(torch.cat([distributed.shard(x, r, 3) for r in range(3)]), x)
    assert distributed.shard(x, 0, 1) is x  # one process: untouched
    with pytest.raises(ConfigError, match="does not split evenly over 4"):
        distributed.shard(x, 0, 4)


def test_shard_batches_keeps_the_stream_form():
    batches = [torch.arange(4 * i, 4 * i + 4).reshape(4, 1) for i in range(3)]
    again = distributed.shard_batches(batches, 1, 2)
    assert iter(again) is not again  # re-iterable: fit_masks cycles it
    assert [b.flatten().tolist() for b in again] == [[2, 3], [6, 7], [10, 11]]
    assert [b.flatten().tolist() for b in again] == [[2, 3], [6, 7], [10, 11]]
    once = distributed.shard_batches(iter(batches), 0, 2)
    assert iter(once) is once and [b.flatten().tolist() for b in once][0] == [0, 1]
    seeds = []
    fn = distributed.shard_batches(lambda s: seeds.append(s) or batches, 0, 2)
    assert callable(fn) and next(iter(fn(7))).flatten().tolist() == [0, 1] and seeds == [7]


def test_single_process_info_and_errors(native_model, monkeypatch):
    for var in distributed.ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    info = distributed.init(device="cpu")  # plain python: nothing to join
    assert (info.rank, info.world_size, info.is_main, info.initialized) == (0, 1, True, False)
    assert distributed.info() == distributed.DistInfo()
    with distributed.main_first() as here:
        assert here.is_main
    ms = MaskSet.for_model(native_model, seed=0)
    batch = _global_batches(1)
    with pytest.raises(ConfigError, match="torchrun"):
        fit_masks(native_model, ms, _lm_ce, batch, max_steps=1, distributed=True,
                  progress=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "two")
    with pytest.raises(ConfigError, match="RANK='two' is not a whole number"):
        distributed.init()
    monkeypatch.setenv("RANK", "3")
    with pytest.raises(ConfigError, match=r"RANK=3 does not lie in \[0, WORLD_SIZE=2\)"):
        distributed.init()
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ConfigError, match="Unknown backend 'tcp'"):
        distributed.init(backend="tcp", device="cpu")
    with pytest.raises(ConfigError, match="'nccl' needs GPUs"):
        distributed.init(backend="nccl", device="cpu")
