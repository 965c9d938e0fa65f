"""Language models as TransformerLens ``TransformerBridge``s: presets, HF loading, training.

Presets are built offline with ``TransformerBridge.boot_native``; HF models (GPT-2, GPT-NeoX /
Pythia, ...) load through ``boot_transformers`` from a hub id or a local directory.
``train_lm`` trains any bridge with AdamW, linear warmup and cosine decay, periodic
validation and checkpoints in a :class:`~interp.models.checkpoints.CheckpointStore`, and
resumes from the store's last checkpoint.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from interp.errors import InterpError, ModelLoadError, suggest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LMConfig:
    """Architecture of a native bridge (a subset of ``TransformerBridgeConfig``)."""

    n_layers: int = 2
    d_model: int = 128
    n_heads: int = 4
    d_mlp: int = 512
    n_ctx: int = 128
    act_fn: str = "gelu"
    normalization_type: str = "LN"
    positional_embedding_type: str = "rotary"

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads


#: Built-in architectures. ``tiny`` trains in minutes on 2 CPU cores; ``small`` is for GPUs.
PRESETS: dict[str, LMConfig] = {
    "test": LMConfig(n_layers=2, d_model=32, n_heads=4, d_mlp=64, n_ctx=64),
    "tiny": LMConfig(n_layers=2, d_model=128, n_heads=4, d_mlp=512, n_ctx=128),
    "tiny4": LMConfig(n_layers=4, d_model=128, n_heads=4, d_mlp=512, n_ctx=128),
    "small": LMConfig(n_layers=6, d_model=512, n_heads=8, d_mlp=2048, n_ctx=256),
}


def _resolve_config(preset: str | LMConfig) -> LMConfig:
    if isinstance(preset, LMConfig):
        return preset
    if preset not in PRESETS:
        raise InterpError(
            f"Unknown LM preset {preset!r}; presets are {sorted(PRESETS)}.{suggest(preset, PRESETS)}"
        )
    return PRESETS[preset]


def build_lm(
    preset: str | LMConfig,
    tokenizer,
    *,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
):
    """A randomly initialised native ``TransformerBridge`` (offline, ~0.1 s).

    ``tokenizer`` must be an HF tokenizer loaded from disk (see
    :func:`interp.data.text.train_tokenizer`); its length sets ``d_vocab``.
    """
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    cfg = _resolve_config(preset)
    tb_cfg = TransformerBridgeConfig(
        n_layers=cfg.n_layers, d_model=cfg.d_model, n_heads=cfg.n_heads, d_head=cfg.d_head,
        d_mlp=cfg.d_mlp, d_vocab=len(tokenizer), n_ctx=cfg.n_ctx, act_fn=cfg.act_fn,
        normalization_type=cfg.normalization_type,
        positional_embedding_type=cfg.positional_embedding_type, seed=seed,
    )
    torch.manual_seed(seed)
    model = TransformerBridge.boot_native(tb_cfg, tokenizer=tokenizer, device=device, dtype=dtype)
    model.interp_config = asdict(cfg)
    return model


def load_hf_lm(
    name_or_dir: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    revision: str | None = None,
    tokenizer=None,
):
    """Wrap an HF causal LM (hub id or local ``save_pretrained`` directory) in a bridge.

    ``revision`` selects a training checkpoint on the hub (e.g. Pythia's ``"step4000"``).
    Without a network, pass a local directory.
    """
    from transformer_lens.model_bridge import TransformerBridge

    src = str(name_or_dir)
    is_dir = Path(src).is_dir()
    if not is_dir and (src.startswith((".", "/")) or Path(src).suffix):
        raise ModelLoadError(f"Model directory {src!r} does not exist. Check the path.")
    try:
        model = TransformerBridge.boot_transformers(
            src, device=device, dtype=dtype, revision=revision, tokenizer=tokenizer
        )
    except OSError as e:
        raise ModelLoadError(
            f"Could not load model {src!r}: {e}. Without a network, download it elsewhere "
            "(save_pretrained) and pass the local directory."
        ) from e
    except Exception as e:  # the bridge raises plain errors for unsupported architectures
        raise ModelLoadError(f"Could not load model {src!r} through TransformerBridge: {e}") from e
    model.eval()
    model.interp_config = {"hf": src, "revision": revision}
    return model


def model_identity(model) -> dict:
    """A small JSON-able description used to check that files fit a model."""
    cfg = model.cfg
    return {
        "name": getattr(cfg, "model_name", "native"),
        "n_layers": cfg.n_layers,
        "d_model": cfg.d_model,
        "n_heads": cfg.n_heads,
        "d_mlp": getattr(cfg, "d_mlp", None),
        "d_vocab": cfg.d_vocab,
        **({"interp_config": model.interp_config} if hasattr(model, "interp_config") else {}),
    }


def resolve_device(model, device: str | torch.device | None = None) -> torch.device:
    """``device`` if given, else where ``model``'s parameters live (CPU for a parameterless one)."""
    if device is not None:
        return torch.device(device)
    p = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    return p.device if p is not None else torch.device("cpu")


# --------------------------------------------------------------------------- losses


def lm_loss(
    logits: Float[Tensor, "batch pos d_vocab"], tokens: Int[Tensor, "batch pos"]
) -> Tensor:
    """Mean next-token cross-entropy in nats."""
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1)
    )


