"""Bad input gets a typed error, never a traceback, and nothing is lost (docs/bad-input.md).

One test per row of the table: build the bad input by hand (a valid file written by the
library, then truncated, emptied or swapped), act, and check (a) the exact error type (for
the CLI: exit code 2 and an ``error:`` line or an argparse usage error, no traceback), (b) a
distinctive part of the message, (c) that every file that was there is still there with the
same bytes, no ``*.tmp`` file is left and every new JSON file is complete.

``INTERP_BAD_INPUT_TABLE=FILE pytest tests/test_bad_input.py`` appends each row's markdown
line (with the real message) to FILE, to refresh the table in docs/bad-input.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from analyses import cli
from interp.data.bigram import BigramCounts
from interp.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    HookError,
    MaskError,
    ModelLoadError,
)
from interp.io import write_json
from interp.masks import MaskSet, find_targets, fit_masks
from interp.models.checkpoints import CheckpointStore

USAGE = None  # Row.error for an argparse usage error (exit 2)


# --------------------------------------------------------------------------- helpers


class Env:
    """What a row's setup gets: a scratch directory and the conftest fixtures."""

    def __init__(self, tmp: Path, request, monkeypatch):
        self.tmp, self.request, self.monkeypatch = tmp, request, monkeypatch

    def fixture(self, name: str):
        return self.request.getfixturevalue(name)

    def dir(self, name: str) -> Path:
        d = self.tmp / name
        d.mkdir(parents=True, exist_ok=True)
        return d

    def run_dir(self) -> Path:
        """A run directory that already holds the user's notes (which must survive)."""
        d = self.dir("run")
        (d / "notes.txt").write_text("my notes\n")
        return d

    def bigram_argv(self, *extra: str, out: Path | None = None) -> list[str]:
        out = self.run_dir() if out is None else out
        return ["bigram", "--out", str(out), "--model", "test",
                "--corpus", str(self.fixture("small_corpus_file")), *extra]

    def matching_config(self, argv: list[str]) -> dict:
        """The config.json ``interp bigram`` writes for ``argv``."""
        return cli.bigram_config(cli.build_parser().parse_args(argv)).to_dict()


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def empty(path: Path) -> None:
    path.write_bytes(b"")


def delete(path: Path) -> None:
    path.unlink()


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def assert_nothing_lost(root: Path, before: dict[str, str]) -> None:
    after = snapshot(root)
    lost = {k for k in before if after.get(k) != before[k]}
    assert not lost, f"files lost or changed: {sorted(lost)}"
    assert not [k for k in after if k.endswith(".tmp")], f"temp files left: {sorted(after)}"
    for k in set(after) - set(before):  # new files must be whole
        if k.endswith(".json"):
            json.loads((root / k).read_text())


def _plain(message: str) -> str:
    """The message with scratch paths shortened (for the docs table)."""
    message = re.sub(r"/\S*?/pytest-\d+/(?:[^/\s'\")]+/)?", "…/", message)
    return message.replace("|", "\\|").replace("\n", " ")


# --------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Row:
    id: str
    user: str  # what the user did
    where: str  # CLI command or Python API call
    error: type | None  # an interp.errors class; USAGE for an argparse usage error
    match: str  # a distinctive part of the message (literal)
    setup: Callable[[Env], object]  # builds the bad input; returns argv (CLI) or an action

    @property
    def cli(self) -> bool:
        return self.where.startswith("interp ")


# ---- mask sets (.safetensors + .json sidecar)

def _maskset(damage, which: str):
    def setup(env: Env):
        model = env.fixture("native_model")
        path = MaskSet.for_model(model).save(env.dir("masks") / "bigram")
        damage(path if which == "tensors" else path.with_suffix(".json"))
        return lambda: MaskSet.load(path, model)
    return setup


def _tiny(env: Env):
    from interp.models.lm import build_lm

    return build_lm("tiny", env.fixture("tiny_tokenizer"), seed=0)


def _maskset_other_model(env: Env):
    path = MaskSet.for_model(_tiny(env)).save(env.dir("masks") / "tiny")
    model = env.fixture("native_model")
    return lambda: MaskSet.load(path, model)


def _maskset_swapped_sidecar(env: Env):
    d, model = env.dir("masks"), env.fixture("native_model")
    path = MaskSet.for_model(model).save(d / "a")
    MaskSet.for_model(_tiny(env)).save(d / "b")
    shutil.copy(d / "b.json", d / "a.json")
    return lambda: MaskSet.load(path, model)


