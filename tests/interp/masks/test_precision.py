"""The precision option of fit_masks, train_lm, the bigram study and the CLI: the model runs
under autocast (bfloat16 on a CPU here), mask logits and AdamW state stay float32, results
stay close to float32, the model's weights come back untouched, bad dtypes fail clearly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import interp.masks.train as train_mod
from interp.errors import ConfigError
from interp.masks import ContinuousSparsification, MaskSet, fit_masks
from interp.models.lm import TrainConfig, build_lm, resolve_dtype, train_lm

VOCAB = 299  # len(tiny_tokenizer)



def _batches(n: int = 4, batch: int = 8, pos: int = 24, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (batch, pos), generator=g) for _ in range(n)]


class _CE:
    """Next-token cross-entropy that records the dtype the model computed its logits in."""

    def __init__(self):
        self.dtypes: set[torch.dtype] = set()

    def __call__(self, model, batch):
        logits = model(batch)
        self.dtypes.add(logits.dtype)
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten())


def _fit(tokenizer, dtype, monkeypatch=None, steps: int = 15):
    """A short fit; returns the result, the mask set, the objective, the optimizer, the
    model's parameters before and after."""
    model = build_lm("test", tokenizer=tokenizer, seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ms = MaskSet.for_model(model, kind=ContinuousSparsification(temperature_factor=1.05), seed=0)
    made = []
    if monkeypatch is not None:  # keep the optimizer fit_masks builds, to inspect its state
        real = train_mod._adamw
        monkeypatch.setattr(train_mod, "_adamw", lambda ps, lr: made.append(real(ps, lr))
                            or made[-1])
    obj = _CE()
    res = fit_masks(model, ms, obj, _batches(), lam=1.0, lr=0.05, max_steps=steps,
                    stop_rule=False, progress=False, dtype=dtype)
    after = dict(model.named_parameters())
    return res, ms, obj, (made[-1] if made else None), before, after


def _flat(ms: MaskSet) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in ms.parameters()])


def test_bf16_fit_runs_in_bf16_and_keeps_masks_and_state_fp32(tiny_tokenizer, monkeypatch):
    res, ms, obj, opt, before, after = _fit(tiny_tokenizer, "bfloat16", monkeypatch)
    assert obj.dtypes == {torch.bfloat16}  # the model ran under autocast
    assert res.dtype == "bfloat16" and res.steps == 15
    # mask logits, their gradients and AdamW's moments: float32
    assert all(p.dtype == torch.float32 for p in ms.parameters())
    assert all(p.grad.dtype == torch.float32 for p in ms.parameters())
    states = [opt.state[p] for p in ms.parameters()]
    assert len(states) == len(ms.names)
    assert all(s["exp_avg"].dtype == s["exp_avg_sq"].dtype == torch.float32 for s in states)
    # detached: the model's weights are the same float32 tensors, bit for bit
    assert not ms.attached
    assert after.keys() == before.keys()
    assert all(after[n].dtype == before[n].dtype and torch.equal(after[n], before[n])
               for n in before)


def test_bf16_fit_is_close_to_fp32(tiny_tokenizer):
    ref, ms32, obj32, *_ = _fit(tiny_tokenizer, None)
    bf, ms16, *_ = _fit(tiny_tokenizer, torch.bfloat16)
    assert obj32.dtypes == {torch.float32} and ref.dtype == "float32"
    for a, b in zip(ref.history, bf.history):  # losses within bfloat16's rounding
        assert b["task_loss"] == pytest.approx(a["task_loss"], rel=2e-3)
        assert b["penalty"] == pytest.approx(a["penalty"], rel=1e-3)
    a, b = _flat(ms32), _flat(ms16)
    # logits move ~0.5 on average; bfloat16 gradients flip a few near-zero ones (measured:
    # mean |diff| 0.0017, correlation 0.99996, hard masks agree on 99.85%)
    assert (a - b).abs().mean() < 0.01 * a.abs().mean()
    assert torch.corrcoef(torch.stack([a, b]))[0, 1] > 0.999
    agree = torch.cat([(ms32.hard_masks()[n] == ms16.hard_masks()[n]).flatten()
                       for n in ms32.names]).float().mean()
    assert agree > 0.99


def test_fp16_loss_scaling_path(tiny_tokenizer, monkeypatch):
    """float16 is refused on a CPU (slow), but its loss-scaling path is the GPU's: run it on
    the CPU by letting resolve_dtype through, and check the scaler steps and the result."""
    ref, ms32, *_ = _fit(tiny_tokenizer, None)
    monkeypatch.setattr(train_mod, "resolve_dtype", lambda dtype, device: torch.float16)
    scalers = []
    real = train_mod.grad_scaler
    monkeypatch.setattr(train_mod, "grad_scaler",
                        lambda dev, dt: scalers.append(real(dev, dt)) or scalers[-1])
    res, ms16, obj, *_ = _fit(tiny_tokenizer, "float16")
    assert obj.dtypes == {torch.float16} and res.dtype == "float16"
    assert len(scalers) == 1 and scalers[0] is not None
    assert scalers[0].get_scale() > 1.0  # the loss was scaled (2**16 at the start)
    assert all(p.dtype == torch.float32 for p in ms16.parameters())
    a, b = _flat(ms32), _flat(ms16)
    assert (a - b).abs().mean() < 0.01 * a.abs().mean()
    assert res.history[-1]["task_loss"] == pytest.approx(ref.history[-1]["task_loss"], rel=2e-3)


