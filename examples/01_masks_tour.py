# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # A tour of `interp.masks`
#
# A *subnetwork* in `interp` is a `MaskSet`: one tensor of mask logits per weight matrix of a
# model, attached to the real weights as `torch.nn.utils.parametrize` parametrizations, so every
# forward pass (plain calls, `run_with_hooks`, `run_with_cache`) sees `W * mask`.
#
# This tour runs offline on a CPU in well under 30 seconds. It builds a tiny random GPT-NeoX
# (the Pythia architecture), loads it as a TransformerLens `TransformerBridge`, and walks through
# targets, modes, head editing, set algebra, random controls, files, the bigram paper's mask
# format, and `fit_masks`.
#
# Run it as a script (`python examples/01_masks_tour.py`) or open it in Jupyter with jupytext.
# On a machine whose cores are busy with other work, `OMP_NUM_THREADS=1` avoids torch's
# thread oversubscription, which slows models this small down many times over.

# %%
import pickle
import tempfile
from pathlib import Path

import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from interp.errors import MaskError
from interp.masks import (
    ContinuousSparsification,
    HardConcrete,
    MaskSet,
    find_targets,
    fit_masks,
    load_paper_masks,
)
from interp.models.lm import load_hf_lm

torch.manual_seed(0)
WORK = Path(tempfile.mkdtemp(prefix="interp-tour-"))

# %% [markdown]
# ## A tiny GPT-NeoX, loaded through TransformerBridge
#
# `load_hf_lm` takes a hub id (with a network) or any directory written by `save_pretrained`.
# Here the model is random: 2 layers, `d_model` 64, 4 heads of `d_head` 16, vocabulary 128.

# %%
hf_cfg = GPTNeoXConfig(
    vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
    intermediate_size=128, max_position_embeddings=64,
)
GPTNeoXForCausalLM(hf_cfg).save_pretrained(WORK / "neox")
model = load_hf_lm(WORK / "neox")
cfg = model.cfg
print(f"model: n_layers={cfg.n_layers} d_model={cfg.d_model} n_heads={cfg.n_heads} "
      f"d_head={cfg.d_head} d_mlp={cfg.d_mlp} d_vocab={cfg.d_vocab}")

tokens = torch.randint(0, cfg.d_vocab, (4, 16), generator=torch.Generator().manual_seed(0))
base_logits = model(tokens)

# %% [markdown]
# ## Targets: which weights a mask set can mask
#
# `find_targets` lists every attention and MLP weight matrix the bridge's forward pass reads,
# named in TransformerLens terms (`blocks.{l}.attn.q|k|v|o`, `blocks.{l}.mlp.in|out`).
# Embeddings, unembedding, norms and biases are never targets. Each target also knows where it
# sits in the HF checkpoint (`hf`), which is what the paper's mask format is keyed by.

# %%
targets = find_targets(model)
for t in targets[:6]:
    where = t.hf_name if t.hf is None or t.hf.axis is None else f"{t.hf_name} (rows of a fused weight)"
    print(f"{t.name:<17} block={t.block:<8} shape={t.shape}  hf: {where}")

# %% [markdown]
# Pick targets by name or glob; an unknown name raises `MaskError` with suggestions.

# %%
print([t.name for t in find_targets(model, ["blocks.0.attn.*"])])
try:
    find_targets(model, ["blocks.0.attn.qq"])
except MaskError as e:
    print("MaskError:", e)

# %% [markdown]
# **GPT-NeoX fact.** HF stores q, k and v in one fused `query_key_value` weight, interleaved per
# head. On TransformerLens 4.3 the bridge splits it into separate q/k/v linears that are
# *copies*; the forward pass reads the copies and never the fused weight. So masks sit on the
# copies, and `t.hf.take(fused)` is how a target maps back to de-interleaved fused rows.
# Zeroing the fused weight does not change the output:

# %%
q_target = targets[0]
fused = model.blocks[0].attn.qkv.original_component.weight
print("q copy == de-interleaved fused rows:", torch.equal(q_target.hf.take(fused.detach()),
                                                          q_target.weight.detach()))
with torch.no_grad():
    saved = fused.detach().clone()
    fused.zero_()
    unchanged = torch.equal(model(tokens), base_logits)
    fused.copy_(saved)
print("output unchanged with the fused weight zeroed:", unchanged)

# %% [markdown]
# ## A mask set and its modes
#
# `MaskSet.for_model` makes one logits tensor per target. With continuous sparsification (the
# paper's kind) logits start at 0: the soft mask is `sigmoid(0) = 0.5` and the hard mask
# (`logits > 0`) keeps nothing yet. Modes decide what an attached set does:
#
# | mode | weights seen by the forward pass |
# |---|---|
# | `soft` | `W * kind.soft(logits)` (differentiable; training) |
# | `hard` / `keep` | `W * hard` (the subnetwork alone) |
# | `ablate` | `W * ~hard` (the model without the subnetwork) |
# | `off` | `W` (the full model) |