def _maskset_bad_mode(env: Env):
    model = env.fixture("native_model")
    path = MaskSet.for_model(model).save(env.dir("masks") / "bigram")
    side = path.with_suffix(".json")
    data = json.loads(side.read_text())
    data["mode"] = "prune"
    side.write_text(json.dumps(data))
    return lambda: MaskSet.load(path, model)


def _conv_mask_on_bridge(env: Env):
    net = env.fixture("conv_net")
    path = MaskSet.for_model(net, targets={"conv": (net.conv, "weight")}).save(
        env.dir("masks") / "conv")
    model = env.fixture("native_model")
    return lambda: MaskSet.load(path, model)


def _unknown_mode(env: Env):
    model = env.fixture("native_model")
    ms = MaskSet.for_model(model)

    def act():
        with ms.applied(model, mode="kep"):
            pass
    return act


# ---- paper-format pickles

def _paper_file(env: Env) -> Path:
    return MaskSet.for_model(env.fixture("gpt2")).export_paper(env.dir("paper") / "masks.pkl")


def _paper(damage):
    def setup(env: Env):
        path, model = _paper_file(env), env.fixture("gpt2")
        damage(path)
        return lambda: MaskSet.import_paper(path, model)
    return setup


def _paper_wrong_shape(env: Env):
    from interp.masks import load_paper_masks

    path, model = _paper_file(env), env.fixture("gpt2")
    data = load_paper_masks(path)
    data["transformer.h.0.attn.c_attn.weight"] = np.ones((3, 3), dtype=bool)
    path.write_bytes(pickle.dumps(data))
    return lambda: MaskSet.import_paper(path, model)


def _paper_unsafe(env: Env):
    path = env.dir("paper") / "masks.pkl"
    path.write_bytes(pickle.dumps({"transformer.h.0.attn.c_attn.weight": os.system}))
    model = env.fixture("gpt2")
    return lambda: MaskSet.import_paper(path, model)


def _paper_on_native(env: Env):
    path, model = _paper_file(env), env.fixture("native_model")
    return lambda: MaskSet.import_paper(path, model)


# ---- bigram counts (.safetensors + .safetensors.json sidecar)

def _counts_file(d: Path, n_tokens: int = 500, seed: int = 0) -> Path:
    gen = torch.Generator().manual_seed(seed)
    counts = BigramCounts.from_tokens(torch.randint(0, 50, (n_tokens,), generator=gen), 50)
    return counts.save(d / "counts.safetensors")


def _counts(damage, which: str):
    def setup(env: Env):
        path = _counts_file(env.dir("counts"))
        if which in ("tensors", "both"):
            damage(path)
        if which in ("sidecar", "both"):
            damage(Path(f"{path}.json"))
        return lambda: BigramCounts.load(path)
    return setup


def _counts_swapped_sidecar(env: Env):
    path = _counts_file(env.dir("counts"))
    other = _counts_file(env.dir("other"), n_tokens=300, seed=1)
    shutil.copy(f"{other}.json", f"{path}.json")
    return lambda: BigramCounts.load(path)


# ---- LM checkpoint store (store.json, step-N.json, step-N.safetensors)

IDENTITY = {"preset": "test", "vocab": 300}


def _store(env: Env) -> Path:
    d = env.dir("lm")
    CheckpointStore(d, IDENTITY).save(env.fixture("native_model"), 10,
                                      metadata={"val_loss": 5.0})
    return d


def _store_manifest(damage):
    def setup(env: Env):
        d = _store(env)
        damage(d / "store.json")
        return lambda: CheckpointStore(d, IDENTITY)
    return setup


def _step(damage, suffix: str):
    def setup(env: Env):
        d, model = _store(env), env.fixture("native_model")
        damage(d / f"step-000010{suffix}")
        return lambda: CheckpointStore(d, IDENTITY).load(10, model=model)
    return setup


def _step_no_key(path: Path) -> None:
    path.write_text(json.dumps({"val_loss": 5.0}))


def _store_other_config(env: Env):
    d = _store(env)
    return lambda: CheckpointStore(d, {**IDENTITY, "preset": "tiny"})


def _step_other_model(env: Env):
    d, model = _store(env), _tiny(env)
    return lambda: CheckpointStore(d, IDENTITY).load(10, model=model)