@torch.no_grad()
def mean_batch_loss(
    model, batches: Iterable[Int[Tensor, "batch pos"]], *,
    device: str | torch.device | None = None, progress: bool = False, desc: str = "loss",
) -> tuple[float, int]:
    """Token-weighted mean next-token loss over batches, and the number of tokens scored.

    The model runs in eval mode; its training flag is restored afterwards.
    """
    device = resolve_device(model, device)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for tokens in tqdm(batches, desc=desc, disable=not progress, leave=False):
            tokens = tokens.to(device).long()
            n = tokens[:, 1:].numel()
            total += lm_loss(model(tokens), tokens).item() * n
            count += n
    finally:
        model.train(was_training)
    if count == 0:
        raise InterpError("No tokens to score: pass [batch, pos] batches with pos >= 2.")
    return total / count, count


@torch.no_grad()
def evaluate_loss(
    model, tokens: Int[Tensor, " n"], *, seq_len: int = 128, batch_size: int = 16,
    max_batches: int | None = None, device: str | torch.device | None = None,
) -> float:
    """Mean next-token loss (nats/token) over a token stream, cut into fixed sequences."""
    from interp.data.text import to_sequences

    batches = to_sequences(tokens, seq_len).split(batch_size)
    if max_batches is not None:
        batches = batches[:max_batches]
    return mean_batch_loss(model, batches, device=device)[0]


def unigram_entropy(tokens: Int[Tensor, " n"], vocab_size: int) -> float:
    """Entropy (nats/token) of the unigram distribution estimated from counts."""
    counts = torch.bincount(tokens.flatten(), minlength=vocab_size).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())


# --------------------------------------------------------------------------- training


@dataclass
class TrainConfig:
    """Hyperparameters of :func:`train_lm`."""

    steps: int = 1250
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    weight_decay: float = 0.1
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 250
    eval_batches: int = 20
    checkpoint_every: int = 250
    seed: int = 0


@dataclass
class TrainResult:
    """What :func:`train_lm` measured."""

    steps: int
    final_train_loss: float
    val_loss: float
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    steps_per_second: float = 0.0
    resumed_from: int | None = None


def _lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def _optimizer(model, cfg: TrainConfig) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.95),
    )


def train_lm(
    model,
    train_tokens: Int[Tensor, " n_train"],
    val_tokens: Int[Tensor, " n_val"],
    config: TrainConfig | None = None,
    *,
    store=None,
    device: str | torch.device | None = None,
    progress: bool = True,
    stop_after: int | None = None,
) -> TrainResult:
    """Train ``model`` in place; with a ``store``, checkpoint and resume from its last step.

    Batches are a deterministic function of (seed, step), and the optimizer state and RNG are
    checkpointed, so an interrupted run resumed from the store ends with the same weights as
    an uninterrupted one. ``stop_after`` ends the run early after that many steps (used to
    simulate an interruption).
    """
    from interp.data.text import iterate_batches

    cfg = config or TrainConfig()
    device = resolve_device(model, device)
    model.to(device)
    opt = _optimizer(model, cfg)
    start, history, resumed = 0, [], None
    if store is not None and store.latest_step() is not None:
        ckpt = store.load(store.latest_step(), model=model, optimizer=opt, device=device)
        start, resumed = ckpt.step, ckpt.step
        history = list(ckpt.metadata.get("history", []))
        log.info("resuming from step %d", start)
        if start >= cfg.steps:
            return TrainResult(start, history[-1]["train_loss"] if history else float("nan"),
                               ckpt.metadata.get("val_loss", float("nan")), history,
                               resumed_from=resumed)
    torch.manual_seed(cfg.seed + start)
    batches = iterate_batches(train_tokens, cfg.batch_size, cfg.seq_len, seed=cfg.seed, start=start)
    end = cfg.steps if stop_after is None else min(cfg.steps, start + stop_after)
    model.train()
    t0, loss_val, val_loss = time.perf_counter(), float("nan"), float("nan")
    bar = tqdm(range(start, end), desc="train LM", disable=not progress, initial=start,
               total=cfg.steps)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg)
        batch = next(batches).to(device)
        loss = lm_loss(model(batch), batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        loss_val = loss.item()
        done = step + 1
        record = {"step": done, "train_loss": loss_val, "lr": _lr_at(step, cfg)}
        if done % cfg.eval_every == 0 or done == cfg.steps:
            val_loss = evaluate_loss(model, val_tokens, seq_len=cfg.seq_len,
                                     batch_size=cfg.batch_size, max_batches=cfg.eval_batches)
            record["val_loss"] = val_loss
            model.train()
            bar.set_postfix(loss=f"{loss_val:.3f}", val=f"{val_loss:.3f}")
        history.append(record)
        if store is not None and (done % cfg.checkpoint_every == 0 or done == cfg.steps):
            store.save(model, done, optimizer=opt,
                       metadata={"val_loss": record.get("val_loss"), "train_config": asdict(cfg),
                                 "history": history})
    seconds = time.perf_counter() - t0
    model.eval()
    n = end - start
    if end == cfg.steps and math.isnan(val_loss):
        val_loss = evaluate_loss(model, val_tokens, seq_len=cfg.seq_len,
                                 batch_size=cfg.batch_size, max_batches=cfg.eval_batches)
    return TrainResult(end, loss_val, val_loss, history, seconds,
                       n / seconds if seconds > 0 else 0.0, resumed)