# %%
ms = MaskSet.for_model(model, kind=ContinuousSparsification())
print(ms.summary().splitlines()[0])
ms.attach(model)
for mode in ("off", "soft", "keep", "ablate"):
    with ms.using(mode):
        diff = (model(tokens) - base_logits).abs().max().item()
    print(f"mode={mode:<6} max |logits - full model| = {diff:.4f}")
ms.detach()
print("detached; output restored exactly:", torch.equal(model(tokens), base_logits))

# %% [markdown]
# `applied(model, mode)` attaches for the length of a `with` block and detaches on exit (also
# on errors). While attached, model parameters are frozen (`requires_grad=False`), so only the
# mask logits get gradients.

# %% [markdown]
# ## Editing: drop one attention head, check it with `run_with_cache`
#
# Edits set logits to `+-HARD_LOGIT` and return the set, so they chain. Start from
# `MaskSet.full` (everything kept) and drop head 1 of layer 0 in q, k, v and o.
# Inside the block, `blocks.0.attn.hook_q` for head 1 no longer depends on the input: with its
# query weights masked, only the (never masked) bias is left.

# %%
no_head = MaskSet.full(model).set_head(layer=0, head=1, keep=False)
print(no_head.summary())

hook = "blocks.0.attn.hook_q"
_, cache_full = model.run_with_cache(tokens, names_filter=hook)
with no_head.applied(model, mode="keep"):
    _, cache = model.run_with_cache(tokens, names_filter=hook)
q_full, q = cache_full[hook], cache[hook]  # [batch, pos, head, d_head]
q_bias = no_head.target("blocks.0.attn.q").module.bias.detach().view(cfg.n_heads, cfg.d_head)
print("hook_q shape:", tuple(q.shape))
print("head 1 query == q bias everywhere:", torch.allclose(q[:, :, 1], q_bias[1].expand_as(q[:, :, 1])))
print("other heads unchanged:", torch.allclose(q[:, :, [0, 2, 3]], q_full[:, :, [0, 2, 3]]))

# %% [markdown]
# `set_neuron(layer, idx, keep)` edits MLP neurons (rows of `mlp.in`, columns of `mlp.out`),
# `set_layer(layer, keep)` and `set_target(name, keep)` whole blocks.

# %% [markdown]
# ## Algebra and random controls
#
# `|`, `&`, `-` and `~` combine hard masks into new sets (same targets, same kind).
# `random_like(seed)` keeps the same number of weights in every target, placed uniformly: the
# control the paper compares against.

# %%
a = MaskSet.empty(model).set_layer(0, True)                       # all of layer 0
b = MaskSet.empty(model).set_neuron(0, range(32), True).set_neuron(1, range(32), True)
union, inter = a | b, a & b
print(f"|a|={a.n_active():,} |b|={b.n_active():,} |a|b|={union.n_active():,} "
      f"|a&b|={inter.n_active():,} |a-b|={(a - b).n_active():,} |~a|={(~a).n_active():,}")
print("inclusion-exclusion holds:",
      union.n_active() == a.n_active() + b.n_active() - inter.n_active())

rand = b.random_like(seed=0)
same_counts = [r["kept"] for r in rand.table()] == [r["kept"] for r in b.table()]
print("random_like keeps the per-target counts:", same_counts,
      f"| overlap with b: {(rand & b).n_active():,} of {b.n_active():,}")

# %% [markdown]
# ## Saving and loading
#
# `save(path)` writes the logits (and the `allowed` masks: exact-zero weights are never kept)
# to safetensors plus a JSON sidecar with the model identity, targets, kind and metadata.
# `load(path, model)` checks shapes against the model; without a model the set is unbound
# (counts, algebra, edits and saving work; `attach` binds it).

# %%
no_head.metadata["note"] = "layer 0 head 1 removed"
path = no_head.save(WORK / "masks" / "no_head")
print("saved:", path.name, "+", path.with_suffix(".json").name)
loaded = MaskSet.load(path, model)
unbound = MaskSet.load(path)
same = all(torch.equal(loaded.hard_masks()[n], m) for n, m in no_head.hard_masks().items())
print("round trip identical:", same, "| metadata:", loaded.metadata)
print("unbound set kept count:", unbound.n_active())

# %% [markdown]
# ## The bigram paper's mask format
#
# The paper (Chang & Bergen, 2025) releases masks as pickles: HF parameter name -> numpy bool
# array. `export_paper` writes that format (GPT-NeoX q/k/v re-interleaved into
# `query_key_value`); `import_paper` reads it back through `load_paper_masks`, a restricted
# unpickler that only admits numpy boolean arrays.