def _step_unknown(env: Env):
    d, model = _store(env), env.fixture("native_model")
    return lambda: CheckpointStore(d, IDENTITY).load(20, model=model)


# ---- tokenizer directories

def _tokenizer_copy(env: Env, dest: Path) -> Path:
    shutil.copytree(env.fixture("tiny_tokenizer").name_or_path, dest)
    return dest


def _tokenizer(damage):
    def setup(env: Env):
        from interp.data.text import load_tokenizer

        d = _tokenizer_copy(env, env.tmp / "tokenizer")
        damage(d / "tokenizer.json")
        return lambda: load_tokenizer(d)
    return setup


def _tokenizer_empty_dir(env: Env):
    from interp.data.text import load_tokenizer

    d = env.dir("tokenizer")
    return lambda: load_tokenizer(d)


def _tokenizer_missing(env: Env):
    from interp.data.text import load_tokenizer

    return lambda: load_tokenizer(env.tmp / "no-tokenizer")


# ---- HF model directories

def _hf_copy(env: Env, damage) -> Path:
    d = shutil.copytree(env.fixture("hf_gpt2_dir"), env.tmp / "gpt2")
    damage(d)
    return d


def _hf(damage):
    def setup(env: Env):
        from interp.models.lm import load_hf_lm

        d = _hf_copy(env, damage)
        return lambda: load_hf_lm(d)
    return setup


# ---- probes, targets, numbers

def _hooks(env: Env):
    from interp.probes import check_hook_names

    model = env.fixture("native_model")
    return lambda: check_hook_names(model, ["blocks.0.hook_resid_pree"])


def _collect(env: Env):
    from interp.probes import collect_stats

    model = env.fixture("native_model")
    batches = [torch.randint(0, 300, (2, 8), generator=torch.Generator().manual_seed(0))]
    return lambda: collect_stats(model, batches, ["blocks.0.hook_mlp_ot"], progress=False)


def _fit(**kwargs):
    def setup(env: Env):
        model = env.fixture("native_model")
        ms = MaskSet.for_model(model)
        batches = [torch.zeros(2, 8, dtype=torch.long)]
        return lambda: fit_masks(model, ms, lambda m, b: m(b).mean(), batches,
                                 progress=False, **kwargs)
    return setup


def _train_steps0(env: Env):
    from interp.models.lm import TrainConfig, train_lm

    model = env.fixture("native_model")
    tokens = torch.zeros(1000, dtype=torch.long)
    return lambda: train_lm(model, tokens, tokens, TrainConfig(steps=0), progress=False)


# ---- CLI: run directories

def _run_json(name: str, damage):
    """A run directory whose config matches the command and whose ``name`` is damaged."""
    def setup(env: Env):
        run = env.run_dir()
        argv = env.bigram_argv(out=run)
        write_json(run / "config.json", env.matching_config(argv))
        write_json(run / name, {"data": 1.5, "lm": 20.0})
        damage(run / name)
        return argv
    return setup


def _run_other_config(env: Env):
    run = env.run_dir()
    argv = env.bigram_argv(out=run)
    stored = env.matching_config(argv)
    stored["lm_steps"] += 1
    write_json(run / "config.json", stored)
    return argv


def _corpus(content: bytes | None, name: str = "corpus.txt"):
    def setup(env: Env):
        path = env.dir("data") / name
        if content is not None:
            path.write_bytes(content)
        return ["bigram", "--out", str(env.run_dir()), "--model", "test", "--corpus", str(path)]
    return setup


def _out_file(command: str, below: bool = False):
    def setup(env: Env):
        f = env.tmp / "results.txt"
        f.write_text("results I keep\n")
        out = f / "run" if below else f
        if command == "bigram":
            return env.bigram_argv(out=out)
        return ["train-lm", "--out", str(out), "--preset", "test", "--steps", "1",
                "--corpus", str(env.fixture("small_corpus_file"))]
    return setup


def _model_dir(kind: str):
    def setup(env: Env):
        if kind == "not-hf":
            d = env.dir("my-model")
            (d / "weights.pt").write_bytes(b"\0" * 16)
        else:
            d = env.tmp / "no-such-model"
        return ["bigram", "--out", str(env.run_dir()), "--model", str(d)]
    return setup


def _no_gpu(env: Env):
    env.monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    return env.bigram_argv("--device", "cuda")


def _flags(*flags: str, command: str = "bigram"):
    def setup(env: Env):
        if command == "bigram":
            return env.bigram_argv(*flags)
        return ["train-lm", "--out", str(env.run_dir()), *flags]
    return setup