def test_bad_dtypes_fail_clearly(native_model):
    ms = MaskSet.for_model(native_model, seed=0)
    run = lambda dtype: fit_masks(native_model, ms, lambda m, b: m(b).float().mean(),
                                  _batches(1), max_steps=1, progress=False, dtype=dtype)
    for bad in ("int8", torch.int8, torch.float64):
        with pytest.raises(ConfigError, match="is not a compute dtype; use one of float32, "
                                              "bfloat16, float16"):
            run(bad)
    with pytest.raises(ConfigError, match="Did you mean: bfloat16"):
        run("bfloat")
    with pytest.raises(ConfigError, match="float16 needs a GPU.*Use bfloat16 on a CPU"):
        run("float16")
    with pytest.raises(ConfigError, match="'gpu' is not a device"):
        resolve_dtype("bfloat16", "gpu")
    assert not ms.attached and all(p.dtype == torch.float32 for p in ms.parameters())
    # names, aliases and dtypes that work
    assert resolve_dtype(None, "cpu") is torch.float32
    assert resolve_dtype("bf16", "cpu") is resolve_dtype(torch.bfloat16, "cpu") is torch.bfloat16
    assert resolve_dtype("float16", "cuda") is torch.float16 or not torch.cuda.is_available()


# --------------------------------------------------------------------------- train_lm


def test_train_lm_bf16_close_to_fp32_and_keeps_fp32_weights(tiny_tokenizer, tmp_path):
    from interp.models.checkpoints import CheckpointStore

    g = torch.Generator().manual_seed(0)
    train, val = (torch.randint(0, VOCAB, (n,), generator=g) for n in (2000, 400))
    cfg = TrainConfig(steps=6, batch_size=4, seq_len=16, warmup_steps=1, eval_every=6,
                      eval_batches=2, checkpoint_every=6)
    results = {}
    for dtype in ("float32", "bfloat16"):
        model = build_lm("test", tokenizer=tiny_tokenizer, seed=0)
        store = CheckpointStore(tmp_path / dtype, {"dtype": dtype})
        results[dtype] = train_lm(model, train, val, cfg, store=store, progress=False,
                                  dtype=dtype)
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert store.metadata(6)["dtype"] == dtype
    a, b = results["float32"], results["bfloat16"]
    assert (a.dtype, b.dtype) == ("float32", "bfloat16")
    for ra, rb in zip(a.history, b.history):
        assert rb["train_loss"] == pytest.approx(ra["train_loss"], rel=1e-2)
    assert b.val_loss == pytest.approx(a.val_loss, rel=1e-2)
    with pytest.raises(ConfigError, match="float16 needs a GPU"):
        train_lm(build_lm("test", tokenizer=tiny_tokenizer, seed=0), train, val, cfg,
                 progress=False, dtype="float16")


# --------------------------------------------------------------------------- study and CLI


def test_study_config_and_cli_dtype(tmp_path, capsys):
    from analyses import cli
    from analyses.studies._bigram_config import BigramStudyConfig

    parse = lambda *argv: cli.bigram_config(cli.build_parser().parse_args(["bigram", *argv]))
    cfg = parse("--out", str(tmp_path / "a"), "--dtype", "bfloat16")
    assert cfg.dtype == "bfloat16" and cfg.to_dict()["dtype"] == "bfloat16"
    assert parse("--out", str(tmp_path / "b")).dtype == "float32"  # the default
    # a stored config from before the option reads as float32: no difference, the run resumes
    stored = {k: v for k, v in parse("--out", str(tmp_path / "c")).to_dict().items()
              if k != "dtype"}
    assert parse("--out", str(tmp_path / "c")).diff(stored) == []
    assert cfg.diff(stored) == ["dtype"]  # but a bfloat16 run is another run
    with pytest.raises(ConfigError, match="float16 needs a GPU"):
        BigramStudyConfig.from_recipe("mini", dtype="float16", device="cpu")
    assert BigramStudyConfig.from_recipe("mini", dtype="bf16").dtype == "bfloat16"
    # the commands refuse float16 on a CPU before any work, with exit code 2
    for command in ("bigram", "train-lm"):
        out = tmp_path / command
        assert cli.main([command, "--out", str(out), "--dtype", "float16"]) == 2
        assert "--dtype float16 needs a GPU" in capsys.readouterr().err
        assert not out.exists()
    with pytest.raises(SystemExit):  # not a choice: argparse names the choices
        cli.build_parser().parse_args(["train-lm", "--dtype", "int8"])
    assert "invalid choice: 'int8'" in capsys.readouterr().err