# %%
paper_path = no_head.export_paper(WORK / "no_head.pkl", orig_model_name="tiny-neox")
raw = load_paper_masks(paper_path)
for k, v in list(raw.items())[:3]:
    print(f"{k}: {getattr(v, 'shape', v)}")
imported = MaskSet.import_paper(paper_path, model)
print("paper-format round trip identical:",
      all(torch.equal(imported.hard_masks()[n], m) for n, m in no_head.hard_masks().items()))


# %%
class Sneaky:
    """A pickle that would call a function when loaded (harmless here: print)."""

    def __reduce__(self):
        return (print, ("this would have run",))


(WORK / "evil.pkl").write_bytes(pickle.dumps({"gpt_neox.layers.0.attention.dense.weight": Sneaky()}))
try:
    load_paper_masks(WORK / "evil.pkl")
except MaskError as e:
    print("refused:", e)

# %% [markdown]
# ## Training masks: `fit_masks`
#
# An objective is any callable `objective(model, batch) -> scalar`; `fit_masks` adds
# `lam * penalty / n_weights` (the mean expected mask) and trains only the mask logits with
# AdamW, the model frozen. A toy question with a known answer: *which weights does head 2 of
# layer 0 need to produce its output?* The objective is the normalised squared error between
# the masked model's `blocks.0.attn.hook_z` for head 2 and the full model's (precomputed and
# carried in the batch). Only that head's q, k and v rows can matter, so the subnetwork should
# sit there and nowhere else.
#
# A hook that keeps its activation (not `run_with_cache`, which detaches) lets the gradient
# reach the masks. A temperature factor of 1.05 per step makes the masks decide within about a
# hundred steps; the stopping rule ends the fit once undecided masks number under 1% of the
# kept ones. (`interp.objectives` holds the bigram, self-distillation and LM objectives.)

# %%
HOOK, HEAD = "blocks.0.attn.hook_z", 2


def head_output(model, toks):
    store = {}

    def grab(act, hook):
        store["z"] = act  # [batch, pos, head, d_head]; not detached

    model.run_with_hooks(toks, fwd_hooks=[(HOOK, grab)])
    return store["z"][:, :, HEAD]


def reproduce_head(model, batch):
    toks, target = batch
    return ((head_output(model, toks) - target) ** 2).mean() / target.var()


train_tokens = torch.randint(0, cfg.d_vocab, (8, 16), generator=torch.Generator().manual_seed(1))
with torch.no_grad():
    batches = [(train_tokens, head_output(model, train_tokens))]  # re-iterable: fit_masks cycles

fit_set = MaskSet.for_model(model, kind=ContinuousSparsification(temperature_factor=1.05))
result = fit_masks(model, fit_set, reproduce_head, batches, lam=0.1, lr=0.1, max_steps=300,
                   progress=False, seed=0)
h0, h1 = result.history[0], result.final
print(f"fit: {result.steps} steps, stopped by {result.stopped_reason}, spike={result.spike}")
print(f"task loss {h0['task_loss']:.4f} -> {h1['task_loss']:.4f}; "
      f"active fraction {h1['active_fraction']:.4f}")
print(fit_set.summary())

# %% [markdown]
# If `spike=True` shows up here, it is the spike rule's `x1.25` test tripping on a task loss
# near 0.01: the rule (a jump of +0.25 nats or x1.25 over the previous 10 steps that does not
# recover) is meant for cross-entropy-sized losses. `spike_retries=k` would rerun the fit
# with new seeds; for small losses like this one, read `result.history` instead.
#
# Where did the kept weights go?

# %%
hard = fit_set.hard_masks()
for letter in "qkv":
    per_head = hard[f"blocks.0.attn.{letter}"].view(cfg.n_heads, cfg.d_head, -1).sum((1, 2))
    print(f"layer 0 {letter}: kept per head {per_head.tolist()}")
in_head = sum(int(hard[f"blocks.0.attn.{c}"].view(cfg.n_heads, cfg.d_head, -1)[HEAD].sum())
              for c in "qkv")
print(f"kept weights inside head {HEAD}'s q/k/v rows: {in_head} of {fit_set.n_active()}")

with torch.no_grad():
    for name, s in [("subnetwork", fit_set), ("random, same counts", fit_set.random_like(1))]:
        with s.applied(model, mode="keep"):
            print(f"error of {name}: {reproduce_head(model, batches[0]).item():.4f}")

# %% [markdown]
# In Jupyter, a `MaskSet` renders as a layer x block table (`_repr_html_`); in a terminal,
# `print(ms)` gives the same as text. `HardConcrete()` is the other mask kind (stochastic L0
# gates, Louizos et al. 2018); it starts near the full model:

# %%
hc = MaskSet.for_model(model, kind=HardConcrete(init_keep=0.9), seed=0)
print(hc.summary().splitlines()[0])
print("done; files in", WORK)