ROWS: list[Row] = [
    # mask sets
    Row("maskset-tensors-truncated", "mask set .safetensors cut in half", "MaskSet.load(path, model)",
        MaskError, "is truncated or not a safetensors file", _maskset(truncate, "tensors")),
    Row("maskset-tensors-empty", "mask set .safetensors empty (0 bytes)", "MaskSet.load(path, model)",
        MaskError, "is empty (an interrupted write?)", _maskset(empty, "tensors")),
    Row("maskset-tensors-missing", "mask set .safetensors deleted, sidecar kept",
        "MaskSet.load(path, model)", MaskError, "does not exist", _maskset(delete, "tensors")),
    Row("maskset-sidecar-truncated", "mask set .json sidecar cut in half",
        "MaskSet.load(path, model)", MaskError, "is not valid JSON", _maskset(truncate, "sidecar")),
    Row("maskset-sidecar-empty", "mask set .json sidecar empty", "MaskSet.load(path, model)",
        MaskError, "Mask-set sidecar", _maskset(empty, "sidecar")),
    Row("maskset-sidecar-missing", "mask set .json sidecar deleted", "MaskSet.load(path, model)",
        MaskError, "does not exist", _maskset(delete, "sidecar")),
    Row("maskset-sidecar-swapped", "sidecar of another mask set next to the tensors",
        "MaskSet.load(path, model)", MaskError, "the two files belong to different mask sets",
        _maskset_swapped_sidecar),
    Row("maskset-sidecar-bad-mode", "sidecar edited by hand: mode \"prune\"",
        "MaskSet.load(path, model)", MaskError, "has mode 'prune'", _maskset_bad_mode),
    Row("maskset-other-model", "mask set of the `tiny` preset loaded onto the `test` preset",
        "MaskSet.load(path, model)", MaskError,
        "weight 'blocks.0.attn.q' has shape (32, 32) in the model but (128, 128) in the mask",
        _maskset_other_model),
    Row("maskset-conv-on-bridge", "conv-net mask set loaded onto a TransformerBridge",
        "MaskSet.load(path, bridge)", MaskError, "the model has no module 'conv'",
        _conv_mask_on_bridge),
    Row("find-targets-plain-module", "find_targets on a conv net without include=",
        "find_targets(conv_net)", MaskError, "is not a TransformerBridge",
        lambda env: (lambda net=env.fixture("conv_net"): find_targets(net))),
    Row("find-targets-unknown", "a typo in a target name", "find_targets(model, [\"blocks.0.mlp.inn\"])",
        MaskError, "Did you mean: blocks.0.mlp.in",
        lambda env: (lambda m=env.fixture("native_model"): find_targets(m, ["blocks.0.mlp.inn"]))),
    Row("mask-mode-unknown", "a typo in a mask mode", "ms.applied(model, mode=\"kep\")",
        MaskError, "Unknown mask mode 'kep'", _unknown_mode),
    # paper-format pickles
    Row("paper-truncated", "paper mask pickle cut in half", "MaskSet.import_paper(path, model)",
        MaskError, "is not a readable mask pickle", _paper(truncate)),
    Row("paper-empty", "paper mask pickle empty", "MaskSet.import_paper(path, model)",
        MaskError, "Mask pickle", _paper(empty)),
    Row("paper-wrong-shape", "paper mask with a (3, 3) array for c_attn",
        "MaskSet.import_paper(path, model)", MaskError,
        "weight 'transformer.h.0.attn.c_attn.weight' has shape (32, 96) in the model but (3, 3)",
        _paper_wrong_shape),
    Row("paper-unsafe", "a pickle that would call os.system", "MaskSet.import_paper(path, model)",
        MaskError, "Refusing to load", _paper_unsafe),
    Row("paper-native-model", "paper mask imported into a native (non-HF) bridge",
        "MaskSet.import_paper(path, native_model)", MaskError, "has no HF parameter name",
        _paper_on_native),
    # bigram counts
    Row("counts-tensors-truncated", "bigram counts .safetensors cut in half",
        "BigramCounts.load(path)", DataError, "is truncated or not a safetensors file",
        _counts(truncate, "tensors")),
    Row("counts-tensors-empty", "bigram counts .safetensors empty", "BigramCounts.load(path)",
        DataError, "Bigram counts", _counts(empty, "tensors")),
    Row("counts-sidecar-truncated", "bigram counts sidecar cut in half", "BigramCounts.load(path)",
        DataError, "is not valid JSON", _counts(truncate, "sidecar")),
    Row("counts-sidecar-empty", "bigram counts sidecar empty", "BigramCounts.load(path)",
        DataError, "Bigram-counts sidecar", _counts(empty, "sidecar")),
    Row("counts-sidecar-missing", "bigram counts sidecar deleted", "BigramCounts.load(path)",
        DataError, "does not exist", _counts(delete, "sidecar")),
    Row("counts-missing", "bigram counts path with no files", "BigramCounts.load(path)",
        DataError, "not found", _counts(delete, "both")),
    Row("counts-sidecar-swapped", "sidecar of other counts next to the tensors",
        "BigramCounts.load(path)", DataError, "do not match their sidecar",
        _counts_swapped_sidecar),
    # checkpoint store
    Row("store-json-truncated", "checkpoint store.json cut in half", "CheckpointStore(dir, identity)",
        CheckpointError, "Checkpoint store manifest", _store_manifest(truncate)),
    Row("store-json-empty", "checkpoint store.json empty", "CheckpointStore(dir, identity)",
        CheckpointError, "is empty", _store_manifest(empty)),
    Row("store-other-config", "a store directory of another configuration",
        "CheckpointStore(dir, identity)", CheckpointError, "differs in: preset",
        _store_other_config),
    Row("step-json-truncated", "step-N.json cut in half", "store.load(step, model=model)",
        CheckpointError, "Checkpoint sidecar", _step(truncate, ".json")),
    Row("step-json-empty", "step-N.json empty", "store.load(step, model=model)",
        CheckpointError, "is empty", _step(empty, ".json")),
    Row("step-json-no-step", "step-N.json without its \"step\" entry",
        "store.load(step, model=model)", CheckpointError, "has no 'step' entry",
        _step(_step_no_key, ".json")),
    Row("step-weights-truncated", "step-N.safetensors cut in half", "store.load(step, model=model)",
        CheckpointError, "Checkpoint weights", _step(truncate, ".safetensors")),
    Row("step-weights-empty", "step-N.safetensors empty", "store.load(step, model=model)",
        CheckpointError, "is empty", _step(empty, ".safetensors")),
    Row("step-other-model", "a `test` checkpoint loaded into a `tiny` model",
        "store.load(step, model=model)", CheckpointError, "belongs to another configuration",
        _step_other_model),
    Row("step-unknown", "a step that was never saved", "store.load(20)", CheckpointError,
        "available: [10]", _step_unknown),
    # tokenizers
    Row("tokenizer-truncated", "tokenizer.json cut in half", "load_tokenizer(dir)",
        ModelLoadError, "Tokenizer file", _tokenizer(truncate)),
    Row("tokenizer-empty", "tokenizer.json empty", "load_tokenizer(dir)", ModelLoadError,
        "is empty", _tokenizer(empty)),
    Row("tokenizer-no-files", "a directory without tokenizer files", "load_tokenizer(dir)",
        ModelLoadError, "holds no tokenizer", _tokenizer_empty_dir),
    Row("tokenizer-missing", "a tokenizer path that does not exist", "load_tokenizer(dir)",
        ModelLoadError, "does not exist",
        _tokenizer_missing),
    # HF model directories
    Row("hf-config-truncated", "HF model config.json cut in half", "load_hf_lm(dir)",
        ModelLoadError, "Model config", _hf(lambda d: truncate(d / "config.json"))),
    Row("hf-weights-missing", "HF model directory without its weights", "load_hf_lm(dir)",
        ModelLoadError, "save_pretrained", _hf(lambda d: delete(d / "model.safetensors"))),
    Row("hf-weights-truncated", "HF model.safetensors cut in half", "load_hf_lm(dir)",
        ModelLoadError, "damaged or incomplete", _hf(lambda d: truncate(d / "model.safetensors"))),
    # probes
    Row("hook-typo", "a typo in a hook name", "check_hook_names(model, names)", HookError,
        "Did you mean: blocks.0.hook_resid_pre", _hooks),
    Row("collect-stats-typo", "a typo in a hook name", "collect_stats(model, batches, names)",
        HookError, "Did you mean: blocks.0.hook_mlp_out", _collect),
    # numbers (API)
    Row("fit-masks-lr-0", "learning rate 0", "fit_masks(..., lr=0)", ConfigError,
        "lr must be > 0, got 0", _fit(lr=0)),
    Row("fit-masks-max-steps-0", "no steps", "fit_masks(..., max_steps=0)", ConfigError,
        "max_steps must be >= 1, got 0", _fit(max_steps=0)),
    Row("train-lm-steps-0", "TrainConfig(steps=0)", "train_lm(model, ..., TrainConfig(steps=0))",
        ConfigError, "steps must be >= 1, got 0", _train_steps0),
    # CLI: numbers
    Row("cli-mask-steps-0", "`--mask-steps 0`", "interp bigram", USAGE,
        "argument --mask-steps: must be at least 1, got 0", _flags("--mask-steps", "0")),
    Row("cli-mask-steps-negative", "`--mask-steps -5`", "interp bigram", USAGE,
        "argument --mask-steps: must be at least 1, got -5", _flags("--mask-steps", "-5")),
    Row("cli-lambdas-negative", "`--lambdas -1`", "interp bigram", ConfigError,
        "every lambda must be >= 0, got -1.0", _flags("--lambdas", "-1")),
    Row("cli-lambdas-not-numbers", "`--lambdas a,b`", "interp bigram", USAGE,
        "argument --lambdas: expected comma-separated numbers", _flags("--lambdas", "a,b")),
    Row("cli-lambdas-duplicates", "`--lambdas 0,1,1`", "interp bigram", ConfigError,
        "lambdas has duplicates", _flags("--lambdas", "0,1,1")),
    Row("cli-lm-steps-0", "`--lm-steps 0`", "interp bigram", USAGE,
        "argument --lm-steps: must be at least 1, got 0", _flags("--lm-steps", "0")),
    Row("cli-vocab-size-10", "`--vocab-size 10`", "interp bigram", ConfigError,
        "vocab_size must be >= 258, got 10", _flags("--vocab-size", "10")),
    Row("cli-temperature-factor", "`--temperature-factor 0.5`", "interp bigram", ConfigError,
        "temperature_factor must be >= 1, got 0.5", _flags("--temperature-factor", "0.5")),
    Row("cli-mask-lr-0", "`--mask-lr 0`", "interp bigram", USAGE,
        "argument --mask-lr: must be a finite number > 0, got 0", _flags("--mask-lr", "0")),
    Row("cli-seed-negative", "`--seed -1`", "interp bigram", USAGE,
        "argument --seed: must be at least 0, got -1", _flags("--seed", "-1")),
    Row("cli-recipe-unknown", "`--recipe papr`", "interp bigram", USAGE,
        "argument --recipe: invalid choice: 'papr'", _flags("--recipe", "papr")),
    Row("cli-train-lm-steps-0", "`--steps 0`", "interp train-lm", USAGE,
        "argument --steps: must be at least 1, got 0",
        _flags("--steps", "0", command="train-lm")),
    Row("cli-train-lm-vocab-size-10", "`--vocab-size 10`", "interp train-lm", ConfigError,
        "--vocab-size must be >= 258, got 10",
        _flags("--vocab-size", "10", command="train-lm")),
    # CLI: names
    Row("cli-preset-unknown", "`--preset nope`", "interp train-lm", ConfigError,
        "Unknown LM preset 'nope'; presets are ['small', 'test', 'tiny', 'tiny4']",
        _flags("--preset", "nope", command="train-lm")),
    Row("cli-model-preset-typo", "`--model tiny5` (a typo, not sent to the hub)", "interp bigram",
        ConfigError, "Unknown model preset 'tiny5'", lambda env: [
            "bigram", "--out", str(env.run_dir()), "--model", "tiny5"]),
    Row("cli-model-dir-not-hf", "`--model DIR` where DIR holds no HF model", "interp bigram",
        ModelLoadError, "is a directory but not a Hugging Face model (no config.json)",
        _model_dir("not-hf")),
    Row("cli-model-dir-missing", "`--model /path/that/does/not/exist`", "interp bigram",
        ModelLoadError, "is not an existing model directory", _model_dir("missing")),
    Row("cli-device-cuda", "`--device cuda` on a machine without a GPU", "interp bigram",
        ConfigError, "no CUDA GPU is available here. Use --device cpu", _no_gpu),
    Row("cli-device-unknown", "`--device gpu`", "interp bigram", ConfigError,
        "is not a device: use cpu, cuda or cuda:N", _flags("--device", "gpu")),
    # CLI: --out and run directories
    Row("cli-out-is-file", "`--out FILE` (an existing file)", "interp bigram", ConfigError,
        "is not a directory", _out_file("bigram")),
    Row("cli-out-below-file", "`--out FILE/run`", "interp bigram", ConfigError,
        "is a file", _out_file("bigram", below=True)),
    Row("cli-train-lm-out-is-file", "`--out FILE` (an existing file)", "interp train-lm",
        ConfigError, "is not a directory", _out_file("train-lm")),
    Row("cli-run-other-config", "`--out DIR` where DIR holds a run of another config",
        "interp bigram", ConfigError,
        "holds a run with another configuration (differs in: lm_steps)", _run_other_config),
    Row("cli-run-config-truncated", "the run's config.json cut in half", "interp bigram",
        ConfigError, "Run configuration", _run_json("config.json", truncate)),
    Row("cli-run-config-empty", "the run's config.json empty", "interp bigram", ConfigError,
        "is empty (an interrupted write?)", _run_json("config.json", empty)),
    Row("cli-run-timings-truncated", "the run's timings.json cut in half", "interp bigram",
        DataError, "Stage timings", _run_json("timings.json", truncate)),
    Row("cli-run-sweep-truncated", "the run's sweep.json cut in half", "interp bigram",
        DataError, "Study artifact", _run_json("sweep.json", truncate)),
    Row("cli-run-evaluation-empty", "the run's evaluation.json empty", "interp bigram",
        DataError, "evaluation.json' is empty", _run_json("evaluation.json", empty)),
    # CLI: corpus files
    Row("cli-corpus-missing", "`--corpus missing.txt`", "interp bigram", DataError,
        "does not exist. Check the path", _corpus(None)),
    Row("cli-corpus-missing-dataset", "`--corpus DIR/missing` (no suffix)", "interp bigram",
        DataError, "does not exist. Check the path", _corpus(None, name="missing")),
    Row("cli-corpus-empty", "`--corpus empty.txt`", "interp bigram", DataError,
        "is empty (no non-blank text)", _corpus(b"")),
    Row("cli-corpus-not-utf8", "`--corpus latin1.txt` (Latin-1 bytes)", "interp bigram",
        DataError, "is not UTF-8 text", _corpus("Où est la café?\n".encode("latin-1"))),
]

assert len({r.id for r in ROWS}) == len(ROWS)


# --------------------------------------------------------------------------- the test


def _run_cli(row: Row, argv: list[str], capsys, monkeypatch) -> tuple[str, BaseException | None]:
    """Run ``interp argv`` in-process; return stderr and the error the command raised."""
    raised: list[BaseException] = []
    for name in ("_cmd_bigram", "_cmd_train_lm"):  # build_parser looks them up per call
        command = getattr(cli, name)

        def spy(args, command=command):
            try:
                return command(args)
            except BaseException as e:
                raised.append(e)
                raise

        monkeypatch.setattr(cli, name, spy)
    capsys.readouterr()
    try:
        rc = cli.main(argv)
    except SystemExit as e:  # argparse
        rc = e.code
    out, err = capsys.readouterr()
    assert rc == 2
    assert "Traceback" not in err and "Traceback" not in out
    if row.error is USAGE:
        assert err.startswith("usage: interp"), err
        assert not raised
    else:
        assert err.startswith("error: "), err
        assert len(raised) == 1
    return err, raised[0] if raised else None


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_input(row: Row, tmp_path, request, monkeypatch, capsys):
    env = Env(tmp_path, request, monkeypatch)
    made = row.setup(env)
    before = snapshot(tmp_path)
    if row.cli:
        message, error = _run_cli(row, made, capsys, monkeypatch)
        if row.error is not USAGE:
            assert type(error) is row.error, repr(error)
            message = message.removeprefix("error: ").strip()
        else:
            message = message.strip().splitlines()[-1]
    else:
        with pytest.raises(row.error) as info:
            made()
        error = info.value
        assert type(error) is row.error, repr(error)
        message = str(error)
    assert row.match in message
    assert_nothing_lost(tmp_path, before)
    table = os.environ.get("INTERP_BAD_INPUT_TABLE")
    if table:
        kind = "argparse usage error, exit 2" if row.error is USAGE else row.error.__name__
        with open(table, "a", encoding="utf-8") as f:
            f.write(f"| {row.user} | `{row.where}` | {kind} | {_plain(message)} |\n")
